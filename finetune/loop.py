"""Detection and segmentation on the one training loop (runtime/loop.py), run by a
DeepSpeed engine (``run.zero_stage`` 0..3) as classification and pre-training are.

The task supplies the module the engine wraps (its forward returns a dict of losses), a
batch iterator factory and an evaluation function; this file builds the engine from the one
DeepSpeed-config builder (clipping, ZeRO stage), adds the optimisation step (bf16 through
autocast over fp32 weights, as before DeepSpeed) and the one checkpoint format
(runtime/checkpoint.py: DeepSpeed tag directories, per-rank random state and the position
in ``trainer_state.json``, an atomic ``latest``) with an exact ``--resume auto``.

ZeRO-3: the engine partitions the module at ``deepspeed.initialize`` (as classification's);
the dense evaluations run each rank's share of the validation set on the bare module with
every forward pass in lock-step across ranks (runtime/lockstep.py), since a ZeRO-3 module
needs every rank in every forward. Rank 0's buffers (BatchNorm statistics) are broadcast
before every training forward and before each evaluation, so all ranks evaluate the
weights and statistics the checkpoint holds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from runtime import rng
from runtime.checkpoint import open_resume, refuse_legacy_resume, save_checkpoint
from runtime.dist import DistInfo, broadcast_buffers
from runtime.ds_config import DeepSpeedSpec, deepspeed_config
from runtime.loop import LoopPosition, LoopSpec, TaskHooks
from runtime.loop import run_loop as run_training_loop
from runtime.metrics import MetricsLogger

log = logging.getLogger(__name__)
KEEP_LAST = 2  # complete checkpoints kept (plus whatever ``latest`` names)
T = TypeVar("T")


def fingerprint(*parts: Any) -> str:
    """Hash of what a checkpoint's tensors depend on (a resume with another one fails)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def step_batches(micro_batches: Iterable[T], accum: int, steps: int) -> Iterator[list[T]]:
    """At most ``steps`` optimizer steps of ``micro_batches``, each a list of ``accum``
    consecutive micro-batches (``run.grad_accum``).

    Nothing past the last whole step is drawn: the micro-batches of a trailing partial
    step are never loaded (as a loader's ``drop_last`` never loads a short batch), so they
    consume no augmentation draw that an exact resume would have to replay.
    """
    it = iter(micro_batches)
    for _ in range(steps):
        group = list(itertools.islice(it, accum))
        if len(group) < accum:
            return
        yield group


def build_engine(net: nn.Module, optimizer: torch.optim.Optimizer, *, zero_stage: int,
                 batch_size: int, grad_clip: float, grad_accum: int = 1,
                 persistence_threshold: int | None = None):
    """``net`` and our optimizer in a DeepSpeed engine (fp32 weights; clipping by it), and
    the DeepSpeed config it runs with. ``grad_accum``: DeepSpeed's
    ``gradient_accumulation_steps`` (its ``step()`` updates at every ``grad_accum``-th
    micro-batch only, and its ``backward`` scales each micro-batch loss by 1/grad_accum).
    ``persistence_threshold``: ZeRO-3 keeps parameters smaller than this whole on every
    rank (``run.zero_persistence_threshold``; None: DeepSpeed's default)."""
    import deepspeed

    config = deepspeed_config(DeepSpeedSpec(
        micro_batch=batch_size, zero_stage=zero_stage, grad_accum=grad_accum,
        grad_clip=grad_clip, overlap_comm=torch.cuda.is_available(),
        param_persistence_threshold=persistence_threshold))
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine, config


