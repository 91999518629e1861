"""The pre-training loop: DeepSpeed engine, M3I-style loss, metrics, checkpoints, resume.

Runs unchanged on one process, under torchrun and under SLURM; CPU (gloo) or GPU (NCCL).
A resumed run continues exactly: model, optimizer, scheduler (DeepSpeed's checkpoint),
every rank's RNG and data position (``trainer_state.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import (
    ResumeError,
    check_compatible,
    load_trainer_state,
    read_latest,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.config import PretrainConfig
from pretrain.distributed import DistInfo, all_gather_objects, any_rank, init_distributed
from pretrain.ds_config import deepspeed_config
from pretrain.m3i_model import M3IModel
from pretrain.metrics import MetricsLogger
from pretrain.objectives import M3ILoss
from pretrain.optim import build_optimizer, param_groups, warmup_cosine
from runtime.preemption import STOP_REQUESTED  # the one stop flag (set by launchers)
from runtime.redact import config_hash

log = logging.getLogger(__name__)
# DeepSpeed calls collectives torch has renamed; one warning per step drowns the progress bar.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and the run is configured to stop."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_hash(cfg: PretrainConfig, num_tags: int) -> str:
    """What a checkpoint's tensors depend on: model, text tower, context, tag count."""
    return _hash([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.text),
                  cfg.data.context_length, num_tags])


def total_steps(cfg: PretrainConfig, world_size: int) -> int:
    """Optimizer steps of the run (from epochs when configured)."""
    if cfg.run.epochs > 0:
        per_step = cfg.data.batch_size * cfg.engine.grad_accum * world_size
        return max(1, int(cfg.run.epochs * cfg.run.samples_per_epoch / per_step))
    return cfg.run.max_steps


def check_precision(precision: str) -> None:
    """Fail before any data or compute when this machine's accelerator cannot train in
    ``precision`` (DeepSpeed itself refuses only inside ``deepspeed.initialize``, with
    "Type fp16 is not supported on your device."). Its CPU accelerator allows fp16 only
    where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16 CPUs)."""
    if precision == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = (accelerator.is_fp16_supported() if precision == "fp16"
                 else accelerator.is_bf16_supported())
    if not supported:
        raise ValueError(
            f"engine.precision={precision}: DeepSpeed's {accelerator.device_name()} "
            f"accelerator does not support {precision} on this machine; use "
            f"engine.precision=bf16 or fp32")


