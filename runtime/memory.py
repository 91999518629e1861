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
                      zero_stage: int, offload: bool, zero_init: bool = True,
                      offload_param: bool | None = None) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) of model states, by DeepSpeed's estimators;
    stage 0: mixed-precision AdamW without ZeRO (16-bit params+grads, fp32 master+moments).

    ``offload``: the optimizer states live in host memory (``offload_optimizer``);
    ``offload_param``: under ZeRO-3 the 16-bit parameter partitions too (None: as
    ``offload``). ``zero_init``: stage 3 builds the model partitioned
    (``deepspeed.zero.Init``); without it every GPU's process first builds the whole fp32
    model in host memory."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage must be 0..3, got {zero_stage}")
    if offload and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3 (DeepSpeed's CPU Adam "
                         "steps host parameters, which stage 0 does not keep)")
    offload_param = offload if offload_param is None else offload_param
    per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    if zero_stage == 3 and offload_param and not offload:
        # outside DeepSpeed's estimator (it models parameter offload only with optimizer
        # offload): its no-offload figure with the 16-bit partition (2 bytes of its 18 per
        # parameter) moved to each node's host memory (with its 1.5 buffer factor)
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params, per_node, nodes, cpu_offload=False,
            zero_init=zero_init)
        partition = math.ceil(params / (per_node * nodes))
        return int(gpu - 2 * partition), int(cpu + 2 * partition * per_node * 1.5)
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params, per_node, nodes, cpu_offload=offload,
            cpu_offload_params=offload_param, zero_init=zero_init)
    elif zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes,
                                                         cpu_offload=offload)
        if zero_stage == 1:  # gradients are not partitioned: add fp16 grads minus their shard
            gpu += int(2 * params * (1 - 1 / (per_node * nodes)))
    else:
        cpu, gpu = 0, 18 * params
    return int(gpu), int(cpu)


def zero_buffer_bytes(params: int, zero_config: dict, dtype_bytes: int,
                      bucket_bytes: int | None = None) -> dict[str, int]:
    """GPU bytes ZeRO holds beyond DeepSpeed's model-state estimate, for ``params``
    parameters and the run's ``zero_optimization`` settings (its ``stage``; DeepSpeed's
    defaults where unset), in the 16-bit dtype's ``dtype_bytes``:

    - ``reduce_bucket``: the gradient-reduction buffers, ``reduce_bucket_size`` elements
      each, allocated whole when ``contiguous_gradients`` is on (its default). ZeRO-3: one,
      in the reduction's dtype (``bucket_bytes`` each, default ``dtype_bytes``; fp32 under
      bf16: :func:`runtime.ds_config.reduce_bytes`). ZeRO-1/2: one per reduction dtype, two
      with ``overlap_comm`` (double buffering), in the parameters' dtype (measured,
      DeepSpeed 0.19.8: ``stage_1_and_2.setup_buckets`` under bf16 with fp32 communication
      stages bf16 buffers). Stage 0: none.
    - ``live_parameters``: ZeRO-3's gathered parameters. DeepSpeed 0.19.8 keeps every
      parameter it gathers in the forward gathered until the backward reaches it (measured
      on 2 ranks, with and without activation checkpointing, whatever
      ``stage3_max_reuse_distance`` and ``stage3_prefetch_bucket_size``:
      tests/test_zero_init.py; cf. DeepSpeed issue #7670): by the end of the forward every
      GPU holds the whole 16-bit model. Other stages keep the whole model anyway (in the
      model states).
    """
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zc = DeepSpeedZeroConfig(**zero_config)
    stage = int(zc.stage)
    bucket = zc.reduce_bucket_size if zc.contiguous_gradients and stage else 0
    if stage == 3:
        bucket_bytes = dtype_bytes if bucket_bytes is None else bucket_bytes
        return {"reduce_bucket": int(bucket * bucket_bytes),
                "live_parameters": params * dtype_bytes}
    buffers = 2 if zc.overlap_comm else 1
    return {"reduce_bucket": int(bucket * buffers * dtype_bytes), "live_parameters": 0}
