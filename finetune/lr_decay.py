"""AdamW parameter groups for fine-tuning InternImage: layer-wise lr decay, no weight decay
on norms/biases/gammas, and a reduced lr on the DCN offset/mask layers.

Layer ids follow the depth of the network: the stem is layer 0, block j of level i is
``1 + sum(depths[:i]) + j``, a level's downsample (and its extra norms) share the id of
that level's last block, and everything after the backbone (classifier, neck, head) is
``num_layers + 1``. A parameter of layer ``l`` gets ``lr_scale = decay ** (L + 1 - l)``,
so the head trains at the full rate and the stem at the smallest (the recipe of the
released fine-tuning configs).
"""

from __future__ import annotations

import re

import torch
from torch import nn

DCN_SAMPLING_LAYERS = (".dcn.offset.", ".dcn.mask.")
HEAD_OFFSET_LAYERS = ("sampling_offsets", "reference_points")
_BLOCK = re.compile(r"levels\.(\d+)\.blocks\.(\d+)\.")
_LEVEL = re.compile(r"levels\.(\d+)\.")


def layer_id(name: str, depths: list[int]) -> int:
    """Layer id of backbone parameter ``name`` (released keys); ``sum(depths) + 1`` for the
    head and anything not in the backbone trunk."""
    total = sum(depths)
    if name.startswith("patch_embed."):
        return 0
    m = _BLOCK.match(name)
    if m:
        level, block = int(m.group(1)), int(m.group(2))
        return 1 + sum(depths[:level]) + block
    m = _LEVEL.match(name)
    if m:  # downsample / post norms / level norm: with the level's last block
        level = int(m.group(1))
        return sum(depths[:level + 1])
    return total + 1


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, layer-scale gammas and deformable-attention sampling offsets (heads'
    ``sampling_offsets``, as the released dense-task optimiser constructor) are not decayed."""
    return param.ndim <= 1 or name.endswith(("gamma1", "gamma2")) or "sampling_offsets" in name


def param_groups(model: nn.Module, depths: list[int], weight_decay: float,
                 layer_decay: float = 1.0, dcn_lr_mult: float = 1.0,
                 backbone_prefix: str = "", backbone_lr_mult: float = 1.0,
                 layer0_patterns: tuple[str, ...] = (),
                 head_offset_lr_mult: float = 1.0) -> list[dict]:
    """Groups keyed by (layer, decay?, dcn?) with an ``lr_scale`` that timm's schedulers
    multiply into each group's lr.

    ``backbone_prefix``: where the InternImage sits inside ``model`` (e.g. ``backbone.body.``
    for detection); parameters outside it are "head" parameters at the lr scale of layer
    ``L + 1``; backbone parameters are further scaled by ``backbone_lr_mult``.
    ``layer0_patterns``: head parameters whose name contains one of these get layer 0's
    (smallest) scale instead, as the released Mask2Former recipes do for the query
    embeddings, level embedding and class/mask predictors.
    ``head_offset_lr_mult``: lr multiplier of head parameters named ``sampling_offsets`` /
    ``reference_points`` (deformable-attention offsets; the released DINO recipe's
    ``offset_lr_scale``).
    """
    num_layers = sum(depths) + 1
    groups: dict[tuple[int, bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = name.startswith(backbone_prefix)
        local = name[len(backbone_prefix):] if in_backbone else name
        if in_backbone:
            lid = layer_id(local, depths)
        else:
            lid = 0 if any(pat in name for pat in layer0_patterns) else num_layers
        decay = not no_weight_decay(name, p)
        dcn = any(s in f".{name}" for s in DCN_SAMPLING_LAYERS)
        offset = not in_backbone and any(s in name for s in HEAD_OFFSET_LAYERS)
        key = (lid, decay, dcn, in_backbone, offset)
        if key not in groups:
            scale = layer_decay ** (num_layers - lid)
            scale *= dcn_lr_mult if dcn else 1.0
            scale *= backbone_lr_mult if in_backbone else 1.0
            scale *= head_offset_lr_mult if offset else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay
                           else 0.0, "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` output, every group starting at the base ``lr``.

    timm's schedulers multiply each group's ``lr_scale`` into the scheduled value
    (``timm/scheduler/scheduler.py``, ``update_groups``), so the group lr must not be
    pre-scaled here: that would apply the scale twice (lr x scale^2). The released mmcv
    constructors set ``lr = scale * base_lr`` instead because mmcv's lr hooks scale each
    group's own initial lr; both give ``base_lr * schedule(t) * scale``.
    """
    for g in groups:
        g["lr"] = lr
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
