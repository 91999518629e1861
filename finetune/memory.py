"""The per-GPU memory line of the fine-tuning dry runs: model states (AdamW, DDP or ZeRO;
runtime/memory.py) plus activations measured on the meta device (models/memory.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.memory import GiB, largest_layer_params, measure_saved_bytes
from runtime.ds_config import reduce_bytes
from runtime.memory import DDP_ADAMW_BYTES_PER_PARAM, model_state_bytes, zero_buffer_bytes

ASSUMED_GPUS = 8  # ZeRO shards over the data-parallel group; a dry run does not know its size


def memory_estimate(model: nn.Module, run: Callable[[torch.dtype], object], *, precision: str,
                    checkpointing: bool, zero_stage: int = 0, ema: bool = False,
                    training_probe: bool = True, weights: str = "fp32") -> dict[str, float]:
    """GiB per GPU: ``states`` (weights, gradients, AdamW moments, EMA copy), ``buffers``
    (under ZeRO its gradient-reduction buffers and, at stage 3, the parameters it gathers:
    runtime.memory.zero_buffer_bytes; 0 without), ``activations`` (what autograd keeps for
    backward of ``run(dtype)``, which feeds the model meta inputs of the probe's ``dtype``, with or
    without block checkpointing) and ``total``. ``weights``: the engine's weight precision
    (classification's bf16 engine; the dense tasks autocast over fp32 weights). ``model``
    must be on the meta device and is consumed (cast to that dtype for the probe)."""
    params = sum(p.numel() for p in model.parameters())
    buffers = 0
    if zero_stage:
        states, _ = model_state_bytes(params, largest_layer_params(model), ASSUMED_GPUS,
                                      ASSUMED_GPUS, zero_stage, offload=False)
        # overlap_comm: on wherever CUDA is (finetune/zero.py, finetune/loop.py)
        buffers = sum(zero_buffer_bytes(params, {"stage": zero_stage, "overlap_comm": True},
                                        2 if weights == "bf16" else 4,
                                        reduce_bytes(weights)).values())
    else:
        states = DDP_ADAMW_BYTES_PER_PARAM * params
    # the EMA of the fp32 masters, each rank its part (finetune/ema.py): partitioned as
    # ZeRO partitions them, whole at stage 0; under ZeRO an evaluation or a save assembles
    # the whole fp32 model on every rank (the training step's activations are freed by
    # then): the peak is the larger of the two
    states += (4 * params / (ASSUMED_GPUS if zero_stage else 1)) if ema else 0
    assembled = 4 * params if ema and zero_stage else 0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    plain, ckpt = measure_saved_bytes(model, lambda: run(dtype), dtype, training=training_probe)
    activations = ckpt if checkpointing else plain
    return {"states": states / GiB, "buffers": buffers / GiB, "activations": activations / GiB,
            "ema_assembled": assembled / GiB,
            "total": (states + buffers + max(activations, assembled)) / GiB}


def describe(est: dict[str, float], batch: int, size: tuple[int, int], checkpointing: bool,
             zero_stage: int = 0, scope: str = "") -> str:
    """One dry-run line for ``memory_estimate``'s result."""
    states = f"ZeRO-{zero_stage} over {ASSUMED_GPUS} GPUs" if zero_stage else "DDP AdamW"
    cp = "with" if checkpointing else "without"
    buffers = f" + ZeRO buffers {est['buffers']:.2f}" if est.get("buffers") else ""
    ema = (f"; while an evaluation or a save assembles the EMA: {est['ema_assembled']:.2f} "
           "in their place" if est.get("ema_assembled") else "")
    return (f"~{est['total']:.2f} GiB = states {est['states']:.2f} ({states}){buffers} + "
            f"activations {est['activations']:.2f} (batch {batch} at {size[0]}x{size[1]}, {cp} "
            f"checkpointing{'; ' + scope if scope else ''}; measured on the meta device){ema}")
