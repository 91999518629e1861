"""A stop request (SLURM's warning signal before the time limit; runtime/preemption.py)
is answered by a checkpoint at the step it arrives in, before anything else that step
would do: an evaluation due there would spend the grace period first (SLURM's
``--signal`` gives a fixed lead, then SIGKILL), and the run would be requeued without a
checkpoint of the steps since the last one."""

from __future__ import annotations

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


def _run(tmp_path, stop_in_step: int, total: int = 6, during: str = "train"
         ) -> tuple[list[str], dict]:
    """Events of a run evaluating and saving every 3 steps whose stop request arrives
    ``during`` (train, evaluate, save) step ``stop_in_step``."""
    STOP_REQUESTED.clear()  # a process's one flag: each run here starts without a stop
    events: list[str] = []
    steps = iter(range(1, total + 1))
    current = [0]

    def train_step(batch):
        current[0] = next(steps)
        if (current[0], during) == (stop_in_step, "train"):
            request_stop()  # the signal arrives while this step trains
        return {"loss": torch.tensor(1.0)}

    def evaluate():
        events.append("evaluate")
        if (current[0], during) == (stop_in_step, "evaluate"):
            request_stop()
        return {"top1": 0.5}

    def save(pos):
        events.append(f"save {pos.step}")
        if (current[0], during) == (stop_in_step, "save"):
            request_stop()

    hooks = TaskHooks(batches=lambda epoch, skip: range(100), train_step=train_step,
                      evaluate=evaluate, save=save)
    spec = LoopSpec(name="t", total_steps=total, eval_every=3, checkpoint_every=3,
                    log_every=1)
    metrics = MetricsLogger(tmp_path, True, total, 0, tensorboard=False, progress=False)
    result = run_loop(spec, hooks, LoopPosition(), metrics=metrics, d=DistInfo())
    return events, result


def test_a_stop_at_an_evaluation_step_saves_without_evaluating_first(tmp_path):
    events, result = _run(tmp_path, stop_in_step=3)
    assert events == ["save 3"]
    assert result["stopped_early"] and result["step"] == 3


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
