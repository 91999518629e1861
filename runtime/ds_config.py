"""The one DeepSpeed config builder, used by pre-training and every fine-tuning task.

A task maps its typed config onto :class:`DeepSpeedSpec` (the settings that matter) and
calls :func:`deepspeed_config`; a user's JSON file (``extra_json``) is merged over the
result, key by key, for anything else DeepSpeed offers.

The optimizer and the schedule are ours (torch AdamW over our param groups, passed to
``deepspeed.initialize``), hence ``zero_allow_untested_optimizer``; only optimizer offload
needs DeepSpeed's own optimizer (its CPU Adam), configured from ``offload_adamw``.

Activation checkpointing is a model switch (``with_cp`` / ``model.checkpointing``), applied
by torch.utils.checkpoint inside the model: DeepSpeed's ``activation_checkpointing``
section configures only ``deepspeed.checkpointing``, which no task calls, so it is not
generated (a JSON file may still set it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
# the dtype gradients are reduced across ranks in, per run precision (DeepSpeed's
# communication_data_type; fp16 keeps DeepSpeed's own, scaled by the loss scale)
REDUCE_DTYPES = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp16"}
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def reduce_bytes(precision: str, config: dict[str, Any] | None = None) -> int:
    """Bytes per element of the gradients reduced across ranks, the element size of
    ZeRO-3's reduce bucket: a DeepSpeed ``config``'s ``communication_data_type`` where it
    has one (a user's JSON may set it), else this ``precision``'s (``REDUCE_DTYPES``)."""
    name = (config or {}).get("communication_data_type") or REDUCE_DTYPES[precision]
    return _BYTES[str(name).lower()]


@dataclass(frozen=True)
class AdamWParams:
    """What DeepSpeed's CPU Adam needs when the optimizer is offloaded."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass(frozen=True)
class DeepSpeedSpec:
    """The DeepSpeed settings a task controls. ``extra_json_key`` names the config key
    the JSON file came from, so an error points at what the user wrote."""

    micro_batch: int
    zero_stage: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0: off
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int | None = None  # ZeRO-3; None: DeepSpeed's default
    param_persistence_threshold: int | None = None  # ZeRO-3; None: DeepSpeed's default
    offload_optimizer: bool = False
    offload_param: bool = False
    offload_adamw: AdamWParams | None = None  # required with offload_optimizer
    extra_json: str | None = None
    extra_json_key: str = "deepspeed_config"

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch and grad_accum must be >= 1, got "
                             f"{self.micro_batch} and {self.grad_accum}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (DeepSpeed's CPU "
                             "Adam steps host parameters, which stage 0 keeps on the GPU)")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.offload_adamw is None:
            raise ValueError("offload_optimizer needs offload_adamw (DeepSpeed's CPU Adam "
                             "is configured in the DeepSpeed config)")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged over it, nested dicts key by key (neither mutated)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _zero_section(spec: DeepSpeedSpec) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": spec.zero_stage, "overlap_comm": spec.overlap_comm,
                            "contiguous_gradients": spec.contiguous_gradients}
    if spec.zero_stage == 3:
        if spec.prefetch_bucket_size is not None:
            zero["stage3_prefetch_bucket_size"] = spec.prefetch_bucket_size
        if spec.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = spec.param_persistence_threshold
        # exact fp32 weights on save come from the optimizer shards (zero_to_fp32 /
        # internimage convert): no 16-bit gather needed
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def _read_extra(spec: DeepSpeedSpec) -> dict[str, Any]:
    path = Path(spec.extra_json)
    if not path.is_file():
        raise ValueError(f"{spec.extra_json_key}: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{spec.extra_json_key}: {path} is not valid JSON: {err}") from None


def deepspeed_config(spec: DeepSpeedSpec) -> dict[str, Any]:
    """DeepSpeed's JSON config for ``spec`` (with ``spec.extra_json`` merged over it)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": _zero_section(spec),
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # Every rank must save under one tag; DeepSpeed compares the tag's hash over the
        # ranks at each save anyway (two all-reduces) and by default only warns: a save
        # whose ranks disagree on the step would publish rank 0's files alone as complete
        "checkpoint": {"tag_validation": "FAIL"},
    }
    # Gradients are reduced across ranks in fp32 under bf16 (DeepSpeed's default for bf16
    # is bf16: 8 significant bits, rounded at every step of the reduction over hundreds of
    # ranks; Megatron-LM reduces bf16 runs' gradients in fp32 too,
    # --accumulate-allreduce-grads-in-fp32). Twice the gradient traffic and reduce bucket.
    config["communication_data_type"] = REDUCE_DTYPES[spec.precision]
    if spec.precision != "fp32":
        # DeepSpeed casts parameters to 16 bits but leaves buffers as built (fp32) unless
        # told otherwise: a BatchNorm then meets 16-bit weights and the first forward fails
        # ("expected scalar type BFloat16 but found Float"). Every floating buffer follows
        # the parameters' dtype (DeepSpeed's data_types config).
        config["data_types"] = {"buffer_dtype": spec.precision}
        if spec.precision == "bf16" and spec.zero_stage == 3:
            # ZeRO-3 casts the reduced gradient to its accumulation dtype (the model's,
            # bf16, unless set): the fp32 reduction above would be rounded right after it
            # (deepspeed/runtime/zero/stage3.py __avg_scatter_*grads). fp32 partitions cost
            # 4 bytes per parameter / ranks. Not for stages 1-2: there DeepSpeed takes bf16
            # weights with fp32 accumulation as a different optimizer (BF16_Optimizer, its
            # own checkpoint files); they keep one rounding after the fp32 reduction.
            config["data_types"]["grad_accum_dtype"] = "fp32"
    if spec.offload_optimizer:
        opt = spec.offload_adamw
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
            "weight_decay": opt.weight_decay}}
    if spec.extra_json:
        config = merge(config, _read_extra(spec))
    return config
