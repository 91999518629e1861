"""The pre-training loop: M3I-style loss, metrics, checkpoints, resume, on runtime/loop.py
(the engine, model and teacher come from pretrain/engine.py).

Runs unchanged on one process, under torchrun and under SLURM; CPU (gloo) or GPU (NCCL).
A resumed run continues exactly: model, optimizer, scheduler (DeepSpeed's checkpoint),
every rank's RNG and data position (each rank's own file: runtime/checkpoint.py); with
another ``optim`` config (lr, min_lr, warmup_steps, weight_decay, betas, dcn_lr_mult) it
trains with the new settings from the restored step on, the AdamW moments kept.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.preflight import check_sources_readable
from data.stats import count_slots, flat_counts, nested_counts
from models.checkpoint import CheckpointError
from pretrain.config import PretrainConfig
from pretrain.engine import (
    DTYPES,
    TEACHER_KEY,
    align_schedule,
    apply_schedule_settings,
    build_engine,
    build_model,
    build_teacher,
    check_precision,
    clamp_logit_scale,
    extension_warning,
    global_batch,
    model_hash,
    run_progress,
    total_steps,
    warmup_warning,
)
from pretrain.m3i.loss import image_loss_change, image_loss_state
from pretrain.objectives import M3ILoss
from runtime import run_lock
from runtime.checkpoint import (
    PRETRAIN_TASK,
    ResumeError,
    agree_on_refusal,
    check_compatible,
    check_engine_files,
    clear_leftovers,
    complete_message,
    discard_config,
    engine_layout,
    load_engine_checkpoint,
    load_rank_state,
    load_rank_states,
    load_trainer_state,
    publish_config,
    refuse_fresh_start,
    resolve_resume,
    save_checkpoint,
)
from runtime.checkpoint_path import CHECKPOINTS_DIR
from runtime.dist import (
    DistInfo,
    all_gather_objects,
    any_rank,
    decided_on_rank0,
    init_distributed,
    mean_by_name,
    sum_counts,
)
from runtime.loop import (
    EVAL_OWED,
    OWED_MARK,
    LoopPosition,
    LoopSpec,
    TaskHooks,
    owes_evaluation,
    run_loop,
)
from runtime.metrics import MetricsLogger, records_at
from runtime.param_groups import apply_group_settings, group_settings
from runtime.redact import config_hash
from runtime.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)
# DeepSpeed calls collectives torch has renamed; one warning per step drowns the progress bar.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and the run is configured to stop.

    Not worth a retry (``retry_helps``, read by launch/slurm/job.py): a requeue resumes
    from the same checkpoint with the same data and schedule, and diverges again, and the
    run's configuration (``run.on_nonfinite=stop``) asked for a stop."""

    retry_helps = False


def _seed_rank(seed: int, rank: int) -> None:
    random.seed(seed * 1000 + rank)
    np.random.seed((seed * 1000 + rank) % 2**32)
    torch.manual_seed(seed * 1000 + rank)


