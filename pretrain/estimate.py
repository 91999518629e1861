"""Memory planning of a pre-training run: parameters, DeepSpeed's ZeRO model-state
estimate, activation memory measured on the meta device (models/memory.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models import build_model
from models.memory import (  # noqa: F401 - re-exported: pretrain.plan and users import here
    GiB,
    largest_layer_params,
    measure_saved_bytes,
    model_state_bytes,
)


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


def measure_activation_bytes(
    model: nn.Module, batch: int, image_size: int, dtype: torch.dtype = torch.bfloat16,
) -> tuple[int, int]:
    """Bytes autograd keeps for backward of an InternImage classifier forward (pooled
    features) at ``batch`` x ``image_size``², (without, with) per-block checkpointing.

    The model must live on the meta device; checkpointing is switched off for the probe.
    """
    x = torch.empty(batch, 3, image_size, image_size, device="meta", dtype=dtype)
    return measure_saved_bytes(model, lambda: model.forward_pooled(x), dtype)


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
