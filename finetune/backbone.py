"""InternImage as a dense-prediction trunk (detection/segmentation): the four stage maps
only, with the classification-only modules removed and ``--init`` applied."""

from __future__ import annotations

from torch import nn

from finetune.config import BackboneConfig

CLASSIFICATION_ONLY = ("conv_head", "avgpool", "head", "dcnv3_head_x4", "dcnv3_head_x3",
                       "clip_projector", "fc_norm")


def build_trunk(cfg: BackboneConfig, init: str | None = None) -> nn.Module:
    """InternImage without its classifier (``forward_features`` -> 4 NCHW maps).

    The classification-only modules are deleted so that DDP sees no unused parameters and
    the optimizer does not carry them.
    """
    from finetune.init import load_init
    from models import build_model

    model = build_model(cfg.name, num_classes=0, **cfg.build_kwargs())
    for name in CLASSIFICATION_ONLY:
        if hasattr(model, name):
            delattr(model, name)
    if init:
        load_init(model, init, variant=cfg.name, arch=cfg.arch(), backbone_only=True)
    return model
