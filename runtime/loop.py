"""The one training loop of every task (pre-training and each fine-tuning task); a task
plugs in through :class:`TaskHooks`.

The loop owns what every task does alike: epochs and the position inside one (mid-epoch
resume), the schedule (stepped per update), the progress bar, the metrics records
(runtime/metrics.py: metrics.jsonl and TensorBoard), the evaluation and checkpoint
cadence, the stop request (runtime/preemption.py: save at the step boundary, every rank
together, and return) and the kill point the resume tests use.

The task supplies its batches, one optimisation step (forward, backward, clipping and the
optimizer step through whichever engine it built, with as many micro-batches as it
accumulates), its evaluation and its checkpoint writer, so the engine and the checkpoint
format stay the task's choice. Pre-training is one endless epoch whose position is its
data loader's own state, a task that owns its lr schedule passes no ``scheduler``, and a
task may report a step as skipped (a non-finite loss) or add values to each log record.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from runtime import preemption
from runtime.best import BestCheckpoint
from runtime.dist import DistInfo, decided_on_rank0, mean_by_name
from runtime.metrics import MetricsLogger

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class LoopPosition:
    """Where a run stands: optimizer steps done, the epoch, and the batches of that epoch
    already trained on (what a mid-epoch resume skips). ``eval_owed``: the evaluation due
    at ``step`` was skipped by a stop request; a checkpoint records it (``EVAL_OWED`` in
    its trainer state) and a run resumed from it evaluates first."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    eval_owed: bool = False


# The trainer-state key under which a task's checkpoint records ``LoopPosition.eval_owed``.
EVAL_OWED = "eval_owed"
# The mark of an owed evaluation's record in metrics.jsonl (see _owed_evaluation).
OWED_MARK = "owed_evaluation"


