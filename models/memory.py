"""Memory planning shared by pre-training and fine-tuning.

Model states come from DeepSpeed's own ZeRO estimators. Activations are measured, not
guessed: the model runs forward on the meta device (no memory, no compute) while a
saved-tensor hook records every tensor autograd keeps for the backward pass, attributed to
the InternImage block that saved it. With activation checkpointing a block keeps only its
input, plus one block's activations alive during its recomputation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from models.intern_image import InternImageLayer

GiB = 1024**3
# fp32 weights + fp32 gradients + AdamW's two fp32 moments: plain (DDP) fine-tuning with
# bf16 autocast keeps all four per parameter on every GPU.
DDP_ADAMW_BYTES_PER_PARAM = 16


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest single module (DeepSpeed's 'largest layer')."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
               default=0)


def model_state_bytes(params: int, largest_layer_params: int, gpus: int, gpus_per_node: int,
                      zero_stage: int, offload: bool, zero_init: bool = True) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) of model states, by DeepSpeed's estimators;
    stage 0: mixed-precision AdamW without ZeRO (16-bit params+grads, fp32 master+moments).

    ``zero_init``: stage 3 builds the model partitioned (``deepspeed.zero.Init``); without
    it every GPU's process first builds the whole fp32 model in host memory."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0..3, got {zero_stage}")
    per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params, per_node, nodes, cpu_offload=offload,
            cpu_offload_params=offload, zero_init=zero_init)
    elif zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes,
                                                         cpu_offload=offload)
        if zero_stage == 1:  # gradients are not partitioned: add fp16 grads minus their shard
            gpu += int(2 * params * (1 - 1 / (per_node * nodes)))
    else:
        cpu, gpu = 0, 18 * params
    return int(gpu), int(cpu)


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
