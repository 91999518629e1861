"""AdamW parameter groups of every training job: no weight decay on norms, biases,
layer-scale gammas, the temperature and deformable-attention offsets; layer-wise lr decay;
a multiplier on the DCN offset layers; backbone/head multipliers.

Every group carries ``lr_scale``; the optimizer's group ``lr`` starts at the base lr and
the schedule (runtime/schedules.py, or timm's ``update_groups``) multiplies the scale in, so
a group trains at ``base_lr * schedule(t) * lr_scale``. Pre-scaling the group lr as well
would apply the scale twice.

Layer-wise decay follows the released recipes, which differ between the tasks
(OpenGVLab/InternImage). A parameter of layer ``l`` gets ``layer_decay ** (num_layers - l)``:

- ``"dense"`` (detection and segmentation: ``mmcv_custom/
  custom_layer_decay_optimizer_constructor.py``, ``get_num_layer_for_swin``): the stem is
  layer 0, block j of level i is ``1 + sum(depths[:i]) + j``, the downsample and norm of
  level i that of the next level's first block, ``1 + sum(depths[:i+1])`` (the last
  level's: ``1 + sum(depths[:3])``), and InternImage-H's ``levels.i.post_norms.j`` that
  of block j of level i (the released function reads the index after any other part name
  as a block index); everything outside the trunk is ``num_layers = sum(depths) + 1`` (full
  rate), so the last block trains at ``layer_decay`` times the head's rate.
- ``"classification"`` (``classification/optimizer.py`` over the model's
  ``lr_decay_keywards``): the last block trains at the full rate and each block before it
  one factor less (``num_layers = sum(depths)``, block ids as above); the stem takes level
  0's first block's rate, the downsample and norm of levels 0-2 the next level's first
  block's; whatever no keyword names (the last level's norm, InternImage-H's post norms,
  the classifier head and the H/G CLIP-projector head) trains at the full rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.layer_decay import LAYER_RULES, layer_id, num_layers

# The layers the released classification optimizer scales by DCN_LR_MUL (names containing
# "offset" or "center_feature_scale_proj"; InternImage's DCNv3 has no "attention_weights"
# or "alpha_beta"): the sampling offsets, not the mask (softmax-weight) projection.
DCN_SAMPLING_LAYERS = (".dcn.offset.", ".dcn.center_feature_scale_proj")
HEAD_OFFSET_LAYERS = ("sampling_offsets", "reference_points")
NO_DECAY_SUFFIXES = ("gamma1", "gamma2", "logit_scale")
def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, layer-scale gammas, the temperature (``logit_scale``) and heads'
    deformable-attention ``sampling_offsets`` (as the released dense-task optimiser
    constructor) are not decayed."""
    # a parameter partitioned by zero.Init is an empty 1-d tensor; ds_shape is its shape
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) or "sampling_offsets" in name


def is_dcn_sampling(name: str) -> bool:
    """A DCNv3 sampling-offset layer (the layers ``dcn_lr_mult`` scales)."""
    return any(s in f".{name}" for s in DCN_SAMPLING_LAYERS)


