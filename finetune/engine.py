"""The DeepSpeed engine of every fine-tuning task (classification, detection,
segmentation) and the run around it: opening a resume, building and starting the engine,
its checkpoints and its metrics records, written once for all three.

The sequence a task follows: :func:`open_run` before any compute (everything that can
refuse a resume is checked there), the model and optimizer, :func:`start_engine` (the one
DeepSpeed-config builder, runtime/ds_config.py, then ``deepspeed.initialize``,
``deepspeed_config.json`` next to ``config.yaml`` and the resumed checkpoint's shards),
:func:`open_metrics`, and last, right before the first batch is drawn,
:meth:`FinetuneRun.restore_rng`. :meth:`FinetuneRun.save` writes the one checkpoint format
(runtime/checkpoint.py) with every rank's random state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoint import CheckpointError
from runtime import rng, run_lock
from runtime.best import BestCheckpoint
from runtime.checkpoint import (
    ResumeError,
    agree_on_refusal,
    check_engine_files,
    checked_state,
    clear_leftovers,
    complete_message,
    load_engine_checkpoint,
    load_rank_state,
    load_rank_states,
    publish_config,
    rank_state_path,
    refuse_fresh_start,
    refuse_legacy_resume,
    resolve_resume,
    save_checkpoint,
    saved_ranks,
)
from runtime.checkpoint_path import CHECKPOINTS_DIR
from runtime.dist import DistInfo, decided_on_rank0
from runtime.ds_config import DeepSpeedSpec, deepspeed_config
from runtime.loop import OWED_MARK, owes_evaluation
from runtime.metrics import METRICS_FILE, MetricsLogger, records_at
from runtime.param_groups import apply_group_settings, group_settings

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """Hash of what a checkpoint's tensors depend on (a resume with another one fails)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def own_rank_state(resume_dir: Path, state: dict[str, Any], rank: int,
                   world_size: int) -> dict[str, Any] | None:
    """``rank``'s own saved state in the checkpoint ``resume_dir`` (trainer state
    ``state``), checked to hold what a save writes (its random state); None when the
    checkpoint was saved by another number of ranks (no file of this rank's to read: the
    random state is not restored, :meth:`FinetuneRun.restore_rng` warns). A missing,
    damaged or incomplete file is a ``ResumeError`` naming it."""
    try:
        if saved_ranks(state) != world_size:
            return None
        own = load_rank_state(resume_dir, state, rank)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        # a trainer state that parses but does not say what its ranks saved
        raise ResumeError(f"{resume_dir}: rank {rank}'s saved state cannot be found in "
                          f"what a save writes ({type(err).__name__}: {err})") from None
    # checked here, since restore_rng runs after the engine exists, where one rank's
    # failure would leave the others in a collective
    if not rng.is_rng_state(own.get("rng") if isinstance(own, dict) else None):
        where = (f"trainer_state.json ranks[{rank}]" if "ranks" in state
                 else rank_state_path(resume_dir, rank).relative_to(resume_dir))
        raise ResumeError(f"{resume_dir}: {where} holds no random state as a save writes it "
                          f"(rng: python, numpy, torch); resume from an earlier checkpoint "
                          f"(--resume {resume_dir.parent}/step_...)")
    return own


