"""What a classification run is built from: the classifier, AdamW over layer-decayed
groups, timm's cosine schedule, Mixup/CutMix and the loss.

Kept apart from the config (finetune/classification.py) and the engine (finetune/zero.py)
so that the engine needs no import of the entrypoint that calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from runtime import schedules
from runtime.param_groups import adamw, param_groups

if TYPE_CHECKING:
    from finetune.classification import ClassificationConfig


def build_classifier(cfg: ClassificationConfig) -> nn.Module:
    """InternImage with a ``data.num_classes`` head."""
    from models import build_model

    return build_model(cfg.model.name, num_classes=cfg.data.num_classes,
                       **cfg.model.build_kwargs())


def build_optimizer(model: nn.Module, cfg: ClassificationConfig) -> torch.optim.Optimizer:
    """AdamW over layer-decayed groups (``lr_scale`` per group, applied by the scheduler)."""
    return adamw(classifier_groups(model, cfg), cfg.optim.lr, cfg.optim.betas)


def classifier_groups(model: nn.Module, cfg: ClassificationConfig) -> list[dict]:
    """The classifier's param groups: the whole model is the trunk, layer-decayed by the
    released classification rule (the last block and the head at the full rate), with the
    DCN multiplier of ``cfg.optim``."""
    return param_groups(model, cfg.optim.weight_decay, depths=model.depths, backbone_prefix="",
                        layer_decay=cfg.optim.layer_decay, dcn_lr_mult=cfg.optim.dcn_lr_mult,
                        rule="classification")


def build_scheduler(optimizer, cfg, total_steps: int, steps_per_epoch: int = 0):
    """timm's cosine schedule, stepped per update, with linear warm-up.

    As in the released InternImage classification code, the cosine spans the whole run and
    the warm-up overlays its start (no warm-up prefix), so the lr reaches ``min_lr`` at the
    last step; and each layer-decayed / DCN group runs from the one warm-up start to its
    own peak ``lr_scale x lr``, then to the one ``min_lr`` (``absolute_ends``: the released
    groups carry their scaled lr as timm's base value). ``steps_per_epoch`` converts
    ``optim.warmup_epochs``.
    """
    return schedules.cosine(optimizer, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                            total_steps=total_steps,
                            warmup_steps=cfg.optim.warmup(steps_per_epoch), warmup_prefix=False,
                            absolute_ends=True)


def build_mixup(cfg: ClassificationConfig):
    """timm's Mixup/CutMix (None when both alphas are 0); it also applies smoothing."""
    from timm.data import Mixup

    a = cfg.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mix_prob,
                 label_smoothing=a.smoothing, num_classes=cfg.data.num_classes)


def build_loss(cfg: ClassificationConfig, mixup) -> nn.Module:
    """Soft-target CE under Mixup (targets already smoothed), else label-smoothing CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    return nn.CrossEntropyLoss()
