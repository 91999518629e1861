"""Classification on the one training loop (runtime/loop.py).

The engine-side parts (the optimisation step, EMA update, evaluation and the checkpoint,
finetune/zero.py) come in as ``ClsSteps``; what classification adds to every task's loop
lives here: per-epoch loaders (the validation loader is the epoch's), Mixup/CutMix on the
batch, the skipped samples in each training record, and the position derived from the
step (checkpoints store the step only).

``skipped`` (metrics.jsonl): finetune/skip_counts.py, as every fine-tuning task logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from finetune.skip_counts import SkipCounts
from runtime.best import BestCheckpoint
from runtime.dist import DistInfo
from runtime.loop import (
    EVAL_OWED,
    LoopPosition,
    LoopSpec,
    TaskHooks,
    accumulated_step,
    run_loop,
    step_batches,
)
from runtime.metrics import MetricsLogger

log = logging.getLogger(__name__)


@dataclass
class ClsSteps:
    """Engine-specific parts: ``train`` runs forward, backward and the engine's step of one
    (mixed) micro-batch and returns its loss (the engine updates the weights at every
    ``run.grad_accum``-th micro-batch); ``after_step(step)`` (EMA); ``evaluate(val_loader)``
    returns the metrics; ``save(step, state)`` writes a checkpoint whose shared state
    (``trainer_state.json``) holds ``state`` too (called on every rank)."""

    train: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    after_step: Callable[[int], None]
    evaluate: Callable[[DataLoader], dict]
    save: Callable[[int, dict[str, Any]], None]


def run_classification(cfg, d: DistInfo, train_set, val_set, steps: ClsSteps, *,
                       optimizer: torch.optim.Optimizer, scheduler, mixup, start_step: int,
                       steps_per_epoch: int, total: int, metrics: MetricsLogger,
                       desc: str, skipped_before: Mapping[str, int] | None = None,
                       best: Sequence[BestCheckpoint] = (), eval_owed: bool = False) -> dict:
    """Train from ``start_step`` to ``total``; returns the last evaluation (with
    ``stopped_early`` and the ``step`` when a stop request ended the run first).

    Steps are optimizer steps of ``run.grad_accum`` micro-batches each;
    ``steps_per_epoch`` counts them. ``skipped_before``: the resumed checkpoint's
    ``skipped`` (its shared state's), which a map-style set's count goes on from.
    ``best``: the run's best checkpoints so far, by top-1 and the EMA's (runtime/best.py;
    none: not kept)."""
    from finetune.cls_data import build_loaders, build_val_loader, epoch_batches

    eval_every = cfg.run.eval_interval(steps_per_epoch)
    accum = cfg.run.grad_accum
    loaders: dict[str, DataLoader] = {}
    from finetune.cls_stream import StreamingShards

    stream = train_set if isinstance(train_set, StreamingShards) else None
    # in-memory shards skip unusable samples once, as they load (the same on every rank)
    skips = SkipCounts(skipped_before,
                       stream=(lambda: stream.stats.skipped) if stream is not None else None,
                       loaded=getattr(train_set, "skipped_by_reason", None))

    def batches(epoch: int, skip: int):
        # the loaders count micro-batches: a resume skips ``skip`` whole steps of them
        train_loader, loaders["val"], _ = build_loaders(cfg, d, train_set, val_set, epoch,
                                                        skip * accum)
        micro = epoch_batches(train_loader)
        if skips.stream is None:  # counted after the skip: those were counted before
            micro = skips.counted(micro)
        return step_batches(micro, accum, steps_per_epoch - skip)

    def evaluate() -> dict:
        # a resume owing an evaluation runs it before the first batches build the loaders
        # (the validation loader draws from its own generator, not training's)
        if "val" not in loaders:
            loaders["val"] = build_val_loader(cfg, d, val_set)
        return steps.evaluate(loaders["val"])

    def micro_step(batch) -> dict[str, torch.Tensor]:
        images, labels = (t.to(d.device) for t in batch)
        if mixup is not None:
            images, labels = mixup(images, labels)
        return {"loss": steps.train(images, labels)}

    # one update; its loss is the mean over the micro-batches
    hooks = TaskHooks(batches=batches,
                      train_step=lambda group: accumulated_step(micro_step, group),
                      evaluate=evaluate,
                      save=lambda pos: steps.save(pos.step, skips.state()
                                                  | {EVAL_OWED: pos.eval_owed}),
                      after_step=steps.after_step,
                      log_values=lambda step: skips.record())
    spec = LoopSpec(name=desc, total_steps=total, eval_every=eval_every,
                    checkpoint_every=cfg.run.checkpoint_every or eval_every,
                    log_every=cfg.run.log_every)
    epoch = start_step // max(1, steps_per_epoch)
    start = LoopPosition(start_step, epoch, start_step - epoch * steps_per_epoch, eval_owed)
    return run_loop(spec, hooks, start, optimizer=optimizer, scheduler=scheduler,
                    metrics=metrics, d=d, best=best)