@dataclass(frozen=True)
class FinetuneRun:
    """A run's output directory and the checkpoint it resumes (``resume_dir`` and its
    ``trainer_state.json`` contents ``state``; both None for a fresh start). ``own``: this
    rank's own saved state (:func:`own_rank_state`), read and checked once by
    :func:`open_run` before any rank goes on; None where there is none to read (a fresh
    start, another world size) or the run was built without it (read on demand then)."""

    out_dir: Path
    resume_dir: Path | None
    state: dict[str, Any] | None
    own: dict[str, Any] | None = None
    keep_last: int = 2  # run.keep_last: the newest complete checkpoints kept

    def bests(self, pointers: dict[str, str], start_step: int, is_main: bool
              ) -> tuple[BestCheckpoint, ...]:
        """The run's best checkpoints so far, one per ``pointers`` entry (pointer file ->
        metric: ``{"best.json": "top1", "best_ema.json": "top1_ema"}``; empty: none
        kept). Collective: rank 0's readings on every rank (value, step, and an abandoned
        branch's entry), since an evaluation that beats one saves, and a save is
        collective (a rank seeing a stale file would wait alone); a pointer rank 0 cannot
        read is every rank's ``ResumeError``."""
        if not pointers:
            return ()

        def look() -> list[tuple[float | None, int | None, dict[str, Any] | None]]:
            # rank 0 reads each pointer (and mends it: BestCheckpoint.resume)
            return [(b.value, b.step, b.abandoned) for b in (
                BestCheckpoint.resume(self.root, metric, start_step, True, pointer)
                for pointer, metric in pointers.items())]

        # a pointer rank 0 cannot read (EIO, ESTALE) refuses the resume on every rank:
        # taken for "no best", the run would forget its best checkpoint and prune it
        readings = decided_on_rank0(look, ResumeError, f"{self.root}: rank 0 could not "
                                    "read the best checkpoint's pointer")
        return tuple(BestCheckpoint(self.root, metric, is_main, value=value, step=step,
                                    pointer=pointer, abandoned=abandoned)
                     for (pointer, metric), (value, step, abandoned)
                     in zip(pointers.items(), readings, strict=True))

    @property
    def root(self) -> Path:
        """``OUT/checkpoints``: the DeepSpeed tag directories and ``latest``."""
        return self.out_dir / CHECKPOINTS_DIR

    @property
    def start_step(self) -> int:
        """Optimizer steps already done (0 for a fresh start)."""
        return int(self.state["step"]) if self.state is not None else 0

    def save(self, engine, step: int, shared: dict[str, Any], d: DistInfo,
             side_files: dict[str, Any] | None = None,
             local: dict[str, Any] | None = None) -> Path:
        """A checkpoint at ``step``, written on every rank: DeepSpeed's shards,
        ``trainer_state.json`` with ``shared`` and the ``step``, and each rank's own file
        with its random state plus its ``local`` entries (a streamed set's position:
        :meth:`rank_states`);
        ``side_files``: name -> object rank 0 saves into it (an EMA's weights)."""
        return save_checkpoint(engine, self.root, step, {"rng": rng.rng_state()} | (local or {}),
                               shared | {"step": step}, d, self.keep_last,
                               side_files=side_files)

    def own_entry(self, key: str, d: DistInfo) -> Any | None:
        """This rank's ``local`` entry ``key`` as saved, when the checkpoint was saved by
        as many ranks as run now (its own file alone, as :func:`open_run` read it: O(1)
        per rank); None for a fresh start, another world size, or a key this rank saved
        none of."""
        if self.state is None or saved_ranks(self.state) != d.world_size:
            return None
        return self._own_state(d).get(key)

    def _own_state(self, d: DistInfo) -> dict[str, Any]:
        """This rank's own saved state: the one :func:`open_run` read, else its file."""
        if self.own is not None:
            return self.own
        assert self.resume_dir is not None and self.state is not None
        return load_rank_state(self.resume_dir, self.state, d.rank)

    def rank_states(self, key: str) -> list[Any] | None:
        """Every rank's ``local`` entry ``key`` as saved (None where a rank saved none);
        None for a fresh start. Every rank saves the same keys (one code path), so rank
        0's file alone tells a key none saved (a set that is not streamed: a list of
        None, one file read); a key they saved reads every rank's file (O(saved world
        size) per rank: for a re-deal of a streamed set's positions over another world
        size or worker count, data/redeal.py; else :meth:`own_entry` serves)."""
        if self.state is None:
            return None
        assert self.resume_dir is not None
        saved = saved_ranks(self.state)
        if saved == 0 or key not in load_rank_state(self.resume_dir, self.state, 0):
            return [None] * saved
        return [r.get(key) for r in load_rank_states(self.resume_dir, self.state)]

    def completed(self, total_steps: int, d: DistInfo) -> dict[str, Any] | None:
        """None while the run has steps left to train (``total_steps``: its schedule's
        length); else the result of a resume with nothing to train (its checkpoint at or
        past the schedule's end): the last evaluation ``metrics.jsonl`` records at the
        checkpoint's step (what the run returned when it trained that step), with the
        ``step`` and ``already_complete``, said in the log by rank 0. Collective (rank 0,
        which writes the file, reads it once; every rank returns the same).

        Called as soon as the schedule's length is known, before the model and engine are
        built and before anything is saved: detection and segmentation (finetune/loop.py)
        right after :func:`open_run`; classification (finetune/zero.py) once it has built
        its datasets and restored each rank's stream position, since an epoch schedule's
        length counts the training set (``len(train_set)``)."""
        if self.state is None or self.start_step < total_steps:
            return None
        assert self.resume_dir is not None
        step = self.start_step
        metrics = self.out_dir / METRICS_FILE

        def look() -> tuple[dict[str, Any] | None, bool]:
            try:
                records = records_at(self.out_dir, step)
            except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
                raise ResumeError(f"{metrics}: cannot read the finished run's records "
                                  f"({type(err).__name__}: {err})") from err
            # owed and not made by a resume that stopped right after it
            owed = owes_evaluation(self.state) and not any(r.get(OWED_MARK) for r in records)
            return last_evaluation(records), owed

        # rank 0 reads (and repairs) the file; a failure there is every rank's refusal,
        # raised together: the others would otherwise wait for rank 0's answer
        recorded, owed = decided_on_rank0(look, ResumeError, f"{metrics}: rank 0 refused")
        if d.is_main:
            # an owed evaluation is a warning: the run's result lacks it
            (log.warning if owed else log.info)("%s", complete_message(
                self.resume_dir, step, total_steps, recorded, "evaluation",
                owed="evaluation" if owed else ""))
        return {**(recorded or {}), "step": step, "already_complete": True}

    def restore_rng(self, d: DistInfo) -> None:
        """This rank's CPU/CUDA random state as the checkpoint saved it (nothing for a
        fresh start): from this rank's file alone, as :func:`open_run` read it. Call it
        last: nothing between it and the first batch may draw."""
        if self.state is None:
            return
        assert self.resume_dir is not None
        saved = saved_ranks(self.state)
        if saved != d.world_size:  # none saved (an old checkpoint): warns, not exact
            rng.warn_rng_not_restored(saved, d.world_size)
            return
        rng.set_rng_state(self._own_state(d)["rng"])


