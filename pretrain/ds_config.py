"""Pre-training's DeepSpeed config: its typed ``engine`` section mapped onto the one
builder every task uses (runtime/ds_config.py)."""

from __future__ import annotations

from typing import Any

from pretrain.config import PretrainConfig
from runtime.ds_config import AdamWParams, DeepSpeedSpec
from runtime.ds_config import deepspeed_config as build_deepspeed_config


def deepspeed_spec(cfg: PretrainConfig, micro_batch: int) -> DeepSpeedSpec:
    """The DeepSpeed settings of a pre-training run."""
    eng, opt = cfg.engine, cfg.optim
    return DeepSpeedSpec(
        micro_batch=micro_batch, zero_stage=eng.zero_stage, precision=eng.precision,
        grad_accum=eng.grad_accum, grad_clip=opt.grad_clip, overlap_comm=eng.overlap_comm,
        contiguous_gradients=eng.contiguous_gradients,
        prefetch_bucket_size=eng.prefetch_bucket_size,
        param_persistence_threshold=eng.param_persistence_threshold,
        offload_optimizer=eng.offload_optimizer, offload_param=eng.offload_param,
        offload_adamw=AdamWParams(opt.lr, tuple(opt.betas), opt.eps, opt.weight_decay),
        extra_json=eng.deepspeed_config, extra_json_key="engine.deepspeed_config")


def deepspeed_config(cfg: PretrainConfig, micro_batch: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for this run (``engine.deepspeed_config`` merged over it)."""
    return build_deepspeed_config(deepspeed_spec(cfg, micro_batch))
