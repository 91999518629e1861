"""InternImage models: the T/S/B/L/XL/H family, builders, checkpoint loading, timm names.

Plain PyTorch: nothing here knows about DeepSpeed, data loading or launchers.
"""

from models import timm_registry  # noqa: F401  (registers the timm names)
from models.builder import build_model, resolve_variant
from models.checkpoint import CheckpointError, LoadReport, load_pretrained, read_state_dict
from models.intern_image import InternImage
from models.variants import PRETRAINED_NAMES, VARIANTS, InternImageSpec

__all__ = [
    "PRETRAINED_NAMES",
    "VARIANTS",
    "CheckpointError",
    "InternImage",
    "InternImageSpec",
    "LoadReport",
    "build_model",
    "load_pretrained",
    "read_state_dict",
    "resolve_variant",
]
