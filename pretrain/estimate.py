"""Memory planning of a pre-training run: parameters, DeepSpeed's ZeRO model-state
estimate (runtime/memory.py), ZeRO-3's reduce bucket and gathered parameters, activation
memory measured on the meta device (models/memory.py), and what one rank holds while the
model is built."""

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
)
from runtime.ds_config import reduce_bytes
from runtime.memory import model_state_bytes, zero_buffer_bytes


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
    reduce_bucket_per_gpu: int = 0  # ZeRO 1-3 (zero_buffer_bytes)
    live_parameters_per_gpu: int = 0
    zero_init: bool = False  # stage 3 builds the model partitioned (pretrain/zero_init.py)
    model_build_per_rank: int = 0  # peak parameter bytes per rank during construction

    @property
    def total_per_gpu(self) -> int:
        """Model states, activations and ZeRO's buffers on one GPU."""
        return (self.model_states_per_gpu + self.activations_per_gpu
                + self.reduce_bucket_per_gpu + self.live_parameters_per_gpu)

    def as_dict(self) -> dict:
        """JSON-ready dict with GiB figures added."""
        out = asdict(self)
        out["total_per_gpu"] = self.total_per_gpu
        for key in ("model_states_per_gpu", "model_states_cpu_per_node", "activations_per_gpu",
                    "activations_per_gpu_without_checkpointing", "reduce_bucket_per_gpu",
                    "live_parameters_per_gpu", "model_build_per_rank", "total_per_gpu"):
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


def measure_text_activation_bytes(text: nn.Module, batch: int, context_length: int,
                                  dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes autograd keeps for backward of a text-tower forward on ``batch`` captions of
    ``context_length`` tokens (the text tower is not checkpointed). Meta device only."""
    tokens = torch.zeros(batch, context_length, dtype=torch.long, device="meta")
    plain, _ = measure_saved_bytes(text, lambda: text(tokens), dtype)
    return plain


def build_bytes_per_rank(params: int, largest_layer_params: int, ranks: int, zero_init: bool,
                         dtype_bytes: int) -> int:
    """Peak parameter bytes one rank holds while the model is constructed.

    Without zero.Init: the whole model in fp32 (it is cast only by ``deepspeed.initialize``),
    in host memory. With it: the rank's 1/``ranks`` partition in the run's dtype plus the
    largest module, whole for a moment before it is partitioned (made in fp32, then cast),
    on the accelerator (or the host with parameter offload, or on CPU-only runs).
    """
    if not zero_init:
        return 4 * params
    cast = 0 if dtype_bytes == 4 else dtype_bytes
    return math.ceil(params / ranks) * dtype_bytes + largest_layer_params * (4 + cast)


def check_whole_nodes(gpus: int, gpus_per_node: int) -> None:
    """Refuse (ValueError) a GPU count that fills no whole number of nodes: DeepSpeed's
    estimators count GPUs per node x nodes, so 10 GPUs at 8 a node were estimated as 16,
    understating every GPU's share of the model states."""
    if gpus > gpus_per_node and gpus % gpus_per_node:
        fits = max(d for d in range(1, gpus_per_node + 1) if gpus % d == 0)
        raise ValueError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node "
                         f"{gpus_per_node}: give the GPUs per node the job uses (e.g. "
                         f"--gpus-per-node {fits})")


def estimate(
    model_name: str, gpus: int = 8, gpus_per_node: int = 8, zero_stage: int = 3,
    image_size: int = 224, batch_per_gpu: int = 16, activation_checkpointing: bool = True,
    offload: bool = False, dtype: torch.dtype = torch.bfloat16, **model_overrides,
) -> MemoryEstimate:
    """Plan memory for ``model_name`` trained on ``gpus`` GPUs with ZeRO ``zero_stage``."""
    if gpus < 1 or gpus_per_node < 1:
        raise ValueError("gpus and gpus_per_node must be >= 1")
    check_whole_nodes(gpus, gpus_per_node)
    with torch.device("meta"):
        model = build_model(model_name, **model_overrides)
    params = sum(p.numel() for p in model.parameters())
    largest = largest_layer_params(model)
    zero_init = zero_stage == 3  # what pretrain/engine.py does
    gpu, cpu = model_state_bytes(params, largest, gpus, gpus_per_node, zero_stage, offload,
                                 zero_init)
    # DeepSpeed's defaults, with pre-training's overlap_comm (its config leaves the reduce
    # bucket at DeepSpeed's default)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    buffers = zero_buffer_bytes(params, {"stage": zero_stage, "overlap_comm": True},
                                dtype.itemsize, reduce_bytes(precision))
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
        reduce_bucket_per_gpu=buffers["reduce_bucket"],
        live_parameters_per_gpu=buffers["live_parameters"], zero_init=zero_init,
        model_build_per_rank=build_bytes_per_rank(params, largest, gpus, zero_init,
                                                  dtype.itemsize),
    )
