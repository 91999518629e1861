"""Layer-scale gammas (``levels.*.blocks.*.gamma1``/``gamma2``) in checkpoints.

The released InternImage-T detection and segmentation configs build their backbone with
``layer_scale=1.0`` (OpenGVLab/InternImage detection/configs/coco/*internimage_t*.py,
segmentation/configs/{ade20k,cityscapes}/upernet_internimage_t_*.py), which InternImage-T
itself does not have. Two consequences for loading a backbone (finetune/init.py at
``--init``, and timm's ``pretrained=True`` through models/timm_registry.py):

- a released T det/seg checkpoint holds gammas a T built without ``model.layer_scale``
  lacks: :func:`layer_scale_hint` is what the refusal should say;
- the T 1K classifier (``internimage_t_1k_224.pth``) those configs start from holds none:
  the released backbone loads it non-strictly (``init_weights``:
  ``self.load_state_dict(state_dict, False)``, detection/mmdet_custom/models/backbones/
  intern_image.py), so the gammas start at their built value, 1.0.
  :func:`fresh_gammas` names the missing keys that may start so.
"""

from __future__ import annotations

from collections.abc import Iterable

GAMMA_SUFFIXES = (".gamma1", ".gamma2")


def is_gamma(key: str) -> bool:
    """Whether ``key`` is a block's layer-scale gamma."""
    return key.endswith(GAMMA_SUFFIXES)


def layer_scale_hint(unexpected: Iterable[str], setting: str = "model.layer_scale") -> str:
    """What a load refusal adds when the checkpoint's keys the model lacks
    (``unexpected``) include layer-scale gammas: ``""`` when none do. ``setting``: how
    the caller sets it (a config key, or timm's ``layer_scale=`` argument)."""
    if not any(is_gamma(k) for k in unexpected):
        return ""
    return (f"the checkpoint holds layer-scale weights (gamma1/gamma2): set {setting} "
            "(the released T det/seg backbones use 1.0)")


def gammas_lacking(state_keys: Iterable[str], own_keys: Iterable[str]) -> list[str]:
    """The checkpoint's gammas (``state_keys``) that the model (``own_keys``) lacks in a
    block it has: a trunk trained with layer scale loaded into one built without it, whose
    features would change without them. (Blocks the model does not have at all, levels a
    timm feature extractor pruned, are not counted.)"""
    own = set(own_keys)
    modules = {".".join(parts[:i]) for parts in (k.split(".") for k in own)
               for i in range(1, len(parts))}  # every module that holds a tensor
    return [k for k in state_keys
            if is_gamma(k) and k not in own and k.rsplit(".", 1)[0] in modules]


def fresh_gammas(missing: Iterable[str], state_keys: Iterable[str]) -> list[str]:
    """The model's ``missing`` keys that start at their built value: its gammas, when the
    checkpoint (``state_keys``) holds no gamma at all (a trunk trained without layer
    scale, as the released loader's non-strict load leaves them); none otherwise (a
    checkpoint missing only some gammas is damaged, not another architecture)."""
    if any(is_gamma(k) for k in state_keys):
        return []
    return [k for k in missing if is_gamma(k)]
