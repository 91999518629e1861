"""The iteration-based training loop shared by detection and segmentation.

The task supplies a model whose forward returns a dict of losses, a batch iterator factory
and an evaluation function; the loop owns the schedule, clipping, progress bar,
metrics.jsonl, periodic evaluation, checkpoints, ``--resume auto`` (exact: mid-epoch
position and every rank's random state) and the stop request (runtime/preemption.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from finetune import runtime
from runtime import preemption, rng
from runtime.metrics import MetricsFile

log = logging.getLogger(__name__)


def run_loop(*, name: str, model: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler, batches: Callable[[int], Iterable[Any]],
             loss_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
             evaluate: Callable[[], dict[str, float]], total_steps: int, eval_every: int,
             checkpoint_every: int, log_every: int, grad_clip: float, out_dir: Path,
             d: runtime.Dist, resume: str | None, progress: bool,
             precision: str = "fp32") -> dict[str, float]:
    """Train ``total_steps`` updates; ``batches(epoch)`` yields one epoch of batches.

    ``model`` is the bare module (saved/restored), ``net`` what is called (DDP or model).
    Returns the last evaluation's metrics (with ``stopped_early`` and the ``step`` when a
    stop request ended the run first).
    """
    step, epoch, skip, last_eval = 0, 0, 0, {}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    resume_path = runtime.resolve_resume(resume, out_dir)
    state = None
    if resume_path is not None:
        state = runtime.load_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        # mid-epoch: the batches of ``epoch`` already trained on (absent in checkpoints
        # written before it was saved, whose ``epoch`` is the next one to start)
        skip = state.get("epoch_step", 0)
        log.info("resumed from %s at step %d", resume_path, step)
    scheduler.step_update(step)
    # lines past the step this run starts from go (a dead run's; a fresh start: all)
    metrics = MetricsFile(out_dir, d.is_main, resume_step=step, timestamp=True)
    bar = tqdm(total=total_steps, initial=step, desc=name, dynamic_ncols=True,
               disable=not (d.is_main and progress))

    def save(in_epoch: int) -> None:  # on every rank: each contributes its random state
        rng_states = rng.gather_rng_states()
        if d.is_main:
            runtime.save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": epoch, "epoch_step": in_epoch,
                "rng_ranks": rng_states})

    net.train()
    if state is not None:  # last: nothing between here and the first batch draws
        rng.restore_rank_rng(state.get("rng_ranks"), d.rank, d.world_size)
    while step < total_steps:
        in_epoch = skip
        for batch in rng.skip_batches(batches(epoch), skip):
            with torch.autocast(d.device.type, torch.bfloat16, enabled=precision == "bf16"):
                losses = {k: v.float() for k, v in loss_fn(net, batch).items()}
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
            in_epoch += 1
            scheduler.step_update(step)
            bar.update(1)
            if step % log_every == 0 or step == 1:
                record = {k: round(v.item(), 5) for k, v in losses.items()}
                metrics.write(step=step, epoch=epoch, loss=loss.item(),
                              lr=max(g["lr"] for g in optimizer.param_groups), **record)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % eval_every == 0 or step == total_steps:
                net.eval()
                last_eval = evaluate()
                net.train()
                metrics.write(step=step, epoch=epoch, **last_eval)
                log.info("step %d: %s", step, last_eval)
            saved = step % checkpoint_every == 0 or step == total_steps
            if saved:
                save(in_epoch)
            preemption.kill_point(step)
            if preemption.stop_agreed(d.device):  # every rank leaves at this same step
                if not saved:
                    save(in_epoch)
                log.warning("stop requested: saved at step %d, returning", step)
                bar.close()
                return {**last_eval, "step": step, "stopped_early": True}
            if step >= total_steps:
                break
        if in_epoch == 0:
            raise ValueError(f"{name}: an epoch holds no batch (fewer samples than "
                             "run.batch_size x processes); lower run.batch_size")
        epoch, skip = epoch + 1, 0
    bar.close()
    return last_eval
