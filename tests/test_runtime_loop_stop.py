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
    ``during`` (train, evaluate, save) step ``stop_in_step`` (an owed evaluation's is its
    checkpoint's step; ``start``: before the loop); from ``start`` (a resume)
    or step 0. A save whose position owes an evaluation reads ``save N owing``."""
    STOP_REQUESTED.clear()  # a process's one flag: each run here starts without a stop
    if during == "start":  # the signal came while the run was being set up
        request_stop()
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


def test_a_stop_before_or_during_the_owed_evaluation_returns_at_the_checkpoints_step(
        tmp_path):
    """The reviewer's case: a stop that came during the owed evaluation (minutes at
    scale) trained step 4 and saved it, spending the grace period (SLURM's SIGKILL follows
    its warning by a fixed lead). The run returns at once: the checkpoint it resumed from
    is step 3's, owing still (a made evaluation's record is taken by the next resume);
    one that came before the evaluation skips it as well."""
    owing = LoopPosition(3, 0, 3, True)
    events, result = _run(tmp_path / "during", stop_in_step=3, during="evaluate", start=owing)
    assert events == ["evaluate"]  # no step 4, no save
    assert result == {"top1": 0.5, "step": 3, "stopped_early": True}
    events, result = _run(tmp_path / "before", stop_in_step=0, during="start", start=owing)
    assert events == []
    assert result == {"step": 3, "stopped_early": True}
    # the next resume takes the made evaluation's record and goes on
    events, result = _run(tmp_path / "during", stop_in_step=0, start=owing)
    assert events == ["evaluate", "save 6"]  # step 6's only
    records = [json.loads(line) for line in
               (tmp_path / "during" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "top1" in r] == [3, 6]


def _epoch_records(run_dir, start: LoopPosition) -> list[dict]:
    """The evaluation records of a run of two 3-step epochs evaluating every 3 steps."""
    hooks = TaskHooks(batches=lambda epoch, skip: range(3 - skip),
                      train_step=lambda batch: {"loss": torch.tensor(1.0)},
                      evaluate=lambda: {"top1": 0.5},
                      save=lambda pos: None)
    spec = LoopSpec(name="t", total_steps=6, eval_every=3, checkpoint_every=3, log_every=1)
    metrics = MetricsLogger(run_dir, True, 6, start.step, tensorboard=False, progress=False)
    run_loop(spec, hooks, start, metrics=metrics, d=DistInfo())
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "top1" in line]


def test_an_owed_evaluation_at_an_epochs_end_is_logged_with_that_epoch(tmp_path):
    """Step 3 ends epoch 0: the uninterrupted run logs its evaluation with epoch 0. A
    resume owing it logged epoch 1 when its position stood at the next epoch's start
    (classification derives (epoch, batch) from the step: 3 // 3 = epoch 1, batch 0);
    the dense tasks' saved position (epoch 0, batch 3) was right already."""
    want = [(r["step"], r["epoch"]) for r in _epoch_records(tmp_path / "plain", LoopPosition())]
    assert want == [(3, 0), (6, 1)]
    for name, position in (("step-derived", LoopPosition(3, 1, 0, True)),
                           ("saved", LoopPosition(3, 0, 3, True))):
        got = _epoch_records(tmp_path / name, position)
        assert [(r["step"], r["epoch"]) for r in got] == want, name


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