def _m3i_model(cfg: PretrainConfig, num_tags: int) -> M3IModel:
    return M3IModel(cfg.model.name, cfg.model.embed_dim, cfg.data.context_length,
                    cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.vocab_size,
                    num_tags, cfg.objective.init_temperature, cfg.objective.max_logit_scale,
                    with_cp=cfg.model.checkpointing(), **cfg.model.overrides())


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
    """(DeepSpeed engine, its config) with our AdamW groups and warm-up + cosine schedule."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    opt = cfg.optim
    ds_config = deepspeed_config(cfg, cfg.data.batch_size)
    schedule = warmup_cosine(opt.warmup_steps, steps, opt.min_lr / opt.lr)
    if cfg.engine.offload_optimizer:  # DeepSpeed's CPU Adam, configured in ds_config
        optimizer, params = None, param_groups(model, opt.lr, opt.weight_decay,
                                                 opt.dcn_offset_lr_mult)
    else:
        optimizer = build_optimizer(model, opt.lr, opt.weight_decay, opt.betas, opt.eps,
                                    opt.dcn_offset_lr_mult)
        params = None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params,
        lr_scheduler=lambda o: LambdaLR(o, schedule), config=ds_config,
        dist_init_required=False)
    return engine, ds_config


def _seed_rank(seed: int, rank: int) -> None:
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist(), strict=True))


def _merge_counts(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, dict):
                out[key] = _merge_counts([out.get(key, {}), value])
            else:
                out[key] = out.get(key, 0) + value
    return out


class Trainer:
    """One pre-training run (construct on every rank, then call :meth:`fit`)."""

    def __init__(self, cfg: PretrainConfig, resume: str | None = None):
        from pretrain.data import build_loader
        from pretrain.data.decode import TagVocab

        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.info: DistInfo = init_distributed()
        check_precision(cfg.engine.precision)
        num_tags = len(TagVocab.load(cfg.data.tag_vocab))
        self.model_hash = model_hash(cfg, num_tags)
        self.config_hash = config_hash(cfg)  # without credentials: a rotated key is the same run
        self.total_steps = total_steps(cfg, self.info.world_size)
        # Everything that can refuse a resume is checked before any compute.
        self.resume_dir = resolve_resume(resume, self.ckpt_root)
        if not resume and read_latest(self.ckpt_root):
            # Starting afresh here would overwrite a run's checkpoints: never lose a run.
            raise ResumeError(
                f"{self.run_dir} already holds a run (checkpoints/latest = "
                f"{read_latest(self.ckpt_root)}); continue it with --resume auto, or pass "
                f"another --output-dir")
        self.state: dict[str, Any] | None = None
        if self.resume_dir is not None:
            self.state = load_trainer_state(self.resume_dir)
            check_compatible(self.state, self.model_hash, self.info.world_size, self.resume_dir)
        rank_state = self.state["ranks"][self.info.rank] if self.state else None
        self.loader = build_loader(cfg.data, self.info.rank, self.info.world_size, train=True,
                                   state=rank_state["data"] if rank_state else None)
        self.dtype = DTYPES[cfg.engine.precision]
        self.loss_fn = M3ILoss(cfg.objective.image_text_weight, cfg.objective.tag_weight,
                               cfg.objective.gather_with_grad)
        self.engine, self.ds_config = build_engine(cfg, build_model(cfg, num_tags),
                                                   self.total_steps)
        self.step = 0
        self.nonfinite_skipped = 0
        if self.state is not None:
            self._restore()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "deepspeed_config.json").write_text(
                json.dumps(self.ds_config, indent=2) + "\n")

    def _restore(self) -> None:
        assert self.resume_dir is not None and self.state is not None
        path, _ = self.engine.load_checkpoint(str(self.resume_dir.parent),
                                              tag=self.resume_dir.name)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load {self.resume_dir}")
        self.step = int(self.state["step"])
        self.nonfinite_skipped = int(self.state.get("nonfinite_skipped", 0))
        if self.info.is_main:
            log.info("resumed from %s at step %d", self.resume_dir, self.step)

    # ----------------------------------------------------------------------------------
    def _save(self) -> Path:
        per_rank_stats = all_gather_objects(self.loader.stats.to_dict())
        shared = {"step": self.step, "world_size": self.info.world_size,
                  "config_hash": self.config_hash, "model_hash": self.model_hash,
                  "samples_seen": _merge_counts([s.get("samples", {}) for s in per_rank_stats]),
                  "nonfinite_skipped": self.nonfinite_skipped, "saved_at": time.time()}
        local = {"rng": rng_state(), "data": self.loader.state_dict()}
        return save_checkpoint(self.engine, self.ckpt_root, self.step, local, shared, self.info,
                               self.cfg.run.keep_last)

    def _batch_to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.info.device
        return {"images": batch["images"].to(dev, self.dtype, non_blocking=True),
                "tokens": batch["tokens"].to(dev), "has_text": batch["has_text"].to(dev),
                "tag_targets": batch["tag_targets"].to(dev), "has_tags": batch["has_tags"].to(dev)}

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, float]:
        image, text, tags, scale = self.engine(batch["images"], batch["tokens"])
        loss, terms = self.loss_fn(image.float(), text.float(), tags.float(), scale.float(),
                                   batch["has_text"], batch["tag_targets"], batch["has_tags"])
        return loss, terms, float(scale.detach())

    def _zero_shot(self) -> dict[str, float]:
        from pretrain.zeroshot import evaluate

        zs = self.cfg.zero_shot
        if not zs.urls or not zs.class_names:
            return {}
        return evaluate(self.engine, self.loader.tokenizer, zs, self.cfg.data, self.info.rank,
                        self.info.world_size, self.info.device, self.dtype)

    def _data_stats(self) -> dict[str, Any]:
        merged = _merge_counts(all_gather_objects(self.loader.stats.to_dict()))
        samples = merged.get("samples", {})
        total = sum(samples.values()) or 1
        return {"skipped": merged.get("skipped", {}),
                "source_mix": {k: v / total for k, v in samples.items()}}

    def _skip_step(self) -> None:
        """Count a step skipped for a non-finite loss and keep the lr schedule on the step
        counter: DeepSpeed steps the scheduler only in ``engine.step()``, which a skipped
        step never reaches, so without this the lr of step k would be schedule(k - skips).
        The periodic work of the step (zero-shot, checkpoint, stop request) still runs."""
        self.nonfinite_skipped += 1
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()
        log.warning("non-finite loss at step %d: step skipped (%d so far)", self.step,
                    self.nonfinite_skipped)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or stop on a non-finite loss); return the final metrics."""
        cfg, info = self.cfg, self.info
        accum = cfg.engine.grad_accum
        metrics = MetricsLogger(self.run_dir, info.is_main, self.total_steps, self.step,
                                cfg.run.tensorboard, cfg.run.progress)
        batches = iter(self.loader)
        # RNG last: creating the loader's iterator draws from torch's RNG.
        if self.state is not None:
            set_rng_state(self.state["ranks"][info.rank]["rng"])
        else:
            _seed_rank(cfg.run.seed, info.rank)
        window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        last: dict[str, Any] = {}
        saved_step = self.step
        try:
            while self.step < self.total_steps:
                losses, term_sums, skip = [], {}, False
                for _ in range(accum):
                    t0 = time.perf_counter()
                    batch = self._batch_to_device(next(batches))
                    data_wait += time.perf_counter() - t0
                    loss, terms, scale = self._micro_step(batch)
                    if any_rank(not bool(torch.isfinite(loss)), info.device):
                        if cfg.run.on_nonfinite == "stop":
                            raise NonFiniteLossError(
                                f"non-finite loss ({loss.item()}) at step {self.step + 1}; "
                                f"stopping without saving (last good checkpoint kept). Set "
                                f"run.on_nonfinite=skip to skip such steps instead")
                        skip = True
                        break
                    self.engine.backward(loss)
                    self.engine.step()
                    losses.append(loss.item())
                    for k, v in terms.items():
                        term_sums[k] = term_sums.get(k, 0.0) + v.item()
                self.step += 1
                window_steps += 1
                if skip:
                    self._skip_step()
                else:
                    values = _mean_over_ranks(
                        {"loss": sum(losses) / accum}
                        | {k: v / accum for k, v in term_sums.items()}, info.device)
                if not skip and (self.step % cfg.run.log_every == 0
                                 or self.step == self.total_steps):
                    elapsed = time.perf_counter() - window_start
                    images = window_steps * accum * cfg.data.batch_size
                    lr = self.engine.get_lr()[0]
                    last = values | {
                        "lr": lr, "temperature": 1.0 / scale, "logit_scale": scale,
                        "images_per_s": images * info.world_size / elapsed,
                        "images_per_s_per_device": images / elapsed,
                        "data_wait": data_wait / elapsed,
                        "nonfinite_skipped": self.nonfinite_skipped,
                    } | self._data_stats()
                    metrics.log(self.step, last)
                    metrics.progress(self.step, values["loss"], last["images_per_s"])
                    window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
                zs_every = cfg.zero_shot.every
                if (zs_every and self.step % zs_every == 0) or self.step == self.total_steps:
                    zs = self._zero_shot()
                    if zs:
                        metrics.log(self.step, zs)
                        last |= zs
                every = cfg.run.checkpoint_every
                if (every and self.step % every == 0) or self.step == self.total_steps:
                    self._save()
                    saved_step = self.step
                if any_rank(STOP_REQUESTED.is_set(), info.device):
                    log.warning("stop requested at step %d: saving and returning", self.step)
                    last["stopped_early"] = True
                    break
        finally:
            metrics.close()
        if saved_step != self.step:
            self._save()
        return {"step": self.step, **last}


def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) pre-training; return the final metrics (rank-local view)."""
    trainer = Trainer(cfg, resume=resume)
    return trainer.fit()
