"""``build_model``: a variant by name, with optional architecture overrides."""

from __future__ import annotations

from dataclasses import replace

from models.intern_image import InternImage
from models.variants import PRETRAINED_NAMES, VARIANTS


def resolve_variant(name: str) -> str:
    """Map a variant or released-checkpoint name to a variant name, or fail clearly."""
    if name in VARIANTS:
        return name
    if name in PRETRAINED_NAMES:
        return PRETRAINED_NAMES[name][0]
    raise ValueError(f"unknown InternImage model {name!r}; choose one of "
                     f"{sorted(VARIANTS)} or {sorted(PRETRAINED_NAMES)}")


def build_model(name: str, num_classes: int = 1000, **overrides) -> InternImage:
    """Build InternImage ``name`` (``internimage_t|s|b|l|xl|h`` or a released name).

    ``overrides`` replace architecture fields of the variant (e.g. ``channels=16``,
    ``depths=(1, 1, 2, 1)``, ``drop_path_rate=0.0``, ``with_cp=True``,
    ``dcn_backend="reference"``). Build on the meta device with ``with torch.device("meta")``.
    """
    spec = VARIANTS[resolve_variant(name)]
    spec_fields = set(spec.kwargs())
    spec_overrides = {k: v for k, v in overrides.items() if k in spec_fields}
    model_only = {k: v for k, v in overrides.items() if k not in spec_fields}
    for key in ("depths", "groups", "level2_post_norm_block_ids"):
        if spec_overrides.get(key) is not None:
            spec_overrides[key] = tuple(spec_overrides[key])
    spec = replace(spec, **spec_overrides)
    try:
        return InternImage(num_classes=num_classes, **spec.kwargs(), **model_only)
    except TypeError as err:
        raise ValueError(f"build_model({name!r}): bad override: {err}") from None
