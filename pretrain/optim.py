"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

DCN_SAMPLING_LAYERS = (".dcn.offset.", ".dcn.mask.")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, layer-scale gammas and the temperature are not decayed."""
    # a parameter partitioned by zero.Init is an empty 1-d tensor; ds_shape is its shape
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim <= 1 or name.endswith(("gamma1", "gamma2", "logit_scale"))


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 dcn_lr_mult: float = 1.0) -> list[dict]:
    """Groups by (decay or not) x (DCN offset/mask layer or not); each group's ``lr`` is
    ``lr * lr_mult`` (schedulers then scale every group's own base lr)."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (no_weight_decay(name, p), any(s in f".{name}" for s in DCN_SAMPLING_LAYERS))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (no_decay, dcn), params in sorted(buckets.items()):
        mult = dcn_lr_mult if dcn else 1.0
        groups.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                       "lr_mult": mult, "lr": lr * mult})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float,
                    dcn_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """torch AdamW over ``param_groups``; each group's lr is ``lr * lr_mult``."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, dcn_lr_mult), lr=lr,
                             betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the base lr at step ``s``: linear warm-up, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