def owes_evaluation(state: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint whose trainer state is ``state`` (None: a fresh start) owes
    the evaluation of its step (``EVAL_OWED``; a checkpoint saved before it was recorded
    owes none)."""
    return bool(state.get(EVAL_OWED, False)) if state is not None else False


@dataclass
class LoopSpec:
    """Length and cadence of a run, in optimizer steps.

    ``eval_every`` / ``checkpoint_every``: 0 means at the last step only (both also run at
    the last step otherwise). Training records are written every ``log_every`` steps, and
    at step 1 (``log_first``) and/or the last step (``log_last``). ``epochs``: the run
    counts epochs, and each record carries its ``epoch`` (pre-training is one endless
    epoch and leaves it out).
    """

    name: str
    total_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    log_first: bool = True
    log_last: bool = False
    epochs: bool = True
    # the task's train_step returns its losses already averaged over the ranks
    # (pre-training's, which it needs every step); else the loop averages them at log steps
    losses_over_ranks: bool = False


class RefusedStart(ValueError):
    """A start refused before any compute for a reason known only once the processes are
    up (their number, the device): the command line reports it in one line, exit 2."""


class EmptyEpochError(RefusedStart):
    """An epoch of the training set holds no optimizer step: fewer samples than
    ``run.batch_size x run.grad_accum x processes`` (a refused start, one line)."""

    def __init__(self, name: str, samples: int | None = None) -> None:
        held = f"{samples} samples" if samples is not None else "fewer samples"
        super().__init__(f"{name}: an epoch holds no optimizer step ({held} a process, "
                         "fewer than run.batch_size x run.grad_accum); lower run.batch_size "
                         "or run.grad_accum, or use fewer processes")


def refuse_empty_epoch(name: str, steps_per_epoch: int, samples: int | None = None) -> None:
    """Raise :class:`EmptyEpochError` when ``steps_per_epoch`` is 0: called where the count
    is first known, before the model and the engine are built (the loop, which would meet
    it at its first epoch, checks again)."""
    if steps_per_epoch < 1:
        raise EmptyEpochError(name, samples)


def _no_op(step: int) -> None:
    return None


def _no_values(step: int) -> dict[str, Any]:
    return {}


@dataclass
class TaskHooks:
    """What a task plugs into :func:`run_loop`.

    ``batches(epoch, skip)``: the batches of ``epoch`` after the first ``skip`` (already
    trained on), drawn without disturbing the random state; an endless iterable for a task
    whose data position is its loader's own (pre-training). ``train_step(batch)``: one
    optimisation step; returns the named losses (the loop logs their sum as ``loss``, and
    each one unless the only name is ``loss``), or None for a step the task skipped (a
    non-finite loss): it counts as a step but is neither logged nor followed by
    ``after_step``. ``evaluate()``: metrics, called on every rank (an empty dict logs
    nothing). ``save(position)``: a checkpoint, called on every rank.
    ``after_step(step)``: after each step taken (e.g. EMA); ``skipped(step)``: after each
    skipped one. ``log_values(step)``: more values for the training record of ``step``
    (throughput, temperature, data statistics; an ``lr`` here replaces the loop's),
    called on every rank at each logged step, so it may run collectives.
    """

    batches: Callable[[int, int], Iterable[Any]]
    train_step: Callable[[Any], dict[str, torch.Tensor] | None]
    evaluate: Callable[[], dict[str, float]]
    save: Callable[[LoopPosition], None]
    after_step: Callable[[int], None] = field(default=_no_op)
    skipped: Callable[[int], None] = field(default=_no_op)
    log_values: Callable[[int], dict[str, Any]] = field(default=_no_values)


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


def accumulated_step(micro_step: Callable[[T], dict[str, torch.Tensor]],
                     micro_batches: list[T]) -> dict[str, torch.Tensor]:
    """One optimizer update over ``micro_batches`` (a group from :func:`step_batches`):
    ``micro_step(batch)`` runs one micro-batch's forward, backward and engine step (a
    DeepSpeed engine updates the weights at its ``gradient_accumulation_steps``-th call
    only) and returns its named losses; each comes back as its mean over the group, the
    loss of the whole update (DeepSpeed scales each micro-batch's gradient by
    1/accumulation steps alike)."""
    totals: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        for name, value in micro_step(batch).items():
            totals[name] = totals[name] + value.detach() if name in totals else value.detach()
    return {name: total / len(micro_batches) for name, total in totals.items()}


def _due(every: int, step: int, total: int) -> bool:
    """Periodic work (evaluation, checkpoint) at every ``every`` steps (never for 0) and
    at the last step."""
    return (every > 0 and step % every == 0) or step == total


def _log_due(spec: LoopSpec, step: int) -> bool:
    return (step % spec.log_every == 0 or (spec.log_first and step == 1)
            or (spec.log_last and step == spec.total_steps))


def _total_loss(losses: dict[str, torch.Tensor]) -> float:
    if list(losses) == ["loss"]:  # the total itself, at its own precision
        return losses["loss"].item()
    return sum(v.detach().float() for v in losses.values()).item()


def _rank_mean(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step's named losses averaged over the ranks (float64), as mmdet and mmseg log
    theirs (``_parse_losses``: each logged loss all-reduced and divided by the world
    size): one all-reduce, at log steps only, which every rank reaches together (a step is
    skipped on all ranks or none). A task's loss names are the same on every rank."""
    means = mean_by_name({n: v.detach().double().item() for n, v in losses.items()})
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in means.items()}


def _log_step(metrics: MetricsLogger, spec: LoopSpec, pos: LoopPosition,
              losses: dict[str, torch.Tensor], optimizer, extra: dict[str, Any]) -> None:
    if not spec.losses_over_ranks:
        losses = _rank_mean(losses)
    loss = _total_loss(losses)
    record: dict[str, Any] = {"epoch": pos.epoch} if spec.epochs else {}
    record["loss"] = loss
    if optimizer is not None:
        record["lr"] = max(g["lr"] for g in optimizer.param_groups)
    # a lone ``loss`` is the total itself; any other names are logged each
    if list(losses) != ["loss"]:
        record |= {k: round(v.item(), 5) for k, v in losses.items()}
    metrics.log(pos.step, record | extra)
    postfix = {"loss": f"{loss:.4f}"}
    if "images_per_s" in extra:
        postfix["img_s"] = f"{extra['images_per_s']:.1f}"
    metrics.progress(pos.step, **postfix)


