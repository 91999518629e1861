"""The released InternImage recipes' per-parameter lr scales, restated for tests (the
facts we must match; our implementation is runtime/param_groups.py).

Sources, OpenGVLab/InternImage:
- classification: ``classification/optimizer.py`` (``set_weight_decay_and_lr``) over the
  model's ``lr_decay_keywards`` (``classification/models/intern_image.py``): a dict of
  name fragments -> ratio, the first fragment contained in a parameter's name decides, no
  fragment: ratio 1. Blocks are numbered from the last one (ratio 1) backwards; the stem
  takes level 0's first block's ratio, the downsample and norm of levels 0-2 the next
  level's first block's. ``DCN_LR_MUL`` multiplies names containing ``offset``,
  ``attention_weights``, ``center_feature_scale_proj`` or ``alpha_beta``.
- detection / segmentation: ``{detection,segmentation}/mmcv_custom/
  custom_layer_decay_optimizer_constructor.py`` (``get_num_layer_for_swin`` on
  ``backbone.*`` names, ``num_layers = paramwise num_layers + 2`` with paramwise
  num_layers = sum(depths), scale ``decay ** (num_layers - layer_id - 1)``).
"""

from __future__ import annotations

from collections.abc import Sequence

RELEASED_DCN_FRAGMENTS = ("offset", "attention_weights", "center_feature_scale_proj",
                          "alpha_beta")


def classification_ratio(name: str, depths: Sequence[int], decay: float) -> float:
    """The released classification lr ratio of trunk parameter ``name`` (DCN multiplier
    not included)."""
    ratios: dict[str, float] = {}
    idx = 0
    for level in reversed(range(len(depths))):
        for block in reversed(range(depths[level])):
            ratios[f"levels.{level}.blocks.{block}."] = decay ** idx
            idx += 1
    ratios["patch_embed"] = ratios["levels.0.blocks.0."]
    for level in range(len(depths) - 1):
        for part in ("downsample", "norm"):
            ratios[f"levels.{level}.{part}"] = ratios[f"levels.{level + 1}.blocks.0."]
    return next((r for key, r in ratios.items() if key in name), 1.0)


def classification_dcn(name: str) -> bool:
    """Whether the released classification optimizer applies DCN_LR_MUL to ``name``."""
    return any(f in name for f in RELEASED_DCN_FRAGMENTS)


def dense_layer_id(name: str, depths: Sequence[int]) -> int:
    """The released dense-task layer id of ``name`` (``backbone.``-prefixed trunk names;
    anything else is the last layer)."""
    if name.startswith("backbone.patch_embed"):
        return 0
    if not name.startswith("backbone.levels"):
        return sum(depths) + 1
    parts = name.split(".")
    stage = int(parts[2])
    if parts[3] in ("downsample", "norm"):
        return 1 + sum(depths[:min(stage + 1, 3)])
    return int(parts[4]) + 1 + sum(depths[:stage])


def dense_scale(name: str, depths: Sequence[int], decay: float) -> float:
    """The released dense-task lr scale of ``name`` (``backbone.``-prefixed trunk names)."""
    num_layers = sum(depths) + 2
    return decay ** (num_layers - dense_layer_id(name, depths) - 1)
