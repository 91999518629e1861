"""The momentum (EMA) target encoder, partitioned like the online model under ZeRO-3.

Targets of the image branch come from an exponential moving average of the online image
tower (BYOL's momentum encoder; Siamese Image Modeling's target encoder): after every
optimizer step, theta_t <- m theta_t + (1 - m) theta_s, with m rising from ``base`` to
``final`` on BYOL's cosine (``momentum_at``).

Under ZeRO-3 the teacher is a second DeepSpeed engine without an optimizer, built under
zero.Init: each parameter is split across the ranks exactly as its online twin (same
shape, same world size), so every rank updates its own slice from the online model's fp32
master slice, with no communication and never a whole copy of the model (REFERENCE.md
section 6, measured on this machine). Under ZeRO stages 0-2 the teacher is a plain whole
module on every rank, and so is the online module's parameter: the update reads it where
it is, again with no communication (the fp32 master itself in fp32 runs; its bf16/fp16
copy, the weights the online network computes with, in mixed precision). Assembling the
partitioned fp32 master instead (``safe_get_full_fp32_param``) would all-reduce every
whole tensor every step: 1355 collectives and 4.4 GB for InternImage-H.

The moving average itself is always fp32 (a bf16 EMA with m near 1 stalls: the increments
round away). In a bf16/fp16 ZeRO-3 run the teacher engine's parameters are 16-bit, like
the online engine's: each rank keeps its fp32 EMA slices beside the engine and writes them,
rounded, into the engine's slices after every update, so the teacher's forward gathers 2
bytes per parameter, not 4 (InternImage-H: 2.2 GB per rank per step instead of 4.3; the
fp32 slices cost 4N/W bytes per rank, ~0.54 GB on 8 ranks, the 16-bit ones 2N/W more).
Whatever its weights' type, in bf16/fp16 runs the forward computes in the run's 16-bit type
under ``torch.autocast`` (``teacher_autocast_dtype``), as Siamese Image Modeling's target
encoder runs inside its training step's autocast (OpenGVLab/Siamese-Image-Modeling,
engine_pretrain.py: ``torch.cuda.amp.autocast`` around the model call; models_sim.py
``forward_sim``: the target encoder under ``no_grad`` inside it): an fp32 forward of 2B
views would dominate the step, whose online tower runs in bf16 (H100: ~67 dense fp32 TFLOPS
against ~989 bf16). Under ZeRO 0-2 the teacher module stays fp32 (no gathering to save).
The target it returns is fp32. The fp32 EMA is saved and restored with every checkpoint
(``state_dict``), so a resumed run is exact; a resume on another world size re-deals the
saved slices (``load_resized``: each rank copies its new elements out of the old ranks'
slices, read from their files mapped: pretrain/resize.py ``read_teacher_slices``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def momentum_at(done: float, total: float, base: float, final: float = 1.0) -> float:
    """BYOL's schedule (Grill et al. 2020, section 3.2): ``base`` at the start, rising on a
    half cosine to ``final`` when ``done`` reaches ``total`` (steps, or samples for an
    epoch plan: pretrain.engine.run_progress)."""
    progress = min(max(done / max(total, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def teacher_autocast_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """The 16-bit type the teacher's forward autocasts to: the one the online engine
    computes in, read from the online run's DeepSpeed config (its ``bf16``/``fp16``
    sections, which ``engine.precision`` sets); None in fp32 runs (the forward stays fp32)."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds_config.get(key, {}).get("enabled", False):
            return dtype
    return None


class TargetEncoder(nn.Module):
    """The image tower as the target encoder: its forward is the unpooled feature map
    (the map the decoder predicts), named ``visual.*`` like the online model's tower.

    ``autocast_dtype`` (``teacher_autocast_dtype``): the forward runs under
    ``torch.autocast`` to that type on the input's device (the weights stay as they are,
    fp32) and returns the map in fp32; None: a plain forward."""

    def __init__(self, visual: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.visual = visual
        self.autocast_dtype = autocast_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.visual.forward_unpooled(images)
        # Entered here, inside the module, not around the engine call: DeepSpeed's
        # engine.forward turns an autocast entered outside it off (deepspeed/runtime/
        # torch_autocast.py, autocast_if_enabled) unless its own torch_autocast section is
        # on, and that section would also change how ZeRO-3 gathers the parameters.
        with torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype):
            features = self.visual.forward_unpooled(images)
        return features.float()


