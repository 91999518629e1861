"""InternImage as a transformers backbone (``AutoBackbone``), for transformers' heads.

transformers builds a head's backbone from ``config.backbone_config``. Its
``TimmBackbone`` already wraps any timm ``features_only`` model; this subclass only adds
``model_kwargs`` (architecture overrides such as tiny widths, ``drop_path_rate``,
``with_cp``) because ``TimmBackboneConfig`` has no place for them. Registered under the
model type ``internimage_backbone``, so configs round-trip through ``to_dict``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoBackbone, AutoConfig, TimmBackbone, TimmBackboneConfig

import models  # noqa: F401  (registers the internimage_* names with timm)


@strict
class InternImageBackboneConfig(TimmBackboneConfig):
    """``TimmBackboneConfig`` + ``model_kwargs`` passed to ``timm.create_model``."""

    model_type = "internimage_backbone"
    model_kwargs: dict | None = None


class InternImageBackbone(TimmBackbone):
    """``TimmBackbone`` whose timm model is built with ``config.model_kwargs``."""

    config_class = InternImageBackboneConfig

    def __init__(self, config: InternImageBackboneConfig, **kwargs):
        super().__init__(config, **{**(config.model_kwargs or {}), **kwargs})

    @property
    def internimage(self):
        """The wrapped ``InternImageTimm`` (parameter names as in released checkpoints)."""
        return self._backbone.model


def backbone_config(name: str, out_indices: tuple[int, ...] = (0, 1, 2, 3),
                    **model_kwargs) -> InternImageBackboneConfig:
    """A transformers backbone config for InternImage ``name`` (variant or released name)."""
    # JSON-friendly values: transformers serialises configs.
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()}
    return InternImageBackboneConfig(backbone=name, out_indices=list(out_indices),
                                     model_kwargs=kwargs or None)


AutoConfig.register(InternImageBackboneConfig.model_type, InternImageBackboneConfig,
                    exist_ok=True)
AutoBackbone.register(InternImageBackboneConfig, InternImageBackbone, exist_ok=True)