def param_groups(model: nn.Module, weight_decay: float, *,
                 depths: Sequence[int] | None = None,
                 backbone_prefix: str | None = None,
                 layer_decay: float = 1.0, dcn_lr_mult: float = 1.0,
                 backbone_lr_mult: float = 1.0,
                 layer0_patterns: tuple[str, ...] = (),
                 head_offset_lr_mult: float = 1.0, rule: str = "dense") -> list[dict]:
    """AdamW groups keyed by (layer, decay?, DCN?, backbone?, head offset?), each with its
    ``lr_scale``, ``weight_decay``, ``layer_id`` and parameter ``names``.

    ``backbone_prefix``: where the InternImage trunk sits inside ``model`` (``""``: the
    model is the trunk plus a ``head``, as a classifier; ``backbone.body.`` in detection);
    its parameters get layer ids from ``depths`` under ``rule`` (``"dense"`` or
    ``"classification"``, module docstring) and are further scaled by
    ``backbone_lr_mult``. ``None``: no layer-wise decay at all (pre-training): every
    parameter is a "head" parameter at scale 1, times ``dcn_lr_mult`` on the DCN
    offset layers.
    ``layer0_patterns``: head parameters whose name contains one of these get layer 0's
    (smallest) scale instead, as the released Mask2Former recipes do for the query
    embeddings, level embedding and class/mask predictors.
    ``head_offset_lr_mult``: lr multiplier of head parameters named ``sampling_offsets`` /
    ``reference_points`` (deformable-attention offsets; the released DINO recipe's
    ``offset_lr_scale``).
    """
    if backbone_prefix is not None and depths is None:
        raise ValueError("param_groups: a backbone_prefix needs the trunk's depths")
    if rule not in LAYER_RULES:
        raise ValueError(f"param_groups: rule must be one of {LAYER_RULES}, got {rule!r}")
    top = num_layers(depths, rule) if depths is not None else 1
    groups: dict[tuple[int, bool, bool, bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = backbone_prefix is not None and name.startswith(backbone_prefix)
        if in_backbone:
            lid = layer_id(name[len(backbone_prefix):], depths, rule)
        else:
            lid = 0 if any(pat in name for pat in layer0_patterns) else top
        no_decay = no_weight_decay(name, p)
        dcn = is_dcn_sampling(name)
        offset = not in_backbone and any(s in name for s in HEAD_OFFSET_LAYERS)
        # decayed before undecayed within a layer: pre-training's group order since its
        # first checkpoints (an optimizer state is restored group by group)
        key = (lid, no_decay, dcn, in_backbone, offset)
        if key not in groups:
            scale = layer_decay ** (top - lid)
            scale *= dcn_lr_mult if dcn else 1.0
            scale *= backbone_lr_mult if in_backbone else 1.0
            scale *= head_offset_lr_mult if offset else 1.0
            groups[key] = {"params": [], "names": [], "lr_scale": scale, "layer_id": lid,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def start_at_base_lr(groups: list[dict], lr: float) -> list[dict]:
    """Set every group's ``lr`` to the base ``lr`` (the schedule applies ``lr_scale``)."""
    for g in groups:
        g["lr"] = lr
    return groups


def adamw(groups: list[dict], lr: float, betas: Sequence[float],
          eps: float = 1e-8) -> torch.optim.AdamW:
    """torch AdamW over ``param_groups`` output, every group starting at the base ``lr``.

    The schedule multiplies each group's ``lr_scale`` in (timm: ``update_groups`` in
    ``timm/scheduler/scheduler.py``; pre-training: ``schedules.WarmupCosine``). The
    released mmcv constructors set ``lr = scale * base_lr`` instead because mmcv's lr hooks
    scale each group's own initial lr; both give ``base_lr * schedule(t) * scale``.
    """
    return torch.optim.AdamW(start_at_base_lr(groups, lr), lr=lr, betas=tuple(betas),
                             eps=eps)


# What a param group's training depends on that the config sets (optim.lr, layer_decay and
# dcn_lr_mult -> lr_scale, weight_decay, betas, eps; initial_lr where a scheduler was built
# before the load: timm's in detection/segmentation, pre-training's WarmupCosine): a resume
# (fine-tuning's finetune/engine.py start_engine, pre-training's pretrain/trainer.py)
# takes these from the config and the AdamW moments from the checkpoint
GROUP_SETTINGS = ("lr", "initial_lr", "lr_scale", "weight_decay", "betas", "eps")


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's :data:`GROUP_SETTINGS` that it holds (and its parameter names),
    as built."""
    return [{k: g[k] for k in (*GROUP_SETTINGS, "names") if k in g}
            for g in optimizer.param_groups]


def apply_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]],
                         resume_dir: Path) -> None:
    """Give the param groups a checkpoint restored the ``settings`` this run built them
    with (:func:`group_settings` before the load).

    DeepSpeed's ``load_checkpoint`` restores the optimizer's groups whole: the lr they
    had reached, timm's ``initial_lr`` (the base lr a scheduler built afterwards takes with
    ``setdefault``, keeping an existing one), ``lr_scale``, ``weight_decay`` and ``betas``.
    So a resume with another ``optim.lr`` (``layer_decay``, ``weight_decay``, ...) trained
    on with the checkpoint's values while config.yaml recorded the new ones
    (classification builds its scheduler after the engine: every value; detection and
    segmentation before it: all but the base lr; pre-training: every value, its
    DeepSpeed-owned scheduler's ``base_lrs`` too, pretrain/engine.py
    ``apply_schedule_settings``). Each group gets back what this config built,
    ``initial_lr`` included only where it was set then (a fresh run's state); the
    scheduler, stepped to the resumed step, then sets the lr of that step. The optimizer's
    state (the moments and step counts) stays the checkpoint's.

    Only the number of groups is compared: the model hash matched, and groups are built
    in a fixed order from the model, while what a checkpoint restores into a group cannot
    be trusted to name it. DeepSpeed 0.19.8 loads a ZeRO-3 universal checkpoint (a resume
    on another world size) by copying group 0's saved keys into every group
    (zero/stage3.py, ``_load_universal_checkpoint``): every group then held group 0's
    ``names``, ``weight_decay`` and ``lr_scale`` (norms and biases decayed, the DCN
    multiplier lost) until this put each group's own back."""
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        from runtime.checkpoint import ResumeError

        raise ResumeError(f"{resume_dir}: the checkpoint's optimizer holds {len(groups)} "
                          f"param groups, this config builds {len(settings)}")
    for group, built in zip(groups, settings):
        if "initial_lr" not in built:
            group.pop("initial_lr", None)
        group.update(built)
