"""What `TrainingJob` does on SLURM's signal: which requeues `--max-requeues` limits, and
the signal after the run ended or with a save that failed.

Each test plays rank 0 of a SLURM job in this process (its environment emulated), with a
stand-in for submitit's part: a USR2 handler that calls ``job.checkpoint()`` and keeps its
answer (submitit would requeue the job on a DelayedSubmission, end it on None). The
training is an ``entry`` function that sends itself USR2 mid-run, as SLURM would, and
returns once asked to stop (where the real loop saves). A requeued job is the next
segment: a new ``TrainingJob`` on the same run directory with SLURM_RESTART_COUNT one
higher, as after ``scontrol requeue``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit
from submitit.core.job_environment import SignalHandler

from launch.slurm.job import TrainingJob
from runtime import preemption

JOB_ID = "77"
USR2 = signal.SIGUSR2


@pytest.fixture
def task(tmp_path, monkeypatch):
    """This process as task 0 of 1 of SLURM job 77, submitit folder under ``tmp_path``."""
    # the job exports these; setting them here first makes monkeypatch restore them after
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, "0")
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path),
                       "SLURM_JOB_ID": JOB_ID, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                       "SLURM_JOB_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    before = signal.getsignal(USR2)
    preemption.STOP_REQUESTED.clear()
    yield Segments(tmp_path, monkeypatch)
    signal.signal(USR2, before)
    preemption.STOP_REQUESTED.clear()


class Segments:
    """Runs the job's successive segments (one per start) on one run directory."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.monkeypatch = monkeypatch

    def run(self, restarts: int, entry: Callable[[TrainingJob], Callable[[list[str]], int]],
            *, max_requeues: int, time_limit_min: float = 60, save_timeout_s: float = 5,
            ) -> tuple[TrainingJob, list]:
        """One segment: restart number ``restarts`` under a ``time_limit_min`` limit. Returns
        the job and what each checkpoint() call answered (submitit's USR2 handler)."""
        self.monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
        # what submitit's executor writes at submission (and rewrites on each requeue):
        # the job and its time limit, which time-outs are judged against
        delayed = submitit.helpers.DelayedSubmission(print)
        delayed.set_timeout(time_limit_min, max_requeues)
        delayed.dump(submitit.JobEnvironment().paths.submitted_pickle)
        preemption.STOP_REQUESTED.clear()  # a fresh process in each segment
        job = TrainingJob(["pretrain"], self.run_dir, max_requeues=max_requeues,
                          save_timeout_s=save_timeout_s, entry=print)
        job.entry = entry(job)
        answers: list = []
        signal.signal(USR2, lambda signum, frame: answers.append(job.checkpoint()))
        return job, answers

    def records(self) -> list[dict]:
        path = self.run_dir / "slurm_jobs.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def signalled_after(minutes: float, then: Callable[[], int] | None = None):
    """An entry that has run ``minutes`` of its job when SLURM's USR2 comes, then returns
    once asked to stop (the loop's save), or does ``then`` instead of returning 0."""
    def make(job: TrainingJob) -> Callable[[list[str]], int]:
        def entry(argv: list[str]) -> int:
            assert job._rt is not None
            job._rt.started -= 60 * minutes  # as if the job had been running that long
            os.kill(os.getpid(), USR2)  # handled in the main thread, which waits on this one
            assert preemption.STOP_REQUESTED.wait(10), "no stop request after the signal"
            return then() if then is not None else 0
        return entry
    return make


def completes(job: TrainingJob) -> Callable[[list[str]], int]:
    return lambda argv: 0


PREEMPTED = signalled_after(5)     # 5 of 60 minutes: far from the limit
TIMED_OUT = signalled_after(58)    # 58 of 60 minutes: SLURM's warning before the limit


def requeued(answers: list) -> bool:
    [answer] = answers
    return isinstance(answer, submitit.helpers.DelayedSubmission)


