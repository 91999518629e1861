"""Memory planning: parameters, DeepSpeed's ZeRO model-state estimate, activation memory.

Model states come from DeepSpeed's own estimators. Activations are measured, not guessed:
the model runs forward on the meta device (no memory, no compute) while a saved-tensor hook
records every tensor autograd keeps for the backward pass, attributed to the block that
saved it. With activation checkpointing a block keeps only its input, plus one block's
activations alive during its recomputation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models import build_model
from models.intern_image import InternImageLayer

GiB = 1024**3


@dataclass
class MemoryEstimate:
    """Per-GPU memory plan of one model/batch/resolution/ZeRO setting (bytes unless noted)."""

    model: str
    params: int
    largest_layer_params: int
    gpus: int
    gpus_per_node: int
    zero_stage: int
    offload: bool
    image_size: int
    batch_per_gpu: int
    activation_checkpointing: bool
    dtype: str
    model_states_per_gpu: int
    model_states_cpu_per_node: int
    activations_per_gpu: int
    activations_per_gpu_without_checkpointing: int

    @property
    def total_per_gpu(self) -> int:
        """Model states plus activations on one GPU."""
        return self.model_states_per_gpu + self.activations_per_gpu

    def as_dict(self) -> dict:
        """JSON-ready dict with GiB figures added."""
        out = asdict(self)
        out["total_per_gpu"] = self.total_per_gpu
        for key in ("model_states_per_gpu", "model_states_cpu_per_node", "activations_per_gpu",
                    "activations_per_gpu_without_checkpointing", "total_per_gpu"):
            out[key.replace("_per", "_gib_per").replace("_cpu_gib", "_gib_cpu")] = round(
                out[key] / GiB, 2)
        return out


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest single module (DeepSpeed's 'largest layer')."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
               default=0)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def measure_activation_bytes(
    model: nn.Module, batch: int, image_size: int, dtype: torch.dtype = torch.bfloat16,
) -> tuple[int, int]:
    """Bytes autograd keeps for backward, (without, with) per-block checkpointing.

    The model must live on the meta device; checkpointing is switched off for the probe.
    """
    model.to(dtype)  # before collecting parameter storages: casting replaces them
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
            nbytes = seen[key].nbytes()
            owner = current[-1] if current else -1
            per_block[owner] = per_block.get(owner, 0) + nbytes
        return t

    hooks = []
    for idx, m in enumerate(mod for mod in model.modules() if isinstance(mod, InternImageLayer)):
        m.with_cp = False

        def pre(_m, args, idx=idx):
            current.append(idx)
            block_inputs[idx] = args[0].numel() * args[0].element_size()

        def post(*_):
            current.pop()  # returns None: a forward hook's return value would replace the output

        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    x = torch.empty(batch, 3, image_size, image_size, device="meta", dtype=dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", enabled=False):
            model.forward_pooled(x)
    finally:
        for h in hooks:
            h.remove()
    outside = per_block.pop(-1, 0)
    without_cp = outside + sum(per_block.values())
    with_cp = outside + sum(block_inputs.values()) + max(per_block.values(), default=0)
    return without_cp, with_cp


def model_state_bytes(params: int, largest_layer_params: int, gpus: int, gpus_per_node: int,
                      zero_stage: int, offload: bool) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) of model states, by DeepSpeed's estimators."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0..3, got {zero_stage}")
    per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params, per_node, nodes, cpu_offload=offload,
            cpu_offload_params=offload)
    elif zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes,
                                                         cpu_offload=offload)
        if zero_stage == 1:  # gradients are not partitioned: add fp16 grads minus their shard
            gpu += int(2 * params * (1 - 1 / (per_node * nodes)))
    else:  # plain data parallel, mixed precision AdamW: 16-bit params+grads, fp32 master+moments
        cpu, gpu = 0, 18 * params
    return int(gpu), int(cpu)


def estimate(
    model_name: str, gpus: int = 8, gpus_per_node: int = 8, zero_stage: int = 3,
    image_size: int = 224, batch_per_gpu: int = 16, activation_checkpointing: bool = True,
    offload: bool = False, dtype: torch.dtype = torch.bfloat16, **model_overrides,
) -> MemoryEstimate:
    """Plan memory for ``model_name`` trained on ``gpus`` GPUs with ZeRO ``zero_stage``."""
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError("gpus and gpus_per_node must be >= 1")
    with torch.device("meta"):
        model = build_model(model_name, **model_overrides)
    params = sum(p.numel() for p in model.parameters())
    largest = largest_layer_params(model)
    gpu, cpu = model_state_bytes(params, largest, gpus, gpus_per_node, zero_stage, offload)
    per_node = min(gpus, gpus_per_node)
    act_plain, act_cp = measure_activation_bytes(model, batch_per_gpu, image_size, dtype)
    return MemoryEstimate(
        model=model_name, params=params, largest_layer_params=largest,
        gpus=per_node * math.ceil(gpus / per_node), gpus_per_node=per_node,
        zero_stage=zero_stage, offload=offload, image_size=image_size,
        batch_per_gpu=batch_per_gpu, activation_checkpointing=activation_checkpointing,
        dtype=str(dtype).replace("torch.", ""), model_states_per_gpu=gpu,
        model_states_cpu_per_node=cpu,
        activations_per_gpu=act_cp if activation_checkpointing else act_plain,
        activations_per_gpu_without_checkpointing=act_plain,
    )