@dataclass
class _Window:
    """What the throughput values of the next log record are measured over: the steps
    since the previous record and the time spent waiting for their batches."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    steps: int = 0


class Trainer:
    """One pre-training run (construct on every rank, then call :meth:`fit`): the task
    hooks of pre-training on the one training loop (runtime/loop.py)."""

    def __init__(self, cfg: PretrainConfig, resume: str | None = None):
        from pretrain.data import build_loader
        from pretrain.data.decode import TagVocab

        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_root = self.run_dir / CHECKPOINTS_DIR
        self.info: DistInfo = init_distributed(cfg.run.collective_timeout_min)
        check_precision(cfg.engine.precision)
        num_tags = len(TagVocab.load(cfg.data.tag_vocab))
        self.model_hash = model_hash(cfg, num_tags)
        self.config_hash = config_hash(cfg)  # without credentials: a rotated key is the same run
        self.batch = global_batch(cfg, self.info.world_size)
        # Everything that can refuse a resume is checked before any compute, and the
        # ranks agree on a refusal before any of them ends (runtime/checkpoint.py).
        refusal: CheckpointError | None = None
        try:
            self._open_resume(cfg, resume)
        except CheckpointError as err:
            refusal = err
        agree_on_refusal(refusal)
        # a resume of a run already at its end: nothing is built, trained or saved (rank 0
        # reads metrics.jsonl's records at its step, mending a rewind's cut first)
        self.completed = self._completed()
        if self.completed is not None:
            return
        # a store that serves no shard of a source ends the run here, before the shard
        # lists are read and the model is built, rather than the streams waiting for it
        # for ever (data/preflight.py); on a fresh start the zero-shot set too, when
        # configured (a list of it that lists no shard would else only be met at the first
        # evaluation)
        from pretrain.zeroshot import zero_shot_source

        resumed = self.state is not None
        check_sources_readable([(s.name, s.urls) for s in cfg.data.sources]
                               + zero_shot_source(cfg.zero_shot, resumed), cfg.data.s3,
                               resumed=resumed, gather=all_gather_objects)
        self.loader = build_loader(cfg.data, self.info.rank, self.info.world_size, train=True)
        self.loader.check_same_lists(all_gather_objects)
        if self.state is not None:
            self._agreed_rank_state()
        if self.info.is_main:  # checks passed: the config this run starts with is the run's
            publish_config(self.run_dir)
        self.dtype = DTYPES[cfg.engine.precision]
        image = cfg.objective.image
        self.loss_fn = M3ILoss(cfg.objective.image_text_weight, cfg.objective.tag_weight,
                               image_weight=image.weight, image_loss=image.loss,
                               decorrelation_weight=image.decorrelation_weight)
        self.engine, self.ds_config = build_engine(cfg, build_model(cfg, num_tags),
                                                   self.total_steps)
        # M3I's image branch: the momentum target encoder (None when the branch is off)
        self.teacher = (build_teacher(cfg, self.engine, self.ds_config) if image.enabled
                        else None)
        self.step = 0
        self.nonfinite_skipped = 0
        self.overflow_skipped = 0  # updates DeepSpeed skipped for an fp16 overflow
        self._momentum = cfg.objective.image.momentum  # the last EMA update's (logged)
        if self.state is not None:
            self._restore()
        # a no-op for a fresh run (the config keeps the initial value inside); a
        # checkpoint saved while the forward clamped exp() instead may hold it past the bound
        clamp_logit_scale(self.engine, cfg.objective.max_logit_scale)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "deepspeed_config.json").write_text(
                json.dumps(self.ds_config, indent=2) + "\n")

    def _open_resume(self, cfg: PretrainConfig, resume: str | None) -> None:
        """The checkpoint ``resume`` names, its state and the run's position from it;
        refused (a ``CheckpointError``) when this run cannot continue it, or another
        live job holds the run directory (rank 0 takes its lock: runtime/run_lock.py)."""
        def resolve() -> Path | None:  # rank 0 alone, once it holds the run's lock
            run_lock.acquire(self.run_dir)
            # the run is this job's now: what a killed job left (a deletion or a resize's
            # conversion cut short) goes, also when this start saves nothing
            clear_leftovers(self.ckpt_root)
            resume_dir = resolve_resume(resume, self.ckpt_root)
            refuse_fresh_start(resume_dir, self.ckpt_root, self.run_dir)
            return resume_dir

        # Rank 0's checkpoint on every rank: a job still ending in this run directory (a
        # resubmit right after scancel) may publish a newer one while rank 0 waits for its
        # lock, and ranks resuming different steps would hang, or save as one checkpoint
        # the files of two
        self.resume_dir = decided_on_rank0(
            resolve, CheckpointError, f"rank 0 of {self.info.world_size} refused the start")
        self.state: dict[str, Any] | None = None
        self._saved_rng: dict[str, Any] | None = None  # this rank's, from the checkpoint
        # a resize's EMA teacher: the old ranks' saved slices (read before the engine)
        self._teacher_slices: list[dict] = []
        if self.resume_dir is not None:
            self.state = load_trainer_state(self.resume_dir)
            check_compatible(self.state, self.model_hash, self.info.world_size, self.resume_dir,
                             allow_resize=True, engine=self._engine_layout(),
                             task=PRETRAIN_TASK)
        # another world size: DeepSpeed's universal checkpoint, data re-dealt (_resized)
        self.resized = self.state is not None and self.state["world_size"] != self.info.world_size
        if self.state is not None and cfg.objective.image.enabled and self.info.is_main:
            warning = image_loss_change(self.state, cfg.objective.image)
            if warning:
                log.warning("%s: %s", self.resume_dir, warning)
        # The run's position in samples, what an epoch plan is measured in: every optimizer
        # step counts one global batch (a step skipped for a non-finite loss too, as the lr
        # schedule counts it). A checkpoint written before it was recorded read its steps
        # at its own world size with this config's batch.
        self.samples, self.batch_before = 0, self.batch
        if self.state is not None:
            self.batch_before = int(self.state.get(
                "global_batch", global_batch(cfg, self.state["world_size"])))
            self.samples = int(self.state.get(
                "samples_done", int(self.state["step"]) * self.batch_before))
        self.total_steps = total_steps(cfg, self.info.world_size,
                                       int(self.state["step"]) if self.state else 0,
                                       self.samples)
        warning = warmup_warning(cfg.optim.warmup_steps, self.total_steps)
        if warning and self.state is None and self.info.is_main:
            log.warning("%s", warning)

    def _completed(self) -> dict[str, Any] | None:
        """None while the run has steps left; else (its checkpoint at or past the run's
        last step) what :meth:`fit` returns without training: the records
        ``metrics.jsonl`` holds at the checkpoint's step (its last training and zero-shot
        values: what the run returned when it ended), with ``step`` and
        ``already_complete``. Rank 0 reads them, says so in the log and drops the staged
        config (the run's own config.yaml stays); every rank returns its reading, or
        raises its failure to read (``runtime.dist.decided_on_rank0``: collective). Every
        rank decides alike whether the run is complete (the same saved step)."""
        if self.state is None or int(self.state["step"]) < self.total_steps:
            return None
        step = int(self.state["step"])

        def look() -> tuple[dict[str, Any], bool]:
            discard_config(self.run_dir)
            recorded = recorded_metrics(self.run_dir, step)
            # owed and not made by a resume that stopped right after it: a warning, the
            # run's result lacks it (the mark is the record's, not a value of the run)
            return recorded, owes_evaluation(self.state) and not recorded.pop(OWED_MARK, False)

        recorded, owed = decided_on_rank0(look, ResumeError, f"{self.run_dir}: rank 0 could "
                                          "not read the finished run's records")
        if self.info.is_main:
            (log.warning if owed else log.info)("%s", complete_message(
                self.resume_dir, step, self.total_steps, recorded, "values",
                owed="zero-shot evaluation" if owed else ""))
        return {**recorded, "step": step, "already_complete": True}

    def _agreed_rank_state(self) -> None:
        """:meth:`_restore_rank_state`, whose refusal every rank raises together: each rank
        reads its own state file, so a missing or damaged one, or a data position this
        config cannot continue, is met by one rank alone (it used to end alone while the
        others built the engine and waited in its first collective)."""
        refusal = None
        try:
            self._restore_rank_state()
            self._read_teacher_slices()
            if not self.resized:  # its own DeepSpeed shards (a resize reads universal ones)
                check_engine_files(self.resume_dir, self.info.rank)
        except CheckpointError as err:
            refusal = err
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # a rank file that parses but does not hold what a save writes
            refusal = ResumeError(f"{self.resume_dir}: rank {self.info.rank}'s saved state "
                                  f"does not hold a data position and random state as "
                                  f"saved ({type(err).__name__}: {err})")
        agree_on_refusal(refusal)

    def _read_teacher_slices(self) -> None:
        """A resize's EMA teacher: the old ranks' saved slices (re-dealt in
        :meth:`_restore`), read here, before the engine, so that a checkpoint without
        them, or a file that cannot be read, is refused by every rank together."""
        if self.resized and self.cfg.objective.image.enabled:
            from pretrain.resize import read_teacher_slices

            assert self.resume_dir is not None and self.state is not None
            self._teacher_slices = read_teacher_slices(
                self.resume_dir, int(self.state["world_size"]), TEACHER_KEY,
                zero3=self.cfg.engine.zero_stage == 3)

    def _restore_rank_state(self) -> None:
        """This rank's data position and (kept for :meth:`_restore`) RNG state as saved.

        On the same world size and worker count this rank's own file alone is read (O(1)
        per rank; the loader's same-slots path uses this rank's entry only). Otherwise the
        loader re-deals what every old slot left (data/redeal.py), so every old rank's
        file is read: O(old world size) per rank, only on a resize, and inherent to it."""
        assert self.resume_dir is not None and self.state is not None
        own = (None if self.resized
               else load_rank_state(self.resume_dir, self.state, self.info.rank))
        if own is not None and own["data"].get("workers") == self.loader.workers:
            data: dict[str, Any] | list[dict[str, Any]] = own["data"]
        else:
            data = [r["data"] for r in load_rank_states(self.resume_dir, self.state)]
        try:  # the saved data position is a resume check too (a changed shard list)
            self.loader.load_state_dict(data)
        except ValueError as err:
            raise ResumeError(f"{self.resume_dir}: {err}") from None
        if own is not None:
            self._saved_rng = own["rng"]
        # a checkpoint written before rank files holds every rank's entries in the shared
        # state (~32 KB each: 16 MB at 512 ranks); they have served
        self.state.pop("ranks", None)

    def _restore(self) -> None:
        assert self.resume_dir is not None and self.state is not None
        load_dir, tag = self.resume_dir.parent, self.resume_dir.name
        if self.resized:
            from pretrain.resize import resize_load

            load_dir, tag = resize_load(self.engine, self.resume_dir, self.ckpt_root,
                                        self.info.is_main)
        # this config's optimizer settings, before the checkpoint's replace them: a resume
        # trains with them and the checkpoint's moments (apply_schedule_settings)
        optimizer = self.engine.lr_scheduler.optimizer
        built = group_settings(optimizer)
        client_state = load_engine_checkpoint(self.engine, self.resume_dir, self.info.rank,
                                              load_dir, tag)
        apply_group_settings(optimizer, built, self.resume_dir)
        apply_schedule_settings(self.engine.lr_scheduler, self.cfg)
        if tag != self.resume_dir.name:  # the universal path leaves buffers at init
            from pretrain.resize import restore_buffers

            restore_buffers(self.engine.module, self.resume_dir)
        if self.teacher is not None and self.resized:  # its slices re-dealt
            refusal = None
            try:
                self.teacher.load_resized(self._teacher_slices)
            except ValueError as err:  # slices that do not make up the tensors
                refusal = ResumeError(f"{self.resume_dir}: {err}")
            self._teacher_slices = []
            agree_on_refusal(refusal)  # seen on some ranks only: raised on every rank
        elif self.teacher is not None:
            if TEACHER_KEY not in (client_state or {}):
                raise ResumeError(f"{self.resume_dir} holds no EMA target encoder "
                                  f"(saved with objective.image off?)")
            self.teacher.load_state_dict(client_state[TEACHER_KEY])
        self.step = int(self.state["step"])
        self.nonfinite_skipped = int(self.state.get("nonfinite_skipped", 0))
        self.overflow_skipped = int(self.state.get("overflow_skipped", 0))
        if self.info.is_main:
            log.info("resumed from %s at step %d", self.resume_dir, self.step)
        self._align_schedule()

    def _align_schedule(self) -> None:
        """An epoch run's schedule follows its plan in samples: the restored one was made
        for the saved run's global batch and end, so on another world size (or batch, or
        epochs) it is re-planned from here (lr continuous in samples, ``min_lr`` at the
        new last step). A step-based run (``run.max_steps``) keeps the restored schedule,
        which counts steps, whatever the world size (said when the run now goes past its
        end: :func:`pretrain.engine.extension_warning`)."""
        if self.cfg.run.epochs <= 0:
            warning = extension_warning(self.engine.lr_scheduler, self.total_steps,
                                        self.cfg.optim.min_lr)
            if warning and self.info.is_main:
                log.warning("%s", warning)
            return
        if align_schedule(self.engine.lr_scheduler, self.step, self.total_steps, self.batch,
                          self.batch_before) and self.info.is_main:
            log.warning("epoch plan re-planned at step %d (%d samples read, %d per step "
                        "before, %d now): the run ends at step %d after %d samples; the lr "
                        "schedule continues in samples", self.step, self.samples,
                        self.batch_before, self.batch, self.total_steps,
                        self.samples + (self.total_steps - self.step) * self.batch)

    # ----------------------------------------------------------------------------------
    def _engine_layout(self) -> dict[str, Any]:
        """What this run's checkpoint files depend on besides the model (a resume in
        another ZeRO layout or precision is refused: runtime.checkpoint.engine_layout)."""
        return engine_layout(self.cfg.engine.zero_stage, self.cfg.engine.precision)

    def _save(self, eval_owed: bool = False) -> Path:
        # rank 0 alone writes the shared state (the others' copy is not used)
        merged = self._merged_stats() or {}
        shared = {"step": self.step, "world_size": self.info.world_size, EVAL_OWED: eval_owed,
                  "global_batch": self.batch, "samples_done": self.samples,
                  "config_hash": self.config_hash, "model_hash": self.model_hash,
                  "samples_seen": merged.get("samples", {}),
                  "nonfinite_skipped": self.nonfinite_skipped,
                  "overflow_skipped": self.overflow_skipped,
                  **image_loss_state(self.cfg.objective.image),
                  "engine": self._engine_layout()}
        local = {"rng": rng_state(), "data": self.loader.state_dict()}
        # under ZeRO 0-2 DeepSpeed writes client state on rank 0 alone (its model states
        # file, read back by every rank): the others' copy of the whole teacher (4.3 GB
        # for H, to host memory at every save) would be thrown away
        client = ({TEACHER_KEY: self.teacher.state_dict()} if self.teacher is not None and (
            self.teacher.partitioned or self.info.is_main) else None)
        return save_checkpoint(self.engine, self.ckpt_root, self.step, local, shared, self.info,
                               self.cfg.run.keep_last, client_state=client)

    def _batch_to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.info.device
        return {"images": batch["images"].to(dev, self.dtype, non_blocking=True),
                "tokens": batch["tokens"].to(dev), "has_text": batch["has_text"].to(dev),
                "tag_targets": batch["tag_targets"].to(dev), "has_tags": batch["has_tags"].to(dev)}

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, float]:
        if self.teacher is not None:
            return self._mixed_micro_step(batch)
        image, text, tags, scale = self.engine(batch["images"], batch["tokens"])
        loss, terms = self.loss_fn(image.float(), text.float(), tags.float(), scale.float(),
                                   batch["has_text"], batch["tag_targets"], batch["has_tags"])
        return loss, terms, float(scale.detach())

    def _mixed_micro_step(self, batch: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict, float]:
        """M3I with the image branch: mixed views in, text/tag/image targets out."""
        from pretrain.m3i.batch import mix_batch

        image_cfg = self.cfg.objective.image
        mixed = mix_batch(batch["images"], self.teacher, image_cfg.mix_share,
                          image_cfg.view_scale, image_cfg.view_flip)
        image, text, tags, scale, predictions = self.engine(
            mixed.images, batch["tokens"], mixed.mix_mask, mixed.positions_a,
            mixed.positions_b)
        partner = mixed.partner.to(text.device)
        loss, terms = self.loss_fn.mixed(
            image.float(), text.float(), tags.float(), scale.float(), batch["has_text"],
            batch["tag_targets"], batch["has_tags"], partner, predictions.float(),
            mixed.targets)
        return loss, terms, float(scale.detach())

    def _zero_shot(self) -> dict[str, float]:
        from pretrain.zeroshot import evaluate

        zs = self.cfg.zero_shot
        if not zs.urls or not zs.names():
            return {}
        return evaluate(self.engine, self.loader.tokenizer, zs, self.cfg.data, self.info.rank,
                        self.info.world_size, self.info.device, self.dtype)

    def _merged_stats(self) -> dict[str, Any] | None:
        """Every rank's data totals summed, on rank 0; None on the others. A collective.

        One all-reduce of the totals over fixed keys (data.stats.count_slots, ~60
        numbers: runtime.dist.sum_counts; an all-gather of the dicts would hand each of N
        ranks all N counts, N^2 x ~750 bytes, and a gather to rank 0 is point-to-point
        under NCCL, connecting it to every rank)."""
        slots = count_slots([source.name for source in self.cfg.data.sources])
        summed = sum_counts(flat_counts(self.loader.stats.to_dict()), slots)
        return None if summed is None else nested_counts(summed)

    def _data_stats(self) -> dict[str, Any]:
        """The data statistics of every rank merged, on rank 0 (which writes the record);
        {} on the others."""
        merged = self._merged_stats()
        if merged is None:
            return {}
        samples = merged.get("samples", {})
        total = sum(samples.values()) or 1
        return {"skipped": merged.get("skipped", {}),
                "source_mix": {k: v / total for k, v in samples.items()}}

    # the task hooks ---------------------------------------------------------------------
    def _after_step(self, step: int) -> None:
        """After optimizer step ``step``: the logit scale clamped into its bounds (open_clip's
        rule), then the EMA step of the target encoder: momentum on BYOL's cosine at the
        fraction of the run done before this step, in the plan's unit (samples for an
        epoch plan, so a resume with another global batch does not jump; run_progress)."""
        self.step = step
        self.samples += self.batch
        if not self.engine.was_step_applied():
            self._overflowed(step)
            return
        clamp_logit_scale(self.engine, self.cfg.objective.max_logit_scale)
        if self.teacher is None:
            return
        from pretrain.m3i.ema import momentum_at

        image = self.cfg.objective.image
        done, total = run_progress(self.cfg, step, self.samples, self.batch, self.total_steps)
        self._momentum = momentum_at(done, total, image.momentum, image.momentum_final)
        self.teacher.update(self._momentum)

    def _overflowed(self, step: int) -> None:
        """DeepSpeed skipped the update of step ``step`` itself: fp16's dynamic loss scale
        overflowed (deepspeed/runtime/engine.py ``_take_model_step``: no optimizer step,
        ``skipped_steps`` counted, the lr scheduler not stepped). The step counts as taken
        (the data and the plan moved on): the lr schedule is stepped here, as for a
        skipped step, so the lr of step k stays schedule(k); the weights did not change,
        so the EMA teacher takes no step towards them and the temperature needs no clamp.
        Counted as ``overflow_skipped`` (expected while the loss scale settles)."""
        self.overflow_skipped += 1
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()
        log.info("step %d: fp16 loss scale overflow, update skipped by DeepSpeed (%d so far)",
                 step, self.overflow_skipped)

    def _skipped(self, step: int) -> None:
        """Count a step skipped for a non-finite loss and keep the lr schedule on the step
        counter: DeepSpeed steps the scheduler only in ``engine.step()``, which a skipped
        step never reaches, so without this the lr of step k would be schedule(k - skips).
        The periodic work of the step (zero-shot, checkpoint, stop request) still runs."""
        self.step = step
        self.samples += self.batch  # the plan moves on, as the lr schedule does
        self.nonfinite_skipped += 1
        if self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()
        log.warning("non-finite loss at step %d: step skipped (%d so far)", self.step,
                    self.nonfinite_skipped)

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        """One optimizer step over ``engine.grad_accum`` micro-batches drawn from
        ``batches``; returns the loss (mean over micro-batches and ranks), or None when a
        non-finite loss on any rank skipped the step (``run.on_nonfinite=skip``)."""
        accum, device = self.cfg.engine.grad_accum, self.info.device
        self._window.steps += 1
        losses, term_sums = [], {}
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = self._batch_to_device(next(batches))
            self._window.data_wait += time.perf_counter() - t0
            loss, terms, self._scale = self._micro_step(batch)
            if any_rank(not bool(torch.isfinite(loss)), device):
                if self.cfg.run.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {self.step + 1}; "
                        f"stopping without saving (last good checkpoint kept). Set "
                        f"run.on_nonfinite=skip to skip such steps instead")
                return None
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.item()
        values = mean_by_name({"loss": sum(losses) / accum}
                              | {k: v / accum for k, v in term_sums.items()})
        self._step_values = values
        return {"loss": torch.tensor(values["loss"], dtype=torch.float64)}

    def _log_values(self, step: int) -> dict[str, Any]:
        """The terms of the step, lr, temperature, throughput and data statistics since
        the previous record (collective: the data statistics of every rank)."""
        w, scale = self._window, self._scale
        elapsed = time.perf_counter() - w.start
        images = w.steps * self.cfg.engine.grad_accum * self.cfg.data.batch_size
        values = {k: v for k, v in self._step_values.items() if k != "loss"} | {
            "lr": self.engine.get_lr()[0], "temperature": 1.0 / scale, "logit_scale": scale,
            "images_per_s": images * self.info.world_size / elapsed,
            "images_per_s_per_device": images / elapsed,
            "data_wait": w.data_wait / elapsed,
            "nonfinite_skipped": self.nonfinite_skipped,
            "overflow_skipped": self.overflow_skipped,
        } | self._data_stats()
        if self.teacher is not None:  # the EMA momentum of the last update (BYOL's cosine)
            values["ema_momentum"] = self._momentum
        self._last = self._step_values | values
        self._window = _Window()
        return values

    def _evaluate(self) -> dict[str, float]:
        zs = self._zero_shot()
        self._last |= zs
        return zs

    def _restore_rng(self) -> None:
        if self.state is not None and self.resized:  # no saved RNG for the new ranks
            _seed_rank(self.cfg.run.seed + self.step, self.info.rank)
        elif self.state is not None:
            set_rng_state(self._saved_rng)
        else:
            _seed_rank(self.cfg.run.seed, self.info.rank)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or stop on a non-finite loss); return the final metrics."""
        if self.completed is not None:  # nothing to train (a resume of a finished run)
            return self.completed
        cfg = self.cfg
        metrics = MetricsLogger(self.run_dir, self.info.is_main, self.total_steps, self.step,
                                tensorboard=cfg.run.tensorboard, progress=cfg.run.progress,
                                desc="pretrain")
        batches = self.loader.endless()  # one-pass sources: pass after pass
        # last before the first step (the loader draws from its own generator, never from
        # torch's global RNG, which the restored state continues)
        self._restore_rng()
        self._window, self._last = _Window(), {}
        # one endless epoch: the position is the loader's own state (restored), so the
        # loop's skip is ignored; each step pulls its micro-batches itself
        hooks = TaskHooks(batches=lambda epoch, skip: itertools.repeat(batches),
                          train_step=self._train_step, evaluate=self._evaluate,
                          save=lambda pos: self._save(pos.eval_owed),
                          after_step=self._after_step,
                          skipped=self._skipped, log_values=self._log_values)
        spec = LoopSpec(name="pretrain", total_steps=self.total_steps,
                        eval_every=cfg.zero_shot.every,
                        checkpoint_every=cfg.run.checkpoint_every,
                        log_every=cfg.run.log_every, log_first=False, log_last=True,
                        epochs=False, losses_over_ranks=True)
        result = run_loop(spec, hooks,
                          LoopPosition(self.step, eval_owed=owes_evaluation(self.state)),
                          metrics=metrics, d=self.info)
        stopped = {"stopped_early": True} if result.get("stopped_early") else {}
        return {"step": self.step, **self._last, **stopped}


def recorded_metrics(run_dir: Path, step: int) -> dict[str, Any]:
    """The values ``run_dir``'s ``metrics.jsonl`` records at ``step`` (its training and
    zero-shot records merged, a later record's value winning), without the step and time;
    {} when none. Rank 0 only: the file's lineage is repaired first
    (``runtime.metrics.records_at``)."""
    found: dict[str, Any] = {}
    for record in records_at(run_dir, step):
        found |= {k: v for k, v in record.items() if k not in ("step", "time")}
    return found


@run_lock.releasing
def pretrain(cfg: PretrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Run (or resume) pre-training; return the final metrics (rank-local view). The
    run directory's lock (rank 0's) is released when it returns or raises."""
    return Trainer(cfg, resume=resume).fit()
