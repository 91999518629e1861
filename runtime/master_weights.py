"""The fp32 master weights of a 16-bit run without ZeRO, by name.

At ZeRO stage 0 in bf16 or fp16, DeepSpeed trains the module's 16-bit weights through
``FP16_UnfusedOptimizer`` (a list of fp32 tensors per group, ``fp32_groups``) or
``FP16_Optimizer`` (one flat fp32 tensor per group, ``fp32_groups_flat``). Both go into
``mp_rank_00_model_states.pt`` with the optimizer state, but without names: unlike ZeRO's
``param_shapes``, DeepSpeed saves no map from them to the module. The module's own
weights there are the 16-bit copies, each up to half a bf16 ulp (0.4% relative) off its
master: a conversion or a stage-2 init read from them would start from rounded weights.

So every checkpoint of such an engine also stores the names in the optimizer's group order
(:func:`master_names`, written by ``runtime.checkpoint.save_checkpoint`` into DeepSpeed's
client state), and :func:`read_master_weights` pairs them back up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the checkpoint writer imports this module; torch loads lazily there
    import torch

MASTER_NAMES = "fp32_master_names"  # key in DeepSpeed's model-states file


def master_names(engine) -> list[list[str]] | None:
    """Names of ``engine``'s fp32 masters in its optimizer's group order, when a non-ZeRO
    16-bit optimizer keeps them unnamed; None otherwise (ZeRO saves ``param_shapes`` of
    its own; an fp32 run trains the module's weights themselves)."""
    optimizer = getattr(engine, "optimizer", None)
    if engine.zero_optimization() or not hasattr(optimizer, "fp16_groups"):
        return None
    return [[engine.param_names[p] for p in group] for group in optimizer.fp16_groups]


def read_master_weights(model_states: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Name -> fp32 master of a stage-0 ``mp_rank_00_model_states.pt`` (as loaded) that
    holds both the masters and their names; None when it holds no unnamed masters (an fp32
    run) or was written without the names (before they were saved: a caller falls back
    to the module's 16-bit weights and says so). Shapes come from the module's copies."""
    names = model_states.get(MASTER_NAMES)
    optimizer_state = model_states.get("optimizer") or {}
    if names is None:
        return None
    module = model_states["module"]
    if "fp32_groups" in optimizer_state:
        groups = optimizer_state["fp32_groups"]
        pairs = [(name, tensor) for group_names, group in zip(names, groups, strict=True)
                 for name, tensor in zip(group_names, group, strict=True)]
    elif "fp32_groups_flat" in optimizer_state:
        pairs = []
        for group_names, flat in zip(names, optimizer_state["fp32_groups_flat"], strict=True):
            sizes = [module[name].numel() for name in group_names]
            if flat.numel() < sum(sizes):
                raise ValueError(f"a flat fp32 group holds {flat.numel()} values, its "
                                 f"{len(sizes)} parameters {sum(sizes)}")
            pairs += list(zip(group_names, flat[:sum(sizes)].split(sizes), strict=True))
    else:
        return None
    return {name: tensor.reshape(module[name].shape).float() for name, tensor in pairs}
