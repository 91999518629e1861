"""Register the InternImage variants with timm (``timm.create_model("internimage_t_1k_224")``).

Released weights cannot be fetched by name here; pass a local file through timm's
``pretrained_cfg_overlay=dict(file=PATH)`` with ``pretrained=True``, or call
``models.load_pretrained`` yourself.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs

from models.checkpoint import CheckpointError, state_for_model, unwrap_containers
from models.constants import IMAGENET_MEAN, IMAGENET_STD
from models.features import InternImageTimm
from models.intern_image import InternImage
from models.layer_scale import gammas_lacking, layer_scale_hint
from models.variants import PRETRAINED_NAMES, VARIANTS


def checkpoint_filter_fn(state_dict: dict, model: InternImage) -> dict:
    """timm's ``pretrained_filter_fn``: what ``models.load_pretrained`` takes from a file.

    Containers are unwrapped; a released detection/segmentation checkpoint gives its trunk
    (``backbone.*``, the neck and heads dropped); a state with none of the model's keys
    raises ``CheckpointError`` (timm loads non-strictly with ``features_only=True``, so it
    would otherwise load nothing and say nothing). See ``models.checkpoint.state_for_model``.
    """
    state = unwrap_containers(state_dict)
    if not isinstance(state, dict):
        raise CheckpointError(f"the pretrained weights do not hold a state_dict "
                              f"(got {type(state).__name__})")
    source = (getattr(model, "pretrained_cfg", None) or {}).get("file") or "the pretrained weights"
    own = model.state_dict().keys()
    state, _ = state_for_model(state, own, source)
    # timm loads non-strictly here, dropping unexpected keys with a warning: a T det/seg
    # backbone's trained gammas would be lost, and every feature change
    lacking = gammas_lacking(state, own)
    if lacking:
        raise CheckpointError(
            f"{source}: {len(lacking)} tensors the model lacks ({', '.join(lacking[:2])}, ...); "
            + layer_scale_hint(lacking, "layer_scale=1.0 in timm.create_model"))
    return state


def _unpooled_stride(variant: str) -> int:
    """Stride of ``forward_features``' map: stage 4 (32), or stage 3 for H's projector (16)."""
    return 16 if VARIANTS[variant].use_clip_projector else 32


def _cfg(variant: str, size: int) -> dict:
    pool = size // _unpooled_stride(variant)
    # crop_pct 1.0 at every size: the released evaluation resizes the short side to
    # IMG_SIZE and centre-crops IMG_SIZE (classification/dataset/build.py, TEST.CROP=True by
    # default and in every released config), not timm's 224/0.875 = 256 then 224.
    return {"num_classes": 1000, "input_size": (3, size, size), "pool_size": (pool, pool),
            "crop_pct": 1.0, "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "patch_embed.conv1",
            "classifier": "head", "license": "mit"}


default_cfgs = generate_default_cfgs(
    {f"{name}.released": _cfg(variant, size) for name, (variant, size) in PRETRAINED_NAMES.items()}
    | {f"{name}.untrained": _cfg(name, 224) for name in VARIANTS}
)


def _create(name: str, variant: str, pretrained: bool, **kwargs) -> InternImage:
    arch = VARIANTS[variant].kwargs() | kwargs
    # features_only goes through FeatureGetterNet -> InternImageTimm.forward_intermediates.
    return build_model_with_cfg(InternImageTimm, name, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg={"feature_cls": "getter",
                                             "out_indices": tuple(range(len(arch["depths"])))},
                                **arch)


def _register(name: str, variant: str) -> None:
    def factory(pretrained: bool = False, **kwargs) -> InternImage:
        return _create(name, variant, pretrained, **kwargs)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__module__ = __name__
    factory.__doc__ = f"InternImage {variant.split('_')[1].upper()} ({name})."
    globals()[name] = register_model(factory)


for _name in VARIANTS:
    _register(_name, _name)
for _name, (_variant, _) in PRETRAINED_NAMES.items():
    _register(_name, _variant)