def _evaluate(hooks: TaskHooks, spec: LoopSpec, pos: LoopPosition, metrics: MetricsLogger,
              d: DistInfo, mark: dict[str, Any] | None = None) -> dict[str, float]:
    result = hooks.evaluate()
    if result:
        # a resume at an epoch's end may stand at the next epoch's start (classification
        # derives its position from the step): the step it evaluates ended the epoch before
        epoch = pos.epoch - 1 if pos.epoch_step == 0 and pos.step > 0 else pos.epoch
        metrics.log(pos.step, ({"epoch": epoch} if spec.epochs else {}) | result
                    | (mark or {}))
        if d.is_main:
            log.info("step %d: %s", pos.step, result)
    return result


def _owed_evaluation(hooks: TaskHooks, spec: LoopSpec, pos: LoopPosition,
                     metrics: MetricsLogger, d: DistInfo,
                     best: Sequence[BestCheckpoint]) -> dict[str, float]:
    """The evaluation a stop skipped at ``pos.step``, run on resuming from that step's
    checkpoint (the weights it would have evaluated), its record marked ``OWED_MARK``.
    Only a save clears the debt, so a resume that died before its next one leaves it to
    the next: that one finds the record (kept by the cut back to this step) and takes
    its values instead of logging the evaluation twice. That checkpoint is published: an
    improving result names it best at once, with no save between (except during a
    rewind, whose first save must come first: then it is logged only)."""
    from runtime.checkpoint import ResumeError

    # rank 0 reads the file; every rank takes its answer (the evaluation is collective),
    # or its failure to read it (the others would wait for its answer until the timeout)
    earlier = decided_on_rank0(
        lambda: next((r for r in metrics.logged_at(pos.step) if r.get(OWED_MARK)), None),
        ResumeError, f"step {pos.step}: rank 0 could not read the metrics file's records "
        "of the owed evaluation")
    if earlier is not None:
        result = {k: v for k, v in earlier.items()
                  if k not in ("time", "step", "epoch", OWED_MARK)}
        if d.is_main:
            log.info("step %d: the evaluation the stop skipped was made by an earlier "
                     "resume: %s", pos.step, result)
    else:
        if d.is_main:
            log.info("step %d: running the evaluation the stop before this resume "
                     "skipped", pos.step)
        result = _evaluate(hooks, spec, pos, metrics, d, {OWED_MARK: True})
    for b in best:
        # not during a rewind: its pointer keeps naming the branch ``latest`` names
        # until this run's first save is published (runtime/best.py)
        if b.improves(result) and b.abandoned is None:
            b.record(pos.step, result)
    return result


def _save(hooks: TaskHooks, pos: LoopPosition, metrics: MetricsLogger) -> None:
    # the records up to the checkpoint on disk before it is published: they survive a
    # kill and a node's crash, as the checkpoint does
    metrics.sync()
    hooks.save(pos)
    metrics.checkpointed()  # what a resume cut is no checkpoint's any more


def run_loop(spec: LoopSpec, hooks: TaskHooks, start: LoopPosition, *, optimizer=None,
             scheduler=None, metrics: MetricsLogger, d: DistInfo,
             best: Sequence[BestCheckpoint] = ()) -> dict:
    """Train from ``start`` to ``spec.total_steps``; returns the last evaluation (with
    ``stopped_early`` and the ``step`` when a stop request ended the run first).

    ``scheduler``: timm-style (``step_update(step)``), stepped by the loop; None where the
    task's engine steps its own. ``optimizer``: its largest group lr is logged (None: the
    task logs its lr through ``log_values``). ``metrics`` is closed when the loop ends.
    ``best``: an evaluation that improves on one of them (by its metric: top-1, and the
    EMA's) is saved (at once, when no checkpoint is due at its step) and recorded as that
    one's best checkpoint (runtime/best.py).
    """
    try:
        return _run(spec, hooks, start, optimizer, scheduler, metrics, d, best)
    finally:
        metrics.close()


