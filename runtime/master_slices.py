"""Where this rank's part of each fp32 master weight lies in a DeepSpeed engine.

A 16-bit or ZeRO engine trains fp32 masters that are not the module's weights: the
module holds 16-bit copies (up to half a bf16 ulp, 0.4% relative, off their masters) or,
under ZeRO-3, empty placeholders. What reads the masters each step without communication
(the fine-tuning EMA, finetune/ema.py) reads this rank's part of each, as DeepSpeed keeps it
(0.19):

- ZeRO-3: the local fp32 partition (``safe_get_local_fp32_param``), elements
  ``[rank * partition, (rank + 1) * partition)`` of the flattened parameter, the last
  partition padded;
- ZeRO 1/2 and DeepSpeed's bf16 optimizer: this rank's fragment (``_hp_mapping``:
  ``get_hp_fragment()`` at ``lp_fragment_address``), none for a parameter outside its
  partition;
- 16-bit weights without ZeRO: ``FP16_UnfusedOptimizer``'s whole master per parameter
  (``fp32_groups``, parallel to ``fp16_groups``), the same on every rank;
- otherwise (fp32 without a ZeRO optimizer, a frozen parameter) the parameter itself,
  the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MasterSlice:
    """This rank's part of parameter ``name``'s fp32 master: ``numel`` elements from
    ``start`` of the flattened parameter of ``size`` elements (0: none here); ``whole``:
    every rank holds all of it (no partition: summed over the ranks it would count once
    per rank)."""

    name: str
    param: nn.Parameter
    size: int  # the whole parameter's elements
    start: int
    numel: int
    whole: bool


def unfused_masters(engine) -> dict[int, torch.Tensor]:
    """``id(param)`` -> fp32 master for every 16-bit parameter DeepSpeed's
    ``FP16_UnfusedOptimizer`` keeps one of without ZeRO (``fp32_groups``, parallel to
    ``fp16_groups``; none without it), in one pass."""
    opt = getattr(engine, "optimizer", None)
    return {id(lp): hp
            for low, high in zip(getattr(opt, "fp16_groups", ()),
                                 getattr(opt, "fp32_groups", ()), strict=False)
            for lp, hp in zip(low, high, strict=True)}


def unfused_master(engine, param: nn.Parameter,
                   masters: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The fp32 master of 16-bit ``param`` in :func:`unfused_masters` (``masters``: those
    of ``engine``, for a caller that asks each step; looked up here otherwise). Refuses
    another optimizer: DeepSpeed's fused ``FP16_Optimizer`` (a DeepSpeed Adam set through
    ``engine.deepspeed_config`` at stage 0) keeps its masters in flat buffers of its own,
    which cannot be read by parameter."""
    master = (unfused_masters(engine) if masters is None else masters).get(id(param))
    if master is not None:
        return master
    from runtime.loop import RefusedStart

    raise RefusedStart(
        f"the fp32 master of a 16-bit weight cannot be found in "
        f"{type(getattr(engine, 'optimizer', None)).__name__} (16-bit weights at ZeRO "
        "stage 0 with an optimizer from the DeepSpeed config file): use ZeRO stage 1, or "
        "drop the optimizer from that file")


def master_slices(engine) -> list[MasterSlice]:
    """Every parameter of ``engine.module`` with where this rank's part of its fp32 master
    lies (see the module doc), in ``named_parameters`` order."""
    from runtime.dist import global_rank

    # the partition index: classification's ranks are all data-parallel
    rank = global_rank()
    slices = []
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3 (``p`` itself is an empty placeholder)
            part = p.ds_tensor.ds_numel
            start = rank * part
            slices.append(MasterSlice(name, p, p.ds_numel, start,
                                      max(0, min(part, p.ds_numel - start)), False))
        elif hasattr(p, "_hp_mapping"):  # ZeRO 1/2, bf16 optimizer (None: not held here)
            mapping = p._hp_mapping
            address = mapping.lp_fragment_address if mapping is not None else None
            slices.append(MasterSlice(name, p, p.numel(), address.start if address else 0,
                                      address.numel if address else 0, False))
        else:  # the unfused optimizer's whole master, or the parameter itself
            slices.append(MasterSlice(name, p, p.numel(), 0, p.numel(), True))
    return slices


def master_view(engine, s: MasterSlice,
                unfused: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """This rank's part of ``s``'s fp32 master, 1-D (``s.numel`` elements): a view into
    DeepSpeed's buffers where it keeps one (fetched at each call: a checkpoint load may
    replace them), else a float copy of the parameter (fp32: the parameter itself).
    ``unfused``: :func:`unfused_masters` of ``engine``, for a caller that asks each step."""
    p = s.param
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p) if p.requires_grad else None
        if local is None:  # frozen: not in the optimizer; its own partition
            local = p.ds_tensor
        return local.reshape(-1)[: s.numel].float()
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:
            return p.new_empty(0, dtype=torch.float32)
        return p._hp_mapping.get_hp_fragment().reshape(-1).float()
    if p.dtype != torch.float32 and p.requires_grad and not engine.zero_optimization():
        return unfused_master(engine, p, unfused).reshape(-1)
    return p.detach().reshape(-1).float()
