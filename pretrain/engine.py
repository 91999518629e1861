"""Pre-training's engine: the network, its DeepSpeed engine (AdamW groups, warm-up + cosine
schedule), the M3I momentum teacher, and what a checkpoint's compatibility is judged by
(model hash, step count, precision check). pretrain/trainer.py runs them on the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import torch

from pretrain.config import PretrainConfig
from pretrain.ds_config import deepspeed_config
from pretrain.m3i_model import M3IModel
from runtime.loop import RefusedStart
from runtime.schedules import warmup_cosine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


TEACHER_KEY = "m3i_ema_teacher"  # the EMA target encoder's slices in DeepSpeed's client state


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_hash(cfg: PretrainConfig, num_tags: int) -> str:
    """What a checkpoint's tensors depend on: model, text tower, context, tag count (and,
    with the image branch on, its decoder and target encoder)."""
    parts = [dataclasses.asdict(cfg.model), cfg.text.hashed(),
             cfg.data.context_length, num_tags]
    if cfg.objective.image.enabled:  # absent when off: earlier runs keep their hash
        parts.append({"image_branch": cfg.objective.image.decoder_spec()})
    return _hash(parts)


def global_batch(cfg: PretrainConfig, world_size: int) -> int:
    """Samples one optimizer step reads over all ranks."""
    return cfg.data.batch_size * cfg.engine.grad_accum * world_size


def warmup_warning(warmup_steps: int, steps: int) -> str | None:
    """What to say when a run ends inside its lr warm-up (a smoke test of a long recipe:
    the H preset's 10,000 warm-up steps in a 100-step run train at <= 1% of optim.lr,
    nothing said); None otherwise."""
    if steps <= 0 or warmup_steps <= steps:
        return None
    return (f"optim.warmup_steps={warmup_steps} exceeds the run's {steps} steps: it ends "
            f"inside its warm-up, at most {steps / warmup_steps:.1%} of optim.lr; set "
            "optim.warmup_steps lower for a short run")


def _steps(first: int, last: int, one: str, many: str) -> str:
    """``step 4 trains`` / ``steps 4-5 train``."""
    return f"step {first} {one}" if first == last else f"steps {first}-{last} {many}"


def extension_warning(scheduler, steps: int, min_lr: float) -> str | None:
    """What to say when a step-based run resumed with ``run.max_steps`` past the end of its
    restored schedule (``scheduler``: ``warmup_steps``, ``total_steps``, ``min_ratio``),
    which keeps that end; None when it does not go past. Read off the schedule itself
    (runtime.schedules.warmup_cosine; training step k runs at its value at k - 1, the
    scheduler stepping after each step): past its end and its warm-up it is at
    ``optim.min_lr``; one that ended inside its warm-up (a smoke test's, extended) first
    goes on rising to ``optim.lr``, holds it a step, then drops at once."""
    end, warmup, low = scheduler.total_steps, scheduler.warmup_steps, scheduler.min_ratio
    if steps <= end:
        return None
    factor = warmup_cosine(warmup, end, low)

    def kind(k: int) -> str:
        value = factor(k - 1)
        if k - 1 >= warmup and value <= low:
            return "min"
        return "peak" if value >= 1 else "rise"

    # past both its end and its warm-up the value stays min_ratio: looked at up to there
    bound = min(steps, max(end, warmup) + 2)
    spans: list[list] = []  # [first, last, kind]
    for k in range(end + 1, bound + 1):
        if spans and spans[-1][2] == kind(k):
            spans[-1][1] = k
        else:
            spans.append([k, k, kind(k)])
    spans[-1][1] = steps
    said = {"min": f"at optim.min_lr={min_lr:g}", "peak": "at optim.lr"}
    parts = [f"{_steps(a, b, 'trains', 'train')} {said[what]}" if what in said else
             f"{_steps(a, b, 'still warms up', 'still warm up')} (step {b} at "
             f"{factor(b - 1):.2%} of optim.lr)" for a, b, what in spans]
    inside = f", inside its {warmup}-step warm-up" if end < warmup else ""
    return (f"run.max_steps={steps}, the checkpoint's schedule ends at step {end}{inside}: "
            + "; ".join(parts) + " (a step-based schedule keeps its end on resume; start a "
            "new run to re-plan it)")


def total_steps(cfg: PretrainConfig, world_size: int, step: int = 0,
                samples: int = 0) -> int:
    """Optimizer steps of the run: ``run.max_steps``, or with ``run.epochs`` the steps that
    read the planned ``epochs x samples_per_epoch`` samples.

    The epoch plan is in samples, so a run resumed at ``step`` with ``samples`` read (on
    another world size or global batch, possibly more than once) ends when the samples
    left are read at the current global batch: ``step + floor(left / global batch)``, the
    rounding of a fresh run (``step = samples = 0``; at least one step). A step-based run
    counts optimizer steps whatever each reads.
    """
    if cfg.run.epochs <= 0:
        return cfg.run.max_steps
    planned = cfg.run.epochs * cfg.run.samples_per_epoch
    per_step = global_batch(cfg, world_size)
    if step == 0:
        return max(1, int(planned / per_step))
    return step + int(max(0.0, planned - samples) / per_step)


def run_progress(cfg: PretrainConfig, step: int, samples: int, batch: int,
                 end_step: int) -> tuple[float, float]:
    """(done, total) of the run before optimizer step ``step`` (counted from 1), in the
    unit its plan counts: steps for a step-based run, samples for an epoch run, where
    ``samples`` were read once step ``step`` is taken, ``batch`` per step from here to
    ``end_step`` (:func:`total_steps`). As the lr schedule, an epoch run that changed its
    global batch on resume stays continuous in samples: the fraction does not jump, and
    reaches ``(end_step - 1) / end_step`` of its range at the last step as a fresh run's
    ``(step - 1) / end_step`` does."""
    if cfg.run.epochs <= 0:
        return float(step - 1), float(end_step)
    done = samples - batch
    return float(done), float(done + (end_step - step + 1) * batch)


def align_schedule(scheduler, step: int, end_step: int, batch: int,
                   batch_before: int) -> bool:
    """Make a restored ``WarmupCosine`` (runtime/schedules.py) at optimizer ``step`` follow
    an epoch run's plan: ``batch`` samples per step from here, the end at ``end_step``
    (:func:`total_steps`). The saved schedule knows the plan of the run that saved it
    (``batch_before`` samples per step, its end); when either differs it is re-planned in
    samples (``rebase``: lr continuous in samples, ``min_lr`` after ``end_step``). Returns
    whether it was; an unchanged plan keeps the saved schedule as it is (an exact resume).
    """
    here = scheduler.samples_at(step, batch_before)
    if (batch == batch_before
            and scheduler.end_samples(batch_before) == here + (end_step - step) * batch):
        return False
    scheduler.rebase(step, end_step, batch, batch_before)
    return True


def apply_schedule_settings(scheduler, cfg: PretrainConfig) -> None:
    """Give a restored ``WarmupCosine`` (runtime/schedules.py) this config's schedule at
    the step it was restored at, once its groups hold this config's settings again
    (runtime/param_groups.py ``apply_group_settings``).

    DeepSpeed's ``load_checkpoint`` restores the scheduler's state whole: ``base_lrs`` (the
    saved run's ``optim.lr``), ``warmup_steps`` and ``min_ratio`` (``optim.min_lr``), so a
    resume with another ``optim.lr``, ``optim.min_lr`` or ``optim.warmup_steps`` trained on
    with the checkpoint's. Here they follow the config (``base_lrs`` from the groups'
    ``initial_lr``, as a fresh build takes them) and the groups' lr is set to the value at
    the restored step: the next steps train at a fresh new-config run's lr. The position
    (``last_epoch``), the end (``total_steps``: a step-based run keeps the saved one, an
    epoch run's plan is re-planned by :func:`align_schedule`) and a re-planned schedule's
    ``samples_plan`` (whose warm-up is fixed in samples) stay the checkpoint's."""
    opt = cfg.optim
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    scheduler.warmup_steps = opt.warmup_steps
    scheduler.min_ratio = opt.min_lr / opt.lr
    scheduler._last_lr = scheduler.get_lr()
    for group, lr in zip(groups, scheduler._last_lr):
        group["lr"] = lr


def check_precision(precision: str) -> None:
    """Fail before any data or compute when this machine's accelerator cannot train in
    ``precision`` (DeepSpeed itself refuses only inside ``deepspeed.initialize``, with
    "Type fp16 is not supported on your device."). Its CPU accelerator allows fp16 only
    where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16 CPUs). Raises
    :class:`runtime.loop.RefusedStart`: the command reports it in one line, exit 2."""
    if precision == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = (accelerator.is_fp16_supported() if precision == "fp16"
                 else accelerator.is_bf16_supported())
    if not supported:
        raise RefusedStart(
            f"engine.precision={precision}: DeepSpeed's {accelerator.device_name()} "
            f"accelerator does not support {precision} on this machine; use "
            f"engine.precision=bf16 or fp32")


def _m3i_model(cfg: PretrainConfig, num_tags: int) -> M3IModel:
    return M3IModel(cfg.model.name, cfg.model.embed_dim, cfg.data.context_length,
                    cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.vocab_size,
                    num_tags, cfg.objective.init_temperature, with_cp=cfg.model.checkpointing(),
                    decoder=cfg.objective.image.decoder_spec(), text_arch=cfg.text.arch,
                    **cfg.model.overrides())


def build_model(cfg: PretrainConfig, num_tags: int) -> M3IModel:
    """The pre-training network (identical initial weights on every rank: seeded).

    Under ZeRO-3 it is built inside ``deepspeed.zero.Init`` (pretrain/zero_init.py): each
    rank only ever holds its 1/N share of the parameters plus the module being built, in
    the run's precision, never the whole model; the weights are a plain build's with the
    same seed. Needs the process group (``init_distributed``) for ZeRO-3.
    """
    torch.manual_seed(cfg.run.seed)
    if cfg.engine.zero_stage != 3:
        return _m3i_model(cfg, num_tags)
    from pretrain.zero_init import partitioned_construction

    with partitioned_construction(deepspeed_config(cfg, cfg.data.batch_size)):
        return _m3i_model(cfg, num_tags)


def build_engine(cfg: PretrainConfig, model: M3IModel, steps: int):
    """(DeepSpeed engine, its config) with our AdamW groups and warm-up + cosine schedule.

    The groups are runtime/param_groups.py's with no layer decay (every parameter at scale 1, the
    DCN offset layers at ``optim.dcn_lr_mult``); each starts at the base lr and
    ``WarmupCosine`` multiplies its ``lr_scale`` in. DeepSpeed owns the scheduler, so its
    state is saved and restored with every checkpoint.
    """
    import deepspeed

    from runtime.param_groups import adamw, param_groups, start_at_base_lr
    from runtime.schedules import WarmupCosine

    opt = cfg.optim
    ds_config = deepspeed_config(cfg, cfg.data.batch_size)
    groups = start_at_base_lr(param_groups(model, opt.weight_decay,
                                           dcn_lr_mult=opt.dcn_lr_mult), opt.lr)
    if cfg.engine.offload_optimizer:  # DeepSpeed's CPU Adam, configured in ds_config
        optimizer, params = None, groups
    else:
        optimizer, params = adamw(groups, opt.lr, opt.betas, opt.eps), None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params,
        lr_scheduler=lambda o: WarmupCosine(o, opt.warmup_steps, steps, opt.min_lr / opt.lr),
        config=ds_config, dist_init_required=False)
    return engine, ds_config


def build_teacher(cfg: PretrainConfig, engine, ds_config: dict[str, Any]):
    """The image branch's momentum target encoder (pretrain/m3i/ema.py), starting as an
    exact copy of the online image tower. Under ZeRO-3 it is built under zero.Init in the
    run's precision and partitioned like the online tower (the fp32 moving average kept
    beside it); else a plain fp32 module. Its forward autocasts to the online run's 16-bit
    type (``ds_config``'s bf16/fp16 section)."""
    from models import build_model as build_backbone
    from pretrain.m3i.ema import (
        MomentumTeacher,
        TargetEncoder,
        teacher_autocast_dtype,
        teacher_ds_config,
    )

    def encoder() -> TargetEncoder:
        # no activation checkpointing: the teacher runs without gradient
        return TargetEncoder(build_backbone(cfg.model.name, num_classes=0, with_cp=False,
                                            **cfg.model.overrides()),
                             autocast_dtype=teacher_autocast_dtype(ds_config))

    if cfg.engine.zero_stage == 3:
        from pretrain.zero_init import partitioned_construction

        config = teacher_ds_config(ds_config)
        with partitioned_construction(config):
            teacher = MomentumTeacher(encoder(), engine.module, config)
    else:
        teacher = MomentumTeacher(encoder().to(engine.device), engine.module)
    teacher.update(0.0)
    return teacher


@torch.no_grad()
def clamp_logit_scale(engine, max_logit_scale: float) -> None:
    """Clamp the model's log inverse temperature to [0, ln ``max_logit_scale``] in place,
    on every copy DeepSpeed keeps of it: call after each optimizer step.

    open_clip clamps the parameter, not exp(parameter) in the forward, after each step
    (open_clip 3.3.0, src/open_clip_train/train.py: ``logit_scale.clamp_(0,
    math.log(100))``): the gradient stays intact, so a temperature driven to the bound
    can come back. The master is fp32 while the forward reads a 16-bit copy, so both are
    clamped, each rank on what it holds, with no communication and one element's work:

    - ZeRO-3: this rank's fp32 master slice (DeepSpeed's local API,
      ``safe_get/set_local_fp32_param``, offload included), its 16-bit slice
      (``ds_tensor``) and the whole gathered copy, which DeepSpeed keeps between steps for
      parameters under ``stage3_param_persistence_threshold`` (empty otherwise);
    - ZeRO 1/2 and DeepSpeed's bf16 optimizer: this rank's fragment of the fp32 master,
      if it holds one (``_hp_mapping``), and the whole 16-bit parameter every rank keeps;
    - 16-bit weights without ZeRO (bf16 or fp16 at stage 0 with our torch AdamW):
      DeepSpeed's ``FP16_UnfusedOptimizer`` keeps one fp32 master per parameter
      (deepspeed/runtime/fp16/unfused_optimizer.py ``fp32_groups``, copied into the
      16-bit weights after every step; no ``_hp_mapping``): it is clamped there (before,
      it drifted past the bound and was copied back every step);
    - otherwise (fp32 without a ZeRO optimizer) the parameter is the master.

    Clamping commutes with rounding to 16 bits (both monotone; torch rounds the bounds to
    the tensor's dtype), so each copy ends as DeepSpeed would derive it from the clamped
    master at its next step.

    Then, where the forward reads a 16-bit copy, the clamped master's value itself is
    handed to it (``M3IModel.exact_logit_scale``): DeepSpeed's
    ``safe_get_full_fp32_param``, one all-reduce of one element over the ranks a step.
    """
    param = engine.module.logit_scale
    low, high = 0.0, math.log(max_logit_scale)
    unfused = None  # the unfused optimizer's master, where it holds one
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            safe_set_local_fp32_param(param, master.clamp(low, high))
        param.ds_tensor.clamp_(low, high)
    elif getattr(param, "_hp_mapping", None) is not None:
        param._hp_mapping.get_hp_fragment().clamp_(low, high)
    elif param.dtype != torch.float32 and not engine.zero_optimization():
        from runtime.master_slices import unfused_master

        unfused = unfused_master(engine, param)
        unfused.data.clamp_(low, high)
    param.data.clamp_(low, high)
    if param.dtype != torch.float32:  # a 16-bit copy: the forward takes the master's value
        from deepspeed.utils import safe_get_full_fp32_param

        # (collective under ZeRO)
        exact = unfused if unfused is not None else safe_get_full_fp32_param(param)
        engine.module.exact_logit_scale = (None if exact is None
                                           else exact.detach().float().reshape(1))