def teacher_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The online run's DeepSpeed config for the teacher engine: no optimizer, parameters in
    the run's precision (16-bit slices in bf16/fp16 runs: what its forward gathers; the
    fp32 moving average lives beside the engine, in ``MomentumTeacher``)."""
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "data_types"):
        config.pop(key, None)
    config.get("zero_optimization", {}).pop("offload_optimizer", None)
    return config


def _online_source(param: nn.Parameter) -> torch.Tensor:
    """What the EMA follows for one online parameter, read without communication: this
    rank's fp32 master slice under ZeRO-3, else the whole module parameter (stages 0-2
    keep it on every rank; fp32, or the 16-bit copy of the master in mixed precision)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param)
    return param.detach()


class MomentumTeacher:
    """The EMA of ``online``'s parameters named ``visual.*``, held by ``encoder``.

    ``ds_config``: the teacher engine's config (``teacher_ds_config``) when the online
    model is a ZeRO-3 engine (``encoder`` then built under zero.Init with it), else None
    (a plain fp32 module, updated whole). Call :meth:`update` with momentum 0 once the
    online engine has its optimizer: the teacher then starts as an exact copy.
    """

    def __init__(self, encoder: TargetEncoder, online: nn.Module,
                 ds_config: dict[str, Any] | None = None):
        encoder.requires_grad_(False)
        self.partitioned = ds_config is not None
        if self.partitioned:
            import deepspeed

            self.engine, _, _, _ = deepspeed.initialize(model=encoder, config=ds_config,
                                                        dist_init_required=False)
            self.module = self.engine.module
        else:
            self.engine, self.module = encoder, encoder
        self.module.eval()
        online_params = dict(online.named_parameters())
        self.pairs: list[tuple[str, nn.Parameter, nn.Parameter]] = []
        for name, param in self.module.named_parameters():
            if name not in online_params:
                raise ValueError(f"target encoder parameter {name} has no online twin")
            self.pairs.append((name, param, online_params[name]))
        # The fp32 moving average of this rank's elements: the parameters themselves where
        # they are fp32, else (a 16-bit ZeRO-3 teacher engine) fp32 copies beside them.
        self.apart = any(self._local(p).dtype != torch.float32 for _, p, _ in self.pairs)
        self.copies = ({name: self._local(p).float().clone() for name, p, _ in self.pairs}
                       if self.apart else {})

    def _local(self, param: nn.Parameter) -> torch.Tensor:
        """The elements this rank owns: its ZeRO-3 slice without the padding that evens out
        the last rank's slice (never gathered into the parameter, and left uninitialised:
        an EMA or a 0 * x refresh over it reads NaN garbage of the fp32 master's padding),
        or the whole parameter. (Looked up at each use: ZeRO-3 may swap the slice's storage.)"""
        if not self.partitioned:
            return param.data
        flat = param.ds_tensor.view(-1)
        return flat[:max(0, min(flat.numel(), param.ds_numel - self._first(param)))]

    def _first(self, param: nn.Parameter) -> int:
        """The place of this rank's first element in the whole (padded) tensor: its
        partition's start under ZeRO-3 (each rank's partition is as long as every
        other's), else 0."""
        if not self.partitioned:
            return 0
        import torch.distributed as dist

        rank = dist.get_rank(group=getattr(param, "ds_process_group", None))
        return rank * param.ds_tensor.numel()

    def _average(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """The fp32 moving average of this rank's elements of ``param``."""
        return self.copies[name] if self.apart else self._local(param)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s, in fp32 on this rank's slices only.

        Two multi-tensor (foreach) operations over all tensors, not two kernels per tensor:
        InternImage-H's 1,355 tensors made ~2,700 launches a step."""
        averages, sources = [], []
        for name, teacher, online in self.pairs:
            ema = self._average(name, teacher)
            # the master slice is padded as the teacher's: its first elements are ours
            source = _online_source(online).reshape(-1)[:ema.numel()].view_as(ema)
            if source.device != ema.device:
                # optimizer offload: the fp32 master slice lives on the host, copied over
                # one tensor at a time (all at once would hold a copy of every slice)
                ema.mul_(momentum).add_(source.to(ema.device), alpha=1 - momentum)
                continue
            averages.append(ema)
            sources.append(source)  # a 16-bit one is promoted into the fp32 average
        if averages:
            torch._foreach_mul_(averages, momentum)
            torch._foreach_add_(averages, sources, alpha=1 - momentum)
        self._publish()

    def _publish(self) -> None:
        """Make the engine's parameters the fp32 average (rounded into 16-bit slices where
        the engine keeps them) and drop gathered copies that are now stale."""
        if self.apart:
            for name, teacher, _ in self.pairs:
                self._local(teacher).copy_(self.copies[name])
        self._drop_gathered()

    def _drop_gathered(self) -> None:
        """Parameters under stage3_param_persistence_threshold keep a gathered copy, which
        a change of the slices makes stale: dropped, so the next forward gathers them."""
        if self.partitioned:
            coordinator = getattr(self.engine, "optimizer", None)
            if coordinator is not None and hasattr(coordinator, "partition_all_parameters"):
                coordinator.partition_all_parameters()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The target feature map of ``images`` (fp32, no gradient), computed in the
        encoder's ``autocast_dtype`` where it has one."""
        self.engine.eval()
        return self.engine(images.float()).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 moving average by name (its slices under ZeRO-3), for
        checkpoints."""
        return {name: self._average(name, p).detach().clone().cpu()
                for name, p, _ in self.pairs}

    def load_resized(self, saved: list[dict[str, torch.Tensor]]) -> None:
        """Copy back the moving average saved on another world size: ``saved`` holds each
        old rank's :meth:`state_dict` in rank order (under ZeRO 0-2, rank 0's whole
        tensors alone). A tensor's saved slices, concatenated, are its elements in order
        (the padding that evens out a ZeRO-3 partition is never saved, or, in checkpoints
        saved before it was left out, sits past the tensor's last element), from which
        this rank takes the elements it owns on this world size."""
        self._require(saved)
        with torch.no_grad():
            for name, p, _ in self.pairs:
                _copy_elements(self._average(name, p).view(-1), [s[name] for s in saved],
                               self._first(p), name)
            self._publish()

    def _require(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Refuse saved ``states`` that lack any of the target encoder's tensors."""
        missing = [name for name, _, _ in self.pairs if any(name not in s for s in states)]
        if missing:
            raise ValueError(f"checkpoint lacks the target encoder's {missing[:3]} "
                             f"({len(missing)} tensors)")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy back tensors saved by :meth:`state_dict` on the same rank and world size."""
        self._require([state])
        with torch.no_grad():
            for name, p, _ in self.pairs:
                ema = self._average(name, p)
                # checkpoints saved before the padding was left out hold it at the end
                ema.copy_(state[name].reshape(-1)[:ema.numel()].view_as(ema))
            self._publish()


def _copy_elements(dst: torch.Tensor, parts: list[torch.Tensor], start: int,
                   name: str) -> None:
    """``dst`` (flat) <- elements ``start .. start + len(dst)`` of the concatenation of
    ``parts``, read part by part (a part mapped from a checkpoint file is read only where
    it overlaps)."""
    end, at, copied = start + dst.numel(), 0, 0
    for part in parts:
        flat = part.reshape(-1)
        lo, hi = max(start, at), min(end, at + flat.numel())
        if lo < hi:
            dst[lo - start:hi - start].copy_(flat[lo - at:hi - at])
            copied += hi - lo
        at += flat.numel()
    if copied != dst.numel():
        raise ValueError(f"target encoder tensor {name}: the saved slices hold {at} "
                         f"elements, this rank needs {start}..{end}")
