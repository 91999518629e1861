"""What a classification run is built from: the classifier, AdamW over layer-decayed
groups, timm's cosine schedule, Mixup/CutMix and the loss.

The lr they use is the run's effective one (:func:`effective_optim`): with
``optim.lr_batch`` set (the presets), ``optim.lr``/``min_lr`` are per that many images and
scaled linearly to the run's total batch, as the released code does
(OpenGVLab/InternImage classification/main.py); the optimizer, the scheduler, the start's
log line and the dry-run plan all read it from there.

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
    from finetune.classification import ClassificationConfig, ClsOptimConfig


def build_classifier(cfg: ClassificationConfig, init: str | None = None) -> nn.Module:
    """InternImage with a ``data.num_classes`` head, its weights loaded from ``init`` when
    given (``finetune.init.load_init``; collective under a process group). A head the init
    does not provide starts at its built weights times ``model.head_init_scale`` (the
    released ``RAND_INIT_FT_HEAD``), before anything copies the model (the EMA)."""
    from finetune.init import fresh_head, load_init
    from models import build_model

    model = build_model(cfg.model.name, num_classes=cfg.data.num_classes,
                        **cfg.model.build_kwargs())
    if init:
        report = load_init(model, init, variant=cfg.model.name, arch=cfg.model.arch())
        if fresh_head(report) and cfg.model.head_init_scale != 1.0:
            with torch.no_grad():
                for p in model.head.parameters():
                    p.mul_(cfg.model.head_init_scale)
    return model


def effective_optim(cfg: ClassificationConfig, world_size: int) -> ClsOptimConfig:
    """``cfg.optim`` with the lr and min_lr a run over ``world_size`` processes trains at:
    scaled to the total batch (``run.batch_size x run.grad_accum x world_size``) when
    ``optim.lr_batch`` is set, else as given."""
    return cfg.optim.scaled(cfg.run.total_batch(world_size))


def lr_desc(cfg: ClassificationConfig, world_size: int) -> str:
    """The effective lr of a run over ``world_size`` processes, and where it comes from
    (the start's log line and the dry-run plan)."""
    o, eff = cfg.optim, effective_optim(cfg, world_size)
    total = cfg.run.total_batch(world_size)
    line = f"lr {eff.lr:.4g}, min_lr {eff.min_lr:.4g} at total batch {total}"
    if o.lr_batch is None:
        return line + " (optim.lr absolute: the same at any total batch)"
    return (line + f" (optim.lr {o.lr:.4g} / min_lr {o.min_lr:.4g} per optim.lr_batch "
            f"{o.lr_batch} images, x {total}/{o.lr_batch})")


def build_optimizer(model: nn.Module, cfg: ClassificationConfig, *,
                    world_size: int) -> torch.optim.Optimizer:
    """AdamW over layer-decayed groups (``lr_scale`` per group, applied by the scheduler)
    at the effective lr of a run over ``world_size`` processes."""
    o = effective_optim(cfg, world_size)
    return adamw(classifier_groups(model, cfg), o.lr, o.betas)


def classifier_groups(model: nn.Module, cfg: ClassificationConfig) -> list[dict]:
    """The classifier's param groups: the whole model is the trunk, layer-decayed by the
    released classification rule (the last block and the head at the full rate), with the
    DCN multiplier of ``cfg.optim``."""
    return param_groups(model, cfg.optim.weight_decay, depths=model.depths, backbone_prefix="",
                        layer_decay=cfg.optim.layer_decay, dcn_lr_mult=cfg.optim.dcn_lr_mult,
                        rule="classification")


def build_scheduler(optimizer, cfg, total_steps: int, steps_per_epoch: int = 0, *,
                    world_size: int):
    """timm's cosine schedule, stepped per update, with linear warm-up, at the effective
    lr and min_lr of a run over ``world_size`` processes (:func:`effective_optim`).

    As in the released InternImage classification code, the cosine spans the whole run and
    the warm-up overlays its start (no warm-up prefix), so the lr reaches ``min_lr`` at the
    last step; and each layer-decayed / DCN group runs from the one warm-up start to its
    own peak ``lr_scale x lr``, then to the one ``min_lr`` (``absolute_ends``: the released
    groups carry their scaled lr as timm's base value). ``steps_per_epoch`` converts
    ``optim.warmup_epochs``.
    """
    o = effective_optim(cfg, world_size)
    return schedules.cosine(optimizer, lr=o.lr, min_lr=o.min_lr, total_steps=total_steps,
                            warmup_steps=o.warmup(steps_per_epoch), warmup_prefix=False,
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
