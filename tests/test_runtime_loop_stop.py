"""A stop request (SLURM's warning signal before the time limit; runtime/preemption.py)
is answered by a checkpoint at the step it arrives in, before anything else that step
would do: an evaluation due there would spend the grace period first (SLURM's
``--signal`` gives a fixed lead, then SIGKILL), and the run would be requeued without a
checkpoint of the steps since the last one."""

from __future__ import annotations

import json

import pytest
import torch

from runtime.dist import DistInfo
from runtime.loop import LoopPosition, LoopSpec, TaskHooks, run_loop
from runtime.metrics import MetricsLogger
from runtime.preemption import STOP_REQUESTED, request_stop


@pytest.fixture(autouse=True)
def _clear_stop():
    STOP_REQUESTED.clear()
    yield
    STOP_REQUESTED.clear()


def _run(tmp_path, stop_in_step: int, total: int = 6, during: str = "train",
         start: LoopPosition | None = None) -> tuple[list[str], dict]:
    """Events of a run evaluating and saving every 3 steps whose stop request arrives
    ``during`` (train, evaluate, save) step ``stop_in_step``; from ``start`` (a resume)
    or step 0. A save whose position owes an evaluation reads ``save N owing``."""
    STOP_REQUESTED.clear()  # a process's one flag: each run here starts without a stop
    start = start or LoopPosition()
    events: list[str] = []
    steps = iter(range(start.step + 1, total + 1))
    current = [start.step]

    def train_step(batch):
        current[0] = next(steps)
        if (current[0], during) == (stop_in_step, "train"):
            request_stop()  # the signal arrives while this step trains
        if (current[0], during) == (stop_in_step, "kill"):
            raise KeyboardInterrupt  # the process ends here, saving nothing
        return {"loss": torch.tensor(1.0)}

    def evaluate():
        events.append("evaluate")
        if (current[0], during) == (stop_in_step, "evaluate"):
            request_stop()
        return {"top1": 0.5}

    def save(pos):
        events.append(f"save {pos.step}" + (" owing" if pos.eval_owed else ""))
        if (current[0], during) == (stop_in_step, "save"):
            request_stop()

    hooks = TaskHooks(batches=lambda epoch, skip: range(100), train_step=train_step,
                      evaluate=evaluate, save=save)
    spec = LoopSpec(name="t", total_steps=total, eval_every=3, checkpoint_every=3,
                    log_every=1)
    metrics = MetricsLogger(tmp_path, True, total, start.step, tensorboard=False,
                            progress=False)
    result = run_loop(spec, hooks, start, metrics=metrics, d=DistInfo())
    return events, result


def test_a_stop_at_an_evaluation_step_saves_without_evaluating_first(tmp_path):
    events, result = _run(tmp_path, stop_in_step=3)
    assert events == ["save 3 owing"]  # the checkpoint records the skipped evaluation
    assert result["stopped_early"] and result["step"] == 3


def test_the_evaluation_a_stop_skipped_runs_first_on_resuming(tmp_path):
    """The evaluation due at the stop step was skipped for good: the resumed run went on
    to step 4, and step 3's weights were never evaluated (nor could they become the best
    checkpoint). A resume from a checkpoint owing it evaluates before training, logs the
    result at that step, and saves owing nothing."""
    events, result = _run(tmp_path / "resumed", stop_in_step=0, start=LoopPosition(3, 0, 3, True))
    assert events == ["evaluate", "evaluate", "save 6"]
    records = [json.loads(line) for line in
               (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "top1" in r] == [3, 6]
    # a resume owing nothing starts training at once
    events, _ = _run(tmp_path / "plain", stop_in_step=0, start=LoopPosition(3, 0, 3))
    assert events == ["evaluate", "save 6"]


def test_a_resume_that_died_before_saving_leaves_its_owed_evaluation_logged_once(tmp_path):
    """Only a save clears the debt: a resume killed before its next checkpoint leaves the
    checkpoint owing, and the next resume would evaluate and log step 3 a second time.
    It finds the owed record (the cut back to step 3 keeps it) and takes its values."""
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed during step 5, before saving at 6
        _run(run_dir, stop_in_step=5, during="kill", start=LoopPosition(3, 0, 3, True))
    events, result = _run(run_dir, stop_in_step=0, start=LoopPosition(3, 0, 3, True))
    assert events == ["evaluate", "save 6"]  # step 6's evaluation only
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records if "top1" in r] == [3, 6]
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 6]


def test_a_stop_between_checkpoints_saves_at_that_step(tmp_path):
    events, result = _run(tmp_path, stop_in_step=4)
    assert events == ["evaluate", "save 3", "save 4"]
    assert result["step"] == 4


def test_a_stop_during_an_evaluation_or_a_save_is_answered_by_that_steps_save(tmp_path):
    """The reviewer's case: a signal landing in an evaluation (minutes at scale) or in a
    save trained one more step and saved again, where torchrun's SIGKILL comes 30 s after
    its SIGTERM. The step's own save answers it."""
    events, result = _run(tmp_path, stop_in_step=3, during="evaluate")
    assert events == ["evaluate", "save 3"]
    assert result["stopped_early"] and result["step"] == 3
    events, result = _run(tmp_path / "b", stop_in_step=3, during="save")
    assert events == ["evaluate", "save 3"]
    assert result["stopped_early"] and result["step"] == 3


def test_a_stop_at_the_last_step_still_evaluates_the_finished_run(tmp_path):
    # no resumed run comes back to the last step: its evaluation is the run's result, and
    # the run is finished (exit 0), not stopped (a SIGTERM start exited 143 and said to
    # resume a run that was complete)
    for during in ("train", "evaluate", "save"):
        events, result = _run(tmp_path / during, stop_in_step=6, during=during)
        assert events == ["evaluate", "save 3", "evaluate", "save 6"]
        assert result["top1"] == 0.5 and "stopped_early" not in result, during
