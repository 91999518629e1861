"""The classification training loop shared by the DDP and the DeepSpeed ZeRO entrypoints.

What differs between the engines (the optimisation step, EMA update, evaluation and the
checkpoint format) comes in as ``ClsSteps``; the epoch/step bookkeeping, mid-epoch resume,
Mixup/CutMix, the schedule, logging, the evaluation/checkpoint cadence and the stop request
(runtime/preemption.py: save at the step boundary and return) live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune import runtime
from runtime import preemption
from runtime.metrics import MetricsFile

log = logging.getLogger(__name__)


@dataclass
class ClsSteps:
    """Engine-specific parts: ``train`` runs forward, backward and the optimiser step of a
    (mixed) batch and returns the loss; ``after_step(step)`` (EMA); ``evaluate(val_loader)``
    returns the metrics; ``save(step)`` writes a checkpoint (called on every rank)."""

    train: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    after_step: Callable[[int], None]
    evaluate: Callable[[DataLoader], dict]
    save: Callable[[int], None]


def run_classification(cfg, d: runtime.Dist, train_set, val_set, steps: ClsSteps, *,
                       optimizer: torch.optim.Optimizer, scheduler, mixup, start_step: int,
                       steps_per_epoch: int, total: int, metrics: MetricsFile,
                       desc: str) -> dict:
    """Train from ``start_step`` to ``total``; returns the last evaluation (with
    ``stopped_early`` and the ``step`` when a stop request ended the run first)."""
    from finetune.cls_data import build_loaders, epoch_batches

    eval_every = cfg.run.eval_every or steps_per_epoch
    ckpt_every = cfg.run.checkpoint_every or eval_every
    step, last_eval = start_step, {}
    bar = tqdm(total=total, initial=step, disable=not (d.is_main and cfg.run.progress),
               desc=desc, dynamic_ncols=True)
    while step < total:
        epoch = step // max(1, steps_per_epoch)
        skip = step - epoch * steps_per_epoch  # mid-epoch resume: skip consumed batches
        train_loader, val_loader, sampler = build_loaders(cfg, d, train_set, val_set, epoch,
                                                          skip)
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, labels in epoch_batches(train_loader, skip):
            images, labels = images.to(d.device), labels.to(d.device)
            if mixup is not None:
                images, labels = mixup(images, labels)
            loss = steps.train(images, labels)
            step += 1
            scheduler.step_update(step)
            steps.after_step(step)
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == 1:
                lr = max(g["lr"] for g in optimizer.param_groups)
                metrics.write(step=step, epoch=epoch, loss=loss.item(), lr=lr)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % eval_every == 0 or step == total:
                last_eval = steps.evaluate(val_loader)
                metrics.write(step=step, epoch=epoch, **last_eval)
                if d.is_main:
                    log.info("step %d: %s", step, last_eval)
            saved = step % ckpt_every == 0 or step == total
            if saved:
                steps.save(step)
            preemption.kill_point(step)
            if preemption.stop_agreed(d.device):  # every rank leaves at this same step
                if not saved:
                    steps.save(step)
                if d.is_main:
                    log.warning("stop requested: saved at step %d, returning", step)
                bar.close()
                return {**last_eval, "step": step, "stopped_early": True}
            if step >= total:
                break
    bar.close()
    return last_eval