def _run(spec: LoopSpec, hooks: TaskHooks, start: LoopPosition, optimizer, scheduler,
         metrics: MetricsLogger, d: DistInfo, best: Sequence[BestCheckpoint]) -> dict:
    pos, last_eval = LoopPosition(start.step, start.epoch, start.epoch_step), {}
    if scheduler is not None:
        scheduler.step_update(pos.step)
    if start.eval_owed and pos.step > 0:
        # A stop that came during the resume's set-up or during this evaluation (minutes
        # on ImageNet or COCO at scale) ends the run here, before it trains: the
        # checkpoint it resumed from is this step's and still owes the evaluation (the
        # next resume takes the record if this one was made), so nothing is saved.
        if not preemption.stop_agreed(d.device):
            last_eval = _owed_evaluation(hooks, spec, pos, metrics, d, best)
        if preemption.stop_agreed(d.device):
            if d.is_main:
                log.warning("stop requested: returning at step %d, the checkpoint this "
                            "run resumed from", pos.step)
            return {**last_eval, "step": pos.step, "stopped_early": True}
    while pos.step < spec.total_steps:
        skipped = pos.epoch_step  # a resumed epoch may have no batch left: not an error
        for batch in hooks.batches(pos.epoch, pos.epoch_step):
            losses = hooks.train_step(batch)
            pos.step += 1
            pos.epoch_step += 1
            if scheduler is not None:
                scheduler.step_update(pos.step)
            if losses is None:
                hooks.skipped(pos.step)
            else:
                hooks.after_step(pos.step)
            if losses is not None and _log_due(spec, pos.step):
                _log_step(metrics, spec, pos, losses, optimizer, hooks.log_values(pos.step))
            else:
                metrics.progress(pos.step)
            # Asked before the evaluation: a stop request (SLURM's warning signal before
            # the time limit) leaves a grace period that the checkpoint needs and that an
            # evaluation (minutes on ImageNet or COCO at scale) would use up first. The
            # evaluation due at the stop step is then skipped (logged), except at the
            # last step, which no resumed run would come back to. Asked again after an
            # evaluation and after a save (both collective, so every rank asks at the same
            # point): a stop that came during either saves at this step, or is this step's
            # save, instead of training one more step and saving again (torchrun gives
            # 30 s from SIGTERM to SIGKILL).
            stopping = preemption.stop_agreed(d.device)  # every rank: the same answer
            last = pos.step >= spec.total_steps
            improved: list[BestCheckpoint] = []
            if _due(spec.eval_every, pos.step, spec.total_steps):
                if stopping and not last:
                    if d.is_main:
                        log.warning("stop requested: the evaluation due at step %d is "
                                    "skipped to save in time (a resume runs it first)",
                                    pos.step)
                    pos.eval_owed = True  # recorded by the save below
                else:
                    last_eval = _evaluate(hooks, spec, pos, metrics, d)
                    improved = [b for b in best if b.improves(last_eval)]
                    stopping = preemption.stop_agreed(d.device) or stopping
            if stopping or improved or _due(spec.checkpoint_every, pos.step,
                                            spec.total_steps):
                for b in improved:  # named pending first: a kill in the save loses no best
                    b.begin(pos.step, last_eval)
                _save(hooks, pos, metrics)
                for b in improved:  # published: the pointer names it alone now
                    b.record(pos.step, last_eval)
                for b in best:  # a rewind's abandoned branch is left behind for good now
                    b.settle()
                stopping = preemption.stop_agreed(d.device) or stopping
            preemption.kill_point(pos.step)
            if last:  # finished, whatever came during its last step
                break
            if stopping:  # every rank leaves at this same step
                if d.is_main:
                    log.warning("stop requested: saved at step %d, returning", pos.step)
                return {**last_eval, "step": pos.step, "stopped_early": True}
        if pos.epoch_step == 0 and skipped == 0:
            raise EmptyEpochError(spec.name)
        pos.epoch, pos.epoch_step = pos.epoch + 1, 0
    return last_eval