# ------------------------------------------------------------ what --max-requeues limits
def test_preemptions_beyond_max_requeues_keep_requeueing(task):
    """Six preempted segments with --max-requeues 1, then one that completes: every
    preemption is requeued and every restart starts (SLURM_RESTART_COUNT up to 6)."""
    for restart in range(6):
        job, answers = task.run(restart, PREEMPTED, max_requeues=1)
        job()
        assert requeued(answers), f"restart {restart}: not requeued"
    job, answers = task.run(6, completes, max_requeues=1)
    assert job()["requeues"] == 6 and answers == []
    rows = [(r["event"], r["requeue"], r.get("timed_out"), r.get("timeouts"))
            for r in task.records()]
    # each segment's command returned 0 after its save ("ended": for the exit trap)
    assert rows == [row for k in range(6) for row in (("start", k, None, 0),
                                                      ("requeue_requested", k + 1, False, 0),
                                                      ("ended", k, None, None))
                    ] + [("start", 6, None, 0), ("ended", 6, None, None)]


def test_time_outs_beyond_max_requeues_stop_with_a_clear_error(task, capsys):
    """--max-requeues 1 with preemptions in between: the first time-out is requeued, the
    second saves and gives up, naming the count, the limit and how to resume."""
    answers_of = []
    for restart, entry in enumerate((PREEMPTED, TIMED_OUT, PREEMPTED, TIMED_OUT)):
        job, answers = task.run(restart, entry, max_requeues=1)
        job()
        answers_of.append(answers)
    assert [requeued(a) for a in answers_of] == [True, True, True, False]
    err = capsys.readouterr().err
    assert (f"not requeueing job {JOB_ID}: it reached its time limit 2 times, more than "
            "--max-requeues 1 allows (preemptions do not count)") in err
    assert f"`--resume auto` on {task.run_dir}" in err
    rows = [(r["event"], r.get("timed_out"), r["timeouts"], r.get("saved"))
            for r in task.records() if r["event"] not in ("start", "ended")]
    assert rows == [("requeue_requested", False, 0, True), ("requeue_requested", True, 1, True),
                    ("requeue_requested", False, 1, True), ("gave_up", True, 2, True)]


def test_max_requeues_zero_requeues_preemptions_but_no_time_out(task):
    job, answers = task.run(0, PREEMPTED, max_requeues=0)
    job()
    assert requeued(answers)
    job, answers = task.run(1, TIMED_OUT, max_requeues=0)
    job()
    assert answers == [None]
    assert [r["event"] for r in task.records()] == ["start", "requeue_requested", "ended",
                                                    "start", "gave_up", "ended"]


@pytest.mark.parametrize("limit_min", [5, 12, 30, 60, 600, 4320])
def test_time_out_or_preemption_is_judged_as_submitit_judges_it(tmp_path, limit_min):
    """The same answer as submitit's own judgement before its requeue countdown (its
    SignalHandler.has_timed_out, from its start and the submitted time limit), so the
    two never disagree on what counts; a guard for submitit upgrades."""
    from launch.slurm.environment import is_timeout

    delayed = submitit.helpers.DelayedSubmission(print)
    delayed.set_timeout(limit_min, 3)
    handler = SignalHandler(None, None, delayed)  # has_timed_out reads neither
    limit_s = 60 * limit_min
    # away from the boundary by seconds: the clock moves between the two calls
    for elapsed in sorted({5.0, 0.5 * limit_s, 0.79 * limit_s, 0.81 * limit_s,
                           limit_s - 601, limit_s - 599, limit_s - 60}):
        if elapsed < 0:
            continue
        handler._start_time = time.time() - elapsed
        assert is_timeout(elapsed, limit_min) == handler.has_timed_out(), (limit_min, elapsed)


# -------------------------------------------------------- the signal after the run ended
def test_signal_after_the_run_completed_does_not_requeue_it(task):
    """The last step fell within signal_delay_s of the limit: the run has completed when
    USR2 comes. It is not handed to submitit (which would requeue the run, or make a
    refused requeue an error of the job), and checkpoint() refuses a requeue too."""
    job, answers = task.run(0, completes, max_requeues=3)
    assert job()["requeues"] == 0
    os.kill(os.getpid(), USR2)
    time.sleep(0.1)  # the handler runs in this (main) thread at the next bytecode
    assert answers == []  # submitit's handler never ran
    assert job.checkpoint() is None
    assert [(r["event"], r.get("status")) for r in task.records()] == [("start", None),
                                                                       ("ended", 0)]


