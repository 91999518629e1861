"""Model-state memory of a training job under DeepSpeed: what weights, gradients and AdamW
moments cost per GPU (and in host memory per node) for a ZeRO stage.

The arithmetic is DeepSpeed's own (its ZeRO estimators), so it lives here above models/:
models/memory.py keeps only what a model alone determines (parameter counts, activations
measured on the meta device) and never imports DeepSpeed (ARCHITECTURE.md).
"""

from __future__ import annotations

import math

# fp32 weights + fp32 gradients + AdamW's two fp32 moments: plain (DDP) fine-tuning with
# bf16 autocast keeps all four per parameter on every GPU.
DDP_ADAMW_BYTES_PER_PARAM = 16


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
