"""The run's best checkpoint by its evaluation metric, kept whatever the retention.

A fine-tuning run keeps its newest ``run.keep_last`` checkpoints; the one whose evaluation
scored best (top-1, box AP, mIoU: higher is better) may be older, and was pruned with the
rest, its weights lost. As the released code does (classification ``main.py`` writes
``ckpt_epoch_best.pth`` when ``max_accuracy`` improves; the detection and segmentation
configs set ``save_best``), an evaluation that improves on the best so far makes the loop
save at that step (when no checkpoint was due there) and points
``checkpoints/best.json`` at it: ``{"tag", "step", "metric", "value"}``. A classification
run with an EMA keeps a second best, the EMA's top-1 (``top1_ema``), in
``checkpoints/best_ema.json`` (the released main.py's ``ckpt_epoch_ema_best.pth``, kept by
its own ``max_ema_accuracy``). :func:`runtime.checkpoint.prune` never deletes the
checkpoints they name (when in the run's lineage), so a run holds at most ``keep_last +
2`` checkpoints.

The pointer is written twice: before the save, naming the new best as ``pending`` beside
the current one (prune, inside that save, keeps both), and once the save is published, as
the current one alone. A kill in between leaves both named: a resume adopts the pending
one when its checkpoint is complete, else keeps the current one. A resume restores the
best so far when its checkpoint is at or before the step resumed from (one after it
belongs to a branch the resume abandons: the best starts afresh).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import CheckpointError
from runtime.checkpoint import (
    BEST,
    SAVED_AT,
    TRAINER_STATE,
    load_trainer_state,
    read_best,
    record_best,
    tag_for,
)

log = logging.getLogger(__name__)


def _saved_since(step_dir: Path, begun: float | None) -> bool:
    """Whether the checkpoint ``step_dir`` is complete and, for a pending entry
    (``begun``: when its save began), was written by that save: its trainer state's
    ``saved_at`` is no earlier (both by rank 0's clock, which writes both files)."""
    if not (step_dir / TRAINER_STATE).is_file():
        return False
    if begun is None:
        return True
    try:
        saved_at = load_trainer_state(step_dir).get(SAVED_AT)
    except (CheckpointError, AttributeError):
        return False
    return isinstance(saved_at, (int, float)) and saved_at >= begun


@dataclass
class BestCheckpoint:
    """The best value of ``metric`` so far (None: none yet) and its step; ``root``: the
    run's ``checkpoints/``, where rank 0 (``is_main``) writes the ``pointer`` file
    (``best.json``; ``best_ema.json`` for a classification run's EMA, ``top1_ema``)."""

    root: Path
    metric: str
    is_main: bool
    value: float | None = None
    step: int | None = None
    pointer: str = BEST
    # the pointer as a resume read it when it names a checkpoint beyond the resume step (a
    # rewind's abandoned branch): kept on disk until this run's first save is published
    # (settle), since until then ``latest`` still names that branch, whose resume needs it
    abandoned: dict[str, Any] | None = None

    @classmethod
    def resume(cls, root: Path, metric: str, start_step: int, is_main: bool,
               pointer: str = BEST) -> BestCheckpoint:
        """The best so far of a run resumed at ``start_step`` (0: a fresh start), read
        from ``root``'s ``pointer`` (rank 0's reading is the one to use on every rank:
        ``finetune.engine.FinetuneRun.bests`` broadcasts it)."""
        best = cls(root, metric, is_main, pointer=pointer)
        saved = read_best(root, pointer) if start_step > 0 else None
        if saved is None or saved.get("metric") != metric:
            return best
        for entry in (saved.get("pending"), saved):  # a pending one saved whole wins
            if (isinstance(entry, dict) and isinstance(entry.get("step"), int)
                    and entry["step"] <= start_step
                    and isinstance(entry.get("value"), (int, float))
                    and _saved_since(root / tag_for(entry["step"]), entry.get("begun"))):
                best.value, best.step = float(entry["value"]), entry["step"]
                break
        # The pointer as this resume reads it: a pending one adopted (the kill came
        # before its own write) is written now; an entry beyond the resume step (a
        # rewind's abandoned branch, or a save that never completed) is dropped once this
        # run's first save is published (settle). Left as it was, a later save of the new
        # branch at that step number would be taken for that best, with a score it never
        # had; dropped at once, a rewound start ended before its first save would leave
        # the branch ``latest`` still names without its best.
        expected = best._entry(best.step, best.value)
        if any(isinstance(e, dict) and isinstance(e.get("step"), int)
               and e["step"] > start_step for e in (saved.get("pending"), saved)):
            best.abandoned = saved
        elif is_main and saved != expected:
            record_best(root, expected, pointer)
        return best

    def improves(self, result: dict[str, Any]) -> bool:
        """Whether an evaluation's ``result`` beats the best so far (a result without the
        metric, or a non-finite one, never does). The same on every rank: evaluations
        return the same metrics on every rank."""
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return self.value is None or value > self.value

    def _entry(self, step: int | None, value: float | None) -> dict[str, Any]:
        return {"tag": tag_for(step) if step is not None else None, "step": step,
                "metric": self.metric, "value": value}

    def begin(self, step: int, result: dict[str, Any]) -> None:
        """Before the save of ``step``, whose evaluation ``result`` improves: name it
        pending beside the current best (both kept by that save's prune)."""
        if self.is_main:
            # ``begun``: a checkpoint at that step saved before (a rewind's abandoned
            # branch) is not this save's
            pending = self._entry(step, float(result[self.metric])) | {"begun": time.time()}
            # an abandoned branch's entry stays current until this save is published
            current = ({k: v for k, v in self.abandoned.items() if k != "pending"}
                       if self.abandoned is not None else self._entry(self.step, self.value))
            record_best(self.root, current | {"pending": pending}, self.pointer)

    def record(self, step: int, result: dict[str, Any]) -> None:
        """The checkpoint of ``step`` (saved, published) is the best now."""
        self.value, self.step, self.abandoned = float(result[self.metric]), step, None
        if self.is_main:
            record_best(self.root, self._entry(step, self.value), self.pointer)
            log.info("best %s so far: %.6g at step %d (%s)", self.metric, self.value, step,
                     self.root / tag_for(step))

    def settle(self) -> None:
        """After each published save: a pointer kept as a resume read it (naming a
        checkpoint of the branch that save leaves behind) names this run's best alone."""
        if self.abandoned is not None:
            self.abandoned = None
            if self.is_main:
                record_best(self.root, self._entry(self.step, self.value), self.pointer)
