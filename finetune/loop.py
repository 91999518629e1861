"""Detection and segmentation on the one training loop (runtime/loop.py), run by a
DeepSpeed engine (``run.zero_stage`` 0..3) as classification and pre-training are.

The task supplies the module the engine wraps (its forward returns a dict of losses), a
batch iterator factory and an evaluation function; the engine, its resume, checkpoints and
metrics are fine-tuning's one set (finetune/engine.py: the one DeepSpeed-config builder,
the one checkpoint format with per-rank random state and, here, the position in
``trainer_state.json``, an exact ``--resume auto``); this file adds the optimisation step
of a micro-batch (bf16 through autocast over fp32 weights, as before DeepSpeed).

ZeRO-3: the engine partitions the module at ``deepspeed.initialize`` (as classification's);
the dense evaluations run each rank's share of the validation set on the bare module with
every forward pass in lock-step across ranks (runtime/lockstep.py), since a ZeRO-3 module
needs every rank in every forward. Rank 0's buffers (BatchNorm statistics) are broadcast
after every training micro-step (runtime.dist.broadcast_buffers), so all ranks evaluate the
weights and statistics the checkpoint holds.

Unreadable training items replaced by the next readable one: each batch carries its count
(``finetune.dense_data.Counted``), logged as the records' ``skipped`` and kept in
``trainer_state.json`` (finetune/skip_counts.py, as every fine-tuning task does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.dense_data import Counted
from finetune.engine import (
    batch_state,
    fingerprint,
    open_metrics,
    open_run,
    start_engine,
)
from finetune.skip_counts import SkipCounts
from runtime.checkpoint import BEST, discard_config, engine_layout, publish_config
from runtime.dist import DistInfo, broadcast_buffers
from runtime.ds_config import DeepSpeedSpec
from runtime.loop import (
    EVAL_OWED,
    LoopPosition,
    LoopSpec,
    TaskHooks,
    accumulated_step,
    owes_evaluation,
    step_batches,
)
from runtime.loop import run_loop as run_training_loop

__all__ = ["fingerprint", "run_loop"]  # fingerprint: what detection/segmentation hash with


def run_loop(*, name: str, net: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             batches: Callable[[int, int], Iterable[Counted]],
             loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
             evaluate: Callable[[], dict[str, float]], total_steps: int, eval_every: int,
             checkpoint_every: int, log_every: int, grad_clip: float, out_dir: Path,
             d: DistInfo, resume: str | None, progress: bool, batch_size: int,
             model_hash: str, zero_stage: int = 0, precision: str = "fp32",
             tensorboard: bool = True, grad_accum: int = 1,
             zero_persistence_threshold: int | None = None, keep_last: int = 2,
             best_metric: str | None = None) -> dict[str, float]:
    """Train ``total_steps`` updates; ``batches(epoch, skip)`` is one epoch's loader
    (sized) of micro-batches from micro-batch ``skip`` on (a resumed epoch's), each a
    :class:`finetune.dense_data.Counted` (the batch ``loss_fn`` takes and the unreadable
    items it replaced), ``grad_accum`` of which make one update.

    ``net``: the module the engine wraps and ``loss_fn`` calls (through the engine);
    ``evaluate`` runs on the bare model. Returns the last evaluation's metrics (with
    ``stopped_early`` and the ``step`` when a stop request ended the run first).
    """
    # bf16 through autocast over fp32 weights (as before DeepSpeed): the engine's are fp32
    engine_state = engine_layout(zero_stage, "fp32")
    # may refuse: before compute
    batch = batch_state(batch_size, grad_accum)
    run = open_run(resume, out_dir, model_hash, d.world_size, engine_state, publish=False,
                   batch=batch, rank=d.rank, task=name,
                   keep_last=keep_last)
    done = run.completed(total_steps, d)
    if done is not None:  # nothing to train: the run's own config.yaml stays
        discard_config(out_dir)
        return done
    # may refuse (a pointer rank 0 cannot read): before the config and the metrics
    best = run.bests({BEST: best_metric} if best_metric else {}, run.start_step, d.is_main)
    publish_config(out_dir)
    engine, _ = start_engine(net, optimizer, DeepSpeedSpec(
        micro_batch=batch_size, zero_stage=zero_stage, grad_accum=grad_accum,
        grad_clip=grad_clip, overlap_comm=torch.cuda.is_available(),
        param_persistence_threshold=zero_persistence_threshold), run, d)
    start = LoopPosition()
    if run.state is not None:
        start = LoopPosition(run.start_step, run.state["epoch"], run.state["epoch_step"],
                             owes_evaluation(run.state))
    scheduler.step_update(start.step)
    metrics = open_metrics(run, d, total_steps, name, tensorboard=tensorboard,
                           progress=progress)
    # ``task``: what a later --init reads to tell a whole segmenter from a backbone
    shared = {"task": name, "world_size": d.world_size, "model_hash": model_hash,
              "engine": engine_state, "batch": batch}
    skips = SkipCounts(run.state.get("skipped") if run.state is not None else None)

    def micro_step(batch: Any) -> dict[str, torch.Tensor]:
        with torch.autocast(d.device.type, torch.bfloat16, enabled=precision == "bf16"):
            losses = {k: v.float() for k, v in loss_fn(engine, batch).items()}
        engine.backward(sum(losses.values()))  # scaled by 1/grad_accum by DeepSpeed
        # at the accumulation boundary only: clips (gradient_clipping), steps the
        # optimizer and zeroes the gradients
        engine.step()
        # the forward updated this rank's own statistics (after the backward: BatchNorm
        # saves them for it and refuses in-place changes)
        broadcast_buffers(net, d)
        return losses

    def epoch_steps(epoch: int, skip: int) -> Iterator[list]:
        """The epoch's updates from ``skip`` on (positions count updates, the loader
        micro-batches)."""
        # the skipped micro-batches are not read (their samples' replacements were counted
        # by the run that trained on them)
        loader = batches(epoch, skip * grad_accum)
        return step_batches(skips.counted(loader), grad_accum, len(loader) // grad_accum)

    def run_evaluation() -> dict[str, float]:
        engine.eval()
        result = evaluate()
        engine.train()
        return result

    def save(pos: LoopPosition) -> None:  # every rank: its shard and its random state
        run.save(engine, pos.step, shared | {"epoch": pos.epoch, "epoch_step": pos.epoch_step,
                                             EVAL_OWED: pos.eval_owed, **skips.state()}, d)

    hooks = TaskHooks(batches=epoch_steps,
                      train_step=lambda group: accumulated_step(micro_step, group),
                      evaluate=run_evaluation, save=save,
                      log_values=lambda step: skips.record())
    spec = LoopSpec(name=name, total_steps=total_steps, eval_every=eval_every,
                    checkpoint_every=checkpoint_every, log_every=log_every)
    engine.train()
    run.restore_rng(d)  # last: nothing between here and the first batch draws
    return run_training_loop(spec, hooks, start, optimizer=optimizer, scheduler=scheduler,
                             metrics=metrics, d=d,
                             best=best)
