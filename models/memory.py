"""Memory of a model alone, shared by pre-training and fine-tuning planners.

Only model arithmetic lives here (no DeepSpeed, per ARCHITECTURE.md): parameter counts and
activations. Model states under ZeRO come from DeepSpeed's estimators in runtime/memory.py.
Activations are measured, not guessed: the model runs forward on the meta device (no
memory, no compute) while a saved-tensor hook records every tensor autograd keeps for the
backward pass, attributed to the InternImage block that saved it. With activation
checkpointing a block keeps only its input, plus one block's activations alive during its
recomputation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.intern_image import InternImageLayer

GiB = 1024**3


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest single module (DeepSpeed's 'largest layer')."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
               default=0)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def measure_saved_bytes(model: nn.Module, run: Callable[[], object],
                        dtype: torch.dtype = torch.bfloat16,
                        training: bool = True) -> tuple[int, int]:
    """Bytes autograd keeps for backward while ``run()`` does a forward pass of ``model``,
    (without, with) per-block checkpointing of its InternImage blocks.

    ``model`` is moved to the meta device in ``dtype`` (build it there: nothing is
    allocated); ``run`` must make its inputs on the meta device too. ``training=False``
    probes in eval mode (grad still recorded) for models whose training-mode forward
    branches on tensor values, which the meta device cannot answer (transformers' heads);
    dropout / drop-path masks are then not counted.
    """
    # cpu-created stragglers (legacy tensor constructors) go to meta too; casting replaces
    # storages, so parameters are collected after it
    model.to(device="meta", dtype=dtype)
    model.train(training)
    params = {_storage_key(p) for p in model.parameters()}
    # storage key -> storage: holding the storage keeps its key from being reused.
    seen: dict[int, torch.UntypedStorage] = {}
    per_block: dict[int, int] = {}
    block_inputs: dict[int, int] = {}
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage()
            owner = current[-1] if current else -1
            per_block[owner] = per_block.get(owner, 0) + seen[key].nbytes()
        return t

    hooks, flags = [], []
    blocks = [m for m in model.modules() if isinstance(m, InternImageLayer)]
    for idx, m in enumerate(blocks):
        flags.append(m.with_cp)
        m.with_cp = False

        def pre(_m, args, idx=idx):
            current.append(idx)
            block_inputs[idx] = args[0].numel() * args[0].element_size()

        def post(*_):
            current.pop()  # returns None: a forward hook's return value would replace the output

        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", enabled=False), torch.device("meta"):
            run()
    finally:
        for h in hooks:
            h.remove()
        for m, flag in zip(blocks, flags):
            m.with_cp = flag
    outside = per_block.pop(-1, 0)
    without_cp = outside + sum(per_block.values())
    with_cp = outside + sum(block_inputs.values()) + max(per_block.values(), default=0)
    return without_cp, with_cp