def run_loop(*, name: str, net: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             batches: Callable[[int], Iterable[Any]],
             loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
             evaluate: Callable[[], dict[str, float]], total_steps: int, eval_every: int,
             checkpoint_every: int, log_every: int, grad_clip: float, out_dir: Path,
             d: DistInfo, resume: str | None, progress: bool, batch_size: int,
             model_hash: str, zero_stage: int = 0, precision: str = "fp32",
             tensorboard: bool = True, grad_accum: int = 1,
             zero_persistence_threshold: int | None = None) -> dict[str, float]:
    """Train ``total_steps`` updates; ``batches(epoch)`` is one epoch's loader (sized) of
    micro-batches, ``grad_accum`` of which make one update.

    ``net``: the module the engine wraps and ``loss_fn`` calls (through the engine);
    ``evaluate`` runs on the bare model. Returns the last evaluation's metrics (with
    ``stopped_early`` and the ``step`` when a stop request ended the run first).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / "checkpoints"
    # everything that can refuse a resume is checked before any compute
    refuse_legacy_resume(resume, root)
    resume_dir, state = open_resume(resume, root, model_hash, d.world_size)
    engine, ds_config = build_engine(net, optimizer, zero_stage=zero_stage,
                                     batch_size=batch_size, grad_clip=grad_clip,
                                     grad_accum=grad_accum,
                                     persistence_threshold=zero_persistence_threshold)
    if d.is_main:  # next to config.yaml, as classification and pre-training write it
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    start = LoopPosition()
    if resume_dir is not None:
        path, _ = engine.load_checkpoint(str(resume_dir.parent), tag=resume_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {resume_dir}")
        start = LoopPosition(state["step"], state["epoch"], state["epoch_step"])
        log.info("resumed from %s at step %d", resume_dir, start.step)
    scheduler.step_update(start.step)
    # lines past the step this run starts from go (a dead run's; a fresh start: all)
    metrics = MetricsLogger(out_dir, d.is_main, total_steps, start.step, desc=name,
                            tensorboard=tensorboard, progress=progress, timestamp=True)
    # ``task``: what a later --init reads to tell a whole segmenter from a backbone
    shared = {"task": name, "world_size": d.world_size, "model_hash": model_hash,
              "zero_stage": zero_stage}

    def train_step(micro_batches: list) -> dict[str, torch.Tensor]:
        """One update; each loss is its mean over the micro-batches."""
        totals: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            broadcast_buffers(net, d)
            with torch.autocast(d.device.type, torch.bfloat16, enabled=precision == "bf16"):
                losses = {k: v.float() for k, v in loss_fn(engine, batch).items()}
            engine.backward(sum(losses.values()))  # scaled by 1/grad_accum by DeepSpeed
            # at the accumulation boundary only: clips (gradient_clipping), steps the
            # optimizer and zeroes the gradients
            engine.step()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach()
        return {k: v / len(micro_batches) for k, v in totals.items()}

    def epoch_steps(epoch: int, skip: int) -> Iterator[list]:
        """The epoch's updates from ``skip`` on (positions count updates, the loader
        micro-batches)."""
        loader = batches(epoch)
        return step_batches(rng.skip_batches(loader, skip * grad_accum), grad_accum,
                            len(loader) // grad_accum - skip)

    def run_evaluation() -> dict[str, float]:
        # every rank evaluates with rank 0's BatchNorm statistics (those a checkpoint
        # holds): the training forwards since the last broadcast updated each rank's own
        broadcast_buffers(net, d)
        engine.eval()
        result = evaluate()
        engine.train()
        return result

    def save(pos: LoopPosition) -> None:  # every rank: its shard and its random state
        save_checkpoint(engine, root, pos.step, {"rng": rng.rng_state()},
                        shared | {"step": pos.step, "epoch": pos.epoch,
                                  "epoch_step": pos.epoch_step}, d, KEEP_LAST)

    hooks = TaskHooks(batches=epoch_steps, train_step=train_step, evaluate=run_evaluation,
                      save=save)
    spec = LoopSpec(name=name, total_steps=total_steps, eval_every=eval_every,
                    checkpoint_every=checkpoint_every, log_every=log_every)
    engine.train()
    if state is not None:  # last: nothing between here and the first batch draws
        rng.restore_rank_rng([r["rng"] for r in state["ranks"]], d.rank, d.world_size)
    return run_training_loop(spec, hooks, start, optimizer=optimizer, scheduler=scheduler,
                             metrics=metrics, d=d)
