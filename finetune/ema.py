"""The classification EMA (``ema.enabled``): timm ``ModelEmaV3``'s rule on this rank's part
of DeepSpeed's fp32 masters (runtime/master_slices.py).

The released code keeps a ``ModelEma`` of the fp32 model it trains. Here the engine trains
fp32 masters that the module does not hold: a bf16 run's module holds bf16 copies (an EMA
of them averaged weights rounded to 0.4%), and a ZeRO-3 module holds placeholders, so an
EMA of the module gathered the whole model at every step (InternImage-H: 2.2 GB of bf16
all-gather per rank per step) into a full fp32 replica on every rank (4.3 GB). Each rank
now averages its own part of the masters, at every step and without communication:
1/world of the model per rank under ZeRO (whole where the masters are whole: stage 0).
The whole EMA is assembled (one all-reduce) only to evaluate it and to save ``ema.pt``,
whose format is the model's state dict as before.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from runtime.master_slices import MasterSlice, master_slices, master_view, unfused_masters


def meta_copy(model: nn.Module) -> nn.Module:
    """``model``'s structure with its tensors on the meta device: no copy of its weights
    (a deepcopy would hold a second whole model, 4.3 GB for InternImage-H, if briefly)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class PartitionedEma:
    """The EMA of ``engine``'s fp32 masters, this rank's part of each (see module doc).

    ``skeleton``: :func:`meta_copy` of the model as built, before DeepSpeed took it (its
    structure and names); ``decay``/``warmup``: ``ModelEmaV3``'s. The EMA starts at the
    engine's masters (the weights training starts from)."""

    def __init__(self, engine, skeleton: nn.Module, decay: float, warmup: bool):
        from timm.utils import ModelEmaV3

        self.engine = engine
        # timm's decay rule (get_decay: warmup, update_after_step), held by a one-weight
        # module (timm's EMA needs one to place its state), left uninitialised: its init
        # would draw from the global generator, and a run's draws must not depend on
        # whether the EMA is on
        self.rule = ModelEmaV3(nn.utils.skip_init(nn.Linear, 1, 1, bias=False), decay=decay,
                               use_warmup=warmup)
        self.skeleton = skeleton
        self.slices: list[MasterSlice] = master_slices(engine)
        self.unfused = unfused_masters(engine)  # (looked up once, not per step)
        self.params: list[torch.Tensor] = []
        self.buffers: dict[str, torch.Tensor] = {}
        self.set_to_masters()

    @torch.no_grad()
    def set_to_masters(self) -> None:
        """The EMA set to the engine's masters now (a start, or a resume of a checkpoint
        saved without an EMA)."""
        self.params = [master_view(self.engine, s, self.unfused).detach().clone()
                       for s in self.slices]
        self.buffers = {n: b.detach().float().clone() if b.is_floating_point()
                        else b.detach().clone()
                        for n, b in self.engine.module.named_buffers()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """One EMA step (``ModelEmaV3.get_decay(step)``) from the masters as they are after
        optimizer step ``step``; floating buffers averaged too, others copied (timm's
        rule). No communication."""
        weight = 1.0 - self.rule.get_decay(step)
        masters = [master_view(self.engine, s, self.unfused) for s in self.slices]
        held = [(e, m) for e, m in zip(self.params, masters, strict=True) if e.numel()]
        if held:
            torch._foreach_lerp_([e for e, _ in held], [m for _, m in held], weight)
        for name, b in self.engine.module.named_buffers():
            if b.is_floating_point():
                self.buffers[name].lerp_(b.detach().float(), weight)
            else:
                self.buffers[name].copy_(b)

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA, as the model's state dict in fp32 (what ``ema.pt`` holds), on
        every rank. Collective: one all-reduce of the model's size (every rank calls it)."""
        import torch.distributed as dist

        from runtime.dist import global_rank, group_size

        # the engine's device: the masters may lie elsewhere (an offloaded optimizer's on
        # the CPU), the all-reduce and the evaluation run there
        flat = torch.zeros(sum(s.size for s in self.slices), dtype=torch.float32,
                           device=torch.device(self.engine.device))
        offset, rank = 0, global_rank()
        for s, ema in zip(self.slices, self.params, strict=True):
            if s.numel and (not s.whole or rank == 0):  # a whole one: rank 0's counts
                flat[offset + s.start: offset + s.start + s.numel] = ema
            offset += s.size
        if group_size() > 1:
            dist.all_reduce(flat)
        shapes = {n: t.shape for n, t in self.skeleton.named_parameters()}
        state: dict[str, torch.Tensor] = {}
        offset = 0
        for s in self.slices:
            state[s.name] = flat[offset: offset + s.size].view(shapes[s.name])
            offset += s.size
        state.update(self.buffers)
        return {k: state[k] for k in self.skeleton.state_dict()}  # the model's key order

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's part of a whole EMA ``state`` (from :meth:`state_dict`: a resumed
        ``ema.pt``), on every rank alike."""
        missing = [k for k in self.skeleton.state_dict() if k not in state]
        if missing:
            raise KeyError(f"the saved EMA lacks {len(missing)} of the model's tensors, "
                           f"e.g. {missing[:3]}")
        for i, s in enumerate(self.slices):
            whole = state[s.name].reshape(-1)
            self.params[i] = whole[s.start: s.start + s.numel].to(
                self.params[i].device, torch.float32).clone()
        for name in self.buffers:
            self.buffers[name] = state[name].to(self.buffers[name].device,
                                                self.buffers[name].dtype).clone()

    @contextlib.contextmanager
    def module(self) -> Iterator[nn.Module]:
        """The whole EMA as an fp32 model, for an evaluation; its tensors are released
        after. Collective (:meth:`state_dict`)."""
        model = copy.deepcopy(self.skeleton)
        model.load_state_dict(self.state_dict(), assign=True)
        try:
            yield model.eval()
        finally:
            del model
