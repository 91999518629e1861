"""The DeepSpeed config, generated from our typed config (optionally merged with a JSON file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.config import PretrainConfig


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def deepspeed_config(cfg: PretrainConfig, micro_batch: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for this run.

    The optimizer and scheduler are ours (torch AdamW with per-group lr multipliers and a
    LambdaLR schedule), passed to ``deepspeed.initialize``; hence
    ``zero_allow_untested_optimizer``. Offloading the optimizer switches to DeepSpeed's
    CPU Adam, the only optimizer its offload path runs.
    """
    eng = cfg.engine
    zero: dict[str, Any] = {
        "stage": eng.zero_stage,
        "overlap_comm": eng.overlap_comm,
        "contiguous_gradients": eng.contiguous_gradients,
    }
    if eng.zero_stage == 3:
        zero |= {"stage3_prefetch_bucket_size": eng.prefetch_bucket_size,
                 "stage3_param_persistence_threshold": eng.param_persistence_threshold,
                 # exact copies of fp32 weights on save: convert/zero_to_fp32 needs none
                 "stage3_gather_16bit_weights_on_model_save": False}
    if eng.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if eng.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": eng.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": eng.precision == "bf16"},
        "fp16": {"enabled": eng.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if eng.precision != "fp32":
        # DeepSpeed casts parameters to 16 bits but leaves buffers as built (fp32) unless
        # told otherwise: the T..XL head's BatchNorm then meets 16-bit weights and the
        # first forward fails ("expected scalar type BFloat16 but found Float"). Every
        # floating buffer follows the parameters' dtype (DeepSpeed's data_types config).
        config["data_types"] = {"buffer_dtype": eng.precision}
    if eng.offload_optimizer:
        opt = cfg.optim
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
            "weight_decay": opt.weight_decay}}
    if eng.deepspeed_config:
        path = Path(eng.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"engine.deepspeed_config: file not found: {path}")
        try:
            config = _merge(config, json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"engine.deepspeed_config: {path} is not valid JSON: {err}") from None
    return config
