"""Classification on the one training loop (runtime/loop.py).

The engine-side parts (the optimisation step, EMA update, evaluation and the checkpoint,
finetune/zero.py) come in as ``ClsSteps``; what classification adds to every task's loop
lives here: per-epoch loaders (the validation loader is the epoch's), Mixup/CutMix on the
batch, the data counts of a streaming set in each training record, and the position
derived from the step (checkpoints store the step only).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from runtime.dist import DistInfo, all_gather_objects
from runtime.loop import (
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
    returns the metrics; ``save(step)`` writes a checkpoint (called on every rank)."""

    train: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    after_step: Callable[[int], None]
    evaluate: Callable[[DataLoader], dict]
    save: Callable[[int], None]


def data_values(train_set) -> dict:
    """What a training record adds about the data: a streaming set's skip and shard counts
    summed over ranks (``skipped``: by reason, as pre-training logs them), this run's
    process so far. A collective on every rank (as :class:`runtime.loop.TaskHooks` allows);
    nothing for an in-memory set, which counted its skips when it was read."""
    from finetune.cls_stream import StreamingShards

    if not isinstance(train_set, StreamingShards):
        return {}
    skipped: Counter = Counter()
    for counts in all_gather_objects(dict(train_set.stats.skipped)):
        skipped.update(counts)
    return {"skipped": dict(sorted(skipped.items()))}


def run_classification(cfg, d: DistInfo, train_set, val_set, steps: ClsSteps, *,
                       optimizer: torch.optim.Optimizer, scheduler, mixup, start_step: int,
                       steps_per_epoch: int, total: int, metrics: MetricsLogger,
                       desc: str) -> dict:
    """Train from ``start_step`` to ``total``; returns the last evaluation (with
    ``stopped_early`` and the ``step`` when a stop request ended the run first).

    Steps are optimizer steps of ``run.grad_accum`` micro-batches each;
    ``steps_per_epoch`` counts them."""
    from finetune.cls_data import build_loaders, epoch_batches

    eval_every = cfg.run.eval_interval(steps_per_epoch)
    accum = cfg.run.grad_accum
    loaders: dict[str, DataLoader] = {}

    def batches(epoch: int, skip: int):
        train_loader, loaders["val"], sampler = build_loaders(cfg, d, train_set, val_set,
                                                              epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        # the loaders count micro-batches: a resume skips ``skip`` whole steps of them
        return step_batches(epoch_batches(train_loader, skip * accum), accum,
                            steps_per_epoch - skip)

    def micro_step(batch) -> dict[str, torch.Tensor]:
        images, labels = (t.to(d.device) for t in batch)
        if mixup is not None:
            images, labels = mixup(images, labels)
        return {"loss": steps.train(images, labels)}

    # one update; its loss is the mean over the micro-batches
    hooks = TaskHooks(batches=batches,
                      train_step=lambda group: accumulated_step(micro_step, group),
                      evaluate=lambda: steps.evaluate(loaders["val"]),
                      save=lambda pos: steps.save(pos.step), after_step=steps.after_step,
                      log_values=lambda step: data_values(train_set))
    spec = LoopSpec(name=desc, total_steps=total, eval_every=eval_every,
                    checkpoint_every=cfg.run.checkpoint_every or eval_every,
                    log_every=cfg.run.log_every)
    epoch = start_step // max(1, steps_per_epoch)
    start = LoopPosition(start_step, epoch, start_step - epoch * steps_per_epoch)
    return run_loop(spec, hooks, start, optimizer=optimizer, scheduler=scheduler,
                    metrics=metrics, d=d)