def test_signal_after_the_run_failed_does_not_requeue_it(task):
    def make(job):
        def entry(argv):
            raise ValueError("bad config")
        return entry
    job, answers = task.run(0, make, max_requeues=3)
    with pytest.raises(ValueError, match="bad config"):
        job()
    assert job.checkpoint() is None
    start, ended = task.records()
    assert start["event"] == "start" and ended["event"] == "ended"
    # a failure the exit trap may requeue: not a refusal (exit status 2)
    assert ended["status"] is None and ended["refused"] is False
    assert "bad config" in ended["error"]


# ------------------------------------------------------------- a save that did not happen
def test_a_save_that_raises_is_recorded_as_failed_and_still_requeued(task, caplog):
    """Disk full during the save on the signal: recorded saved=false with the error and
    logged as an error; the job is requeued (it resumes from the last complete
    checkpoint; see TrainingJob.checkpoint for why)."""
    def disk_full() -> int:
        raise OSError(28, "No space left on device")

    job, answers = task.run(0, signalled_after(5, then=disk_full), max_requeues=3)
    # submitit would have exited after the requeue; here the error comes back
    with (caplog.at_level(logging.INFO, logger="launch.slurm.job"),
          pytest.raises(OSError, match="No space left")):
        job()
    assert requeued(answers)
    [req] = [r for r in task.records() if r["event"] == "requeue_requested"]
    assert req["saved"] is False and "No space left on device" in req["save_error"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("save on the signal failed" in m and "OSError" in m for m in errors), errors
    assert not any("stopped cleanly at a checkpoint" in r.getMessage()
               for r in caplog.records)


def test_a_save_that_overruns_its_bound_is_recorded_as_not_saved(task):
    def slow_save() -> int:
        time.sleep(1.0)
        return 0

    job, answers = task.run(0, signalled_after(5, then=slow_save), max_requeues=3,
                            save_timeout_s=0.2)
    job()
    assert requeued(answers)
    [req] = [r for r in task.records() if r["event"] == "requeue_requested"]
    assert req["saved"] is False and "save_timeout_s=0.2" in req["save_error"]


def test_a_record_cut_short_by_a_crash_is_skipped_and_the_next_one_kept(tmp_path, caplog):
    """A node crash during an append left half a line in slurm_jobs.jsonl: every later
    start of the job failed (JSONDecodeError in timeout_count), requeues included, and the
    next append would have been glued to the half line."""
    from launch.slurm.environment import JOBS_FILE, TaskInfo, read_records, record, timeout_count

    info = TaskInfo(job_id="77", rank=0, local_rank=0, world_size=8, master="n1:29500",
                    cluster="slurm")
    record(tmp_path, "requeue_requested", info, timed_out=True)
    with (tmp_path / JOBS_FILE).open("a") as f:
        f.write('{"event": "requeue_requested", "job_id": "77", "timed_')  # the crash
    with caplog.at_level(logging.WARNING):
        assert timeout_count(tmp_path, "77") == 1
    assert "skipped 1 line(s)" in caplog.text
    record(tmp_path, "requeue_requested", info, timed_out=True)
    assert [r["event"] for r in read_records(tmp_path)] == ["requeue_requested"] * 2
    assert timeout_count(tmp_path, "77") == 2


@pytest.mark.parametrize("refusal", ["status", "argparse"])
def test_a_refused_start_is_recorded_as_one(task, refusal):
    """`internimage` refuses a bad config or checkpoint with exit status 2, and argparse a
    bad flag with SystemExit(2): rank 0's ``ended`` record says ``refused`` (for whoever
    reads why the job failed; the exit trap bounds it as any failure, since a resume
    refused on a bad node may work on another: launch/slurm/after_exit.py)."""
    def make(job):
        def entry(argv):
            if refusal == "argparse":
                raise SystemExit(2)
            return 2
        return entry
    job, _ = task.run(0, make, max_requeues=3)
    with pytest.raises((RuntimeError, SystemExit)):
        job()
    ended = task.records()[-1]
    assert ended["event"] == "ended" and ended["refused"] is True


def test_a_start_refused_by_the_run_lock_is_requeued_a_bounded_number_of_times(task):
    """A second submission of a running job's command is refused by the run lock
    (runtime/run_lock.py) through the command's real refusal path. The exit trap bounds
    failures without progress: the bound counted only failures at the same checkpoint,
    and the first job saved new ones, so the second was requeued for as long as the first
    ran, each attempt holding its allocation. A refused attempt is now no progress,
    whatever the checkpoint does; a retry is still allowed (a job submitted right after
    scancel takes over once the cancelled one has gone)."""
    from launch.commands.refusals import end_failed_start
    from launch.slurm.after_exit import decide
    from runtime.run_lock import RunLockError

    error = RunLockError(f"run directory {task.run_dir} is in use by process 4242 on "
                         "node-elsewhere-17 (job 76)")
    records = []
    for attempt in range(3):
        job, _ = task.run(attempt, lambda job: lambda argv: end_failed_start(
            error, "pretrain", task.run_dir, None, True), max_requeues=3)
        with pytest.raises(RuntimeError, match="exited with status 2"):
            job()
        ended = task.records()[-1]
        assert ended["event"] == "ended" and ended["refused"] is True
        assert "node-elsewhere-17" in ended["error"]  # why, for whoever reads the records
        # the first job saved meanwhile: the run's checkpoint differs at every failure
        checkpoint = [f"step_{1000 * (attempt + 1):07d}", 1764800000.0 + attempt, attempt]
        requeue, why = decide(2, "RUNNING", attempt, attempt, task.records(), checkpoint, 2)
        if attempt < 2:
            assert requeue, why
            records.append({"event": "failure_requeue", "checkpoint": checkpoint,
                            "job_id": "77"})
            with (task.run_dir / "slurm_jobs.jsonl").open("a") as f:
                f.write(json.dumps(records[-1]) + "\n")
        else:  # said as it is: refused at its start, not 'without a new checkpoint'
            assert not requeue and "refused at their start" in why, why
            assert "node-elsewhere-17" in why and "without a new checkpoint" not in why


def test_a_refusal_after_the_start_checks_is_bounded_by_the_checkpoint(task):
    """Exit 2 also ends a run that trained: a save that hit a full disk
    (CheckpointSaveError) or a store refusing reads, through the same refusal path. Its
    ``ended`` record says ``started``, and the exit trap bounds it by the checkpoint: a
    run saving between such failures is requeued each time (counted as refused starts,
    its third ended it 'without a new checkpoint'); one that does not save is bounded."""
    from launch.commands.refusals import end_failed_start
    from launch.slurm.after_exit import decide
    from runtime.checkpoint import CheckpointSaveError, publish_config

    def trained_then_refused(job):
        def entry(argv):
            publish_config(task.run_dir)  # the start checks passed
            return end_failed_start(CheckpointSaveError("no space left on device"),
                                    "pretrain", task.run_dir, None, True)
        return entry

    def attempt_ends(attempt: int, checkpoint: list) -> tuple[bool, str]:
        job, _ = task.run(attempt, trained_then_refused, max_requeues=3)
        with pytest.raises(RuntimeError, match="exited with status 2"):
            job()
        ended = task.records()[-1]
        assert (ended["refused"], ended["started"]) == (True, True)
        requeue, why = decide(2, "RUNNING", attempt, attempt, task.records(), checkpoint, 2)
        with (task.run_dir / "slurm_jobs.jsonl").open("a") as f:
            f.write(json.dumps({"event": "failure_requeue", "checkpoint": checkpoint,
                                "job_id": "77"}) + "\n")
        return requeue, why

    for attempt in range(4):  # a new checkpoint before each failure
        checkpoint = [f"step_{1000 * (attempt + 1):07d}", 1764800000.0 + attempt, attempt]
        requeue, why = attempt_ends(attempt, checkpoint)
        assert requeue, (attempt, why)
    for attempt in range(4, 6):  # then none: bounded as any failure without progress
        requeue, why = attempt_ends(attempt, checkpoint)  # (3, 4 and 5 at step_0004000)
        assert requeue == (attempt < 5), (attempt, why)
    assert "failed 3 times without a new checkpoint" in why