def last_evaluation(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The metrics of the last evaluation among ``records`` (one step's records of a
    ``metrics.jsonl``, ``runtime.metrics.records_at``: runtime/loop.py logs an evaluation
    as ``step``, ``epoch`` and the metrics; a training record holds a ``loss``), without
    the step, epoch and time; None when they hold none."""
    evaluations = [r for r in records if "loss" not in r]
    if not evaluations:
        return None
    return {k: v for k, v in evaluations[-1].items()
            if k not in ("step", "epoch", "time", OWED_MARK)}


def resume_checkpoint(resume: str | None, out_dir: Path, warn: bool = True) -> Path | None:
    """The checkpoint a run in ``out_dir`` started with ``resume`` (``auto``, a path or
    None) continues from, None for a fresh start; refused (a ``CheckpointError``) when
    ``resume`` names no training checkpoint, or the start would replace a run's metrics
    and checkpoints (``out_dir`` already holds one: a fresh start, or another run's
    checkpoint). ``warn``: log what a rewind
    abandons (the training run's own resolution does; a look-ahead passes False)."""
    root = out_dir / CHECKPOINTS_DIR
    refuse_legacy_resume(resume, root)
    resume_dir = resolve_resume(resume, root, warn, init=True)  # a weights file: --init's
    refuse_fresh_start(resume_dir, root, out_dir)
    return resume_dir


def batch_state(batch_size: int, grad_accum: int) -> dict[str, int]:
    """What a fine-tuning checkpoint records of its batch (``trainer_state.json``
    ``batch``): a resume must train on the same (:func:`check_batch`)."""
    return {"batch_size": int(batch_size), "grad_accum": int(grad_accum)}


def check_batch(state: dict[str, Any], batch: dict[str, int], ckpt_dir: Path) -> None:
    """Refuse a resume of ``ckpt_dir`` (trainer state ``state``) whose optimizer step holds
    another number of images per rank, ``batch_size x grad_accum``, than it was trained
    with: its step, epoch and position in the epoch count optimizer steps of that many
    images (the world size is checked already), and the schedule's length is planned from
    them, so another would re-plan the run from a position that means something else. The
    same product split otherwise (``batch_size=2 grad_accum=2`` after ``4/1``: the usual
    way round an out-of-memory) is accepted: every step then holds the same samples, with
    the same augmentations (each sample's own seed), and an epoch the same steps (logged:
    BatchNorm statistics see the smaller micro-batches). A checkpoint written before the
    batch was recorded is not checked."""
    saved = state.get("batch")
    if not isinstance(saved, dict) or not {"batch_size", "grad_accum"} <= set(saved):
        return
    before = saved["batch_size"] * saved["grad_accum"]
    now = batch["batch_size"] * batch["grad_accum"]
    was = f"run.batch_size={saved['batch_size']} run.grad_accum={saved['grad_accum']}"
    if before != now:
        raise ResumeError(
            f"{ckpt_dir} was trained with {was} ({before} images per rank and step), this "
            f"run has run.batch_size={batch['batch_size']} run.grad_accum="
            f"{batch['grad_accum']} ({now}): a fine-tuning resume keeps the images per "
            "step (its steps, epochs and schedule count steps of them); resume with "
            f"{was}, or another split of {before} images")
    if saved != batch:
        log.warning("resuming %s (%s) as run.batch_size=%d run.grad_accum=%d: the same %d "
                    "images per rank and step, BatchNorm statistics over the smaller "
                    "micro-batches", ckpt_dir, was, batch["batch_size"], batch["grad_accum"],
                    now)


def open_run(resume: str | None, out_dir: Path, model_hash: str,
             world_size: int, engine: dict[str, Any], publish: bool = True,
             batch: dict[str, int] | None = None,
             rank: int = 0, task: str | None = None, keep_last: int = 2) -> FinetuneRun:
    """Create ``out_dir`` and open the checkpoint ``resume`` names (``auto``, a path or
    None), refused here, before any compute, when this run cannot continue it (a
    ``CheckpointError``: the CLI reports it without a traceback; ``engine``: this run's
    ``runtime.checkpoint.engine_layout``, which a checkpoint's must match); once all
    checks passed, the config the command line staged becomes ``config.yaml``
    (``publish=False``: the caller checks more first, then calls
    ``runtime.checkpoint.publish_config``). Rank 0 takes the run directory's lock
    (runtime/run_lock.py: another live job there is refused too) and then chooses the
    checkpoint, every rank's (collective).
    ``batch``: this run's :func:`batch_state`, which the checkpoint's must equal.
    ``rank``: this process's rank, whose own saved state (random state, stream position)
    is read and checked here too (:func:`own_rank_state`): a missing or damaged file is
    met by that rank alone, which would otherwise end alone later while the others wait
    in the engine's first collective until the process group times out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    refusal: CheckpointError | None = None
    resume_dir, state, own = None, None, None
    def resolve() -> Path | None:  # rank 0 alone
        # one job at a time in a run directory (runtime/run_lock.py)
        run_lock.acquire(out_dir)
        # the run is this job's now: what a killed job left (a deletion or a conversion
        # cut short) goes, also when this start saves nothing (a finished run's resume)
        clear_leftovers(out_dir / CHECKPOINTS_DIR)
        return resume_checkpoint(resume, out_dir)

    try:
        # rank 0's checkpoint on every rank, chosen once it holds the lock: a job still
        # ending here may publish a newer one meanwhile (ranks resuming different steps
        # hang, or save the files of two as one checkpoint)
        resume_dir = decided_on_rank0(resolve, CheckpointError,
                                      f"rank 0 of {world_size} refused the start")
        state = (checked_state(resume_dir, model_hash, world_size, engine, task)
                 if resume_dir is not None else None)
        if state is not None and batch is not None:
            check_batch(state, batch, resume_dir)
        if state is not None:
            assert resume_dir is not None
            own = own_rank_state(resume_dir, state, rank, world_size)
            check_engine_files(resume_dir, rank)  # (its DeepSpeed shards: opened only later)
    except CheckpointError as err:
        refusal = err
    try:
        agree_on_refusal(refusal)  # no rank ends before every rank has checked
    except CheckpointError:
        run_lock.release()  # a refused start leaves the run directory as it found it
        raise
    if publish:
        publish_config(out_dir)
    return FinetuneRun(out_dir, resume_dir, state, own, keep_last)


def start_engine(net: nn.Module, optimizer: torch.optim.Optimizer, spec: DeepSpeedSpec,
                 run: FinetuneRun, d: DistInfo):
    """``net`` and our optimizer in a DeepSpeed engine configured from ``spec`` (the
    engine clips, accumulates ``spec.grad_accum`` micro-batches per update, and casts to
    ``spec.precision``), with the resumed checkpoint's shards loaded; returns the engine
    and its DeepSpeed config (also written to ``OUT/deepspeed_config.json`` by rank 0).
    A resume keeps the checkpoint's optimizer state and this config's group settings
    (:func:`apply_group_settings`)."""
    import deepspeed

    config = deepspeed_config(spec)
    built = group_settings(optimizer)  # this config's, before a checkpoint's replace them
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    if d.is_main:  # next to config.yaml, as pre-training writes it
        (run.out_dir / "deepspeed_config.json").write_text(
            json.dumps(config, indent=2) + "\n")
    if run.resume_dir is not None:
        load_engine_checkpoint(engine, run.resume_dir, d.rank)
        apply_group_settings(optimizer, built, run.resume_dir)
        log.info("resumed from %s at step %d", run.resume_dir, run.start_step)
    return engine, config


def open_metrics(run: FinetuneRun, d: DistInfo, total_steps: int, desc: str, *,
                 tensorboard: bool, progress: bool) -> MetricsLogger:
    """The run's metrics records (runtime/metrics.py); the lines past the step this run
    starts from go (a dead run's; a fresh start: all), so a resume logs no step twice."""
    return MetricsLogger(run.out_dir, d.is_main, total_steps, run.start_step, desc=desc,
                         tensorboard=tensorboard, progress=progress, timestamp=True)
