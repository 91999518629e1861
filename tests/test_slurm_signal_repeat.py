"""Several stop signals at once (SLURM's --signal and a manual `scancel --signal=USR2`, a
preemption and an impatient user): `TrainingJob` saves and requeues once, and a signal that
lands while the main thread holds the logging lock does not deadlock the save.

As in tests/test_slurm_requeue.py (whose fixture and segments these use), this process plays
rank 0 of a SLURM job, with a stand-in for submitit's USR2 handler that calls
``job.checkpoint()``. The signals go to the main thread itself (``signal.pthread_kill``):
sent to the process, another thread may take one, and a main thread blocked in a wait
would run the Python handler only when that wait ends.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import pytest

from launch.slurm.job import TrainingJob
from runtime import preemption
from tests import test_slurm_requeue

USR2 = signal.SIGUSR2
task = test_slurm_requeue.task  # the fixture: this process as task 0 of SLURM job 77
requeued = test_slurm_requeue.requeued
JOB_LOG = "launch.slurm.job"


def to_main_thread() -> None:
    """Send USR2 to the main thread (its Python handler runs there, at once)."""
    signal.pthread_kill(threading.main_thread().ident, USR2)


def count_submitit_calls(job: TrainingJob, answers: list, calls: list[int]) -> None:
    """Replace the segment's stand-in for submitit's handler by one that also notes each
    call as it starts (the stand-in notes its answer only once checkpoint() returns)."""
    def handler(signum, frame):
        calls.append(signum)
        answers.append(job.checkpoint())

    signal.signal(USR2, handler)


def noted(job: TrainingJob, seen: int) -> None:
    """Wait until the main thread has run the handler for ``seen`` signals in all: each
    was noted by the job's handler (the first one also reached submitit's). The handler
    runs as soon as the main thread is scheduled; on a loaded machine (CI: 2 cores, tests
    in parallel) that took over a second, and a signal sent while the last one is still
    pending merges with it (standard signals do not queue): so wait as long as it takes."""
    deadline = time.monotonic() + 30
    while len(job._rt.signals) < seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(job._rt.signals) == seen, f"the handler ran for {len(job._rt.signals)} of {seen}"


def saves(task) -> list[tuple]:
    return [(r["event"], r.get("saved"), r.get("save_error")) for r in task.records()
            if r["event"] not in ("start", "ended")]


def test_signals_during_the_save_are_ignored_one_save_one_requeue(task, caplog):
    """Two more USR2 while the first one's save is waited for: submitit's handler runs
    once, the save is recorded once as made, one requeue, and the repeats are logged once.

    Before, each repeat ran submitit's handler again, nested in the first one's wait:
    requeue requests for one stop, one per signal."""
    calls: list[int] = []

    def make(job: TrainingJob) -> Callable[[list[str]], int]:
        def entry(argv: list[str]) -> int:
            to_main_thread()
            assert preemption.STOP_REQUESTED.wait(10), "no stop request after the signal"
            # the first signal's save is being waited for: two more come, one at a time
            # (two pending at once would be one)
            for seen in (2, 3):
                to_main_thread()
                noted(job, seen)
            return 0  # where the loop saves, then returns
        return entry

    job, answers = task.run(0, make, max_requeues=3)
    count_submitit_calls(job, answers, calls)
    with caplog.at_level(logging.WARNING, logger=JOB_LOG):
        job()
    assert calls == [USR2]
    assert requeued(answers)
    assert saves(task) == [("requeue_requested", True, None)]
    repeats = [r.getMessage() for r in caplog.records if "further" in r.getMessage()]
    assert repeats == ["ignored 2 further SIGUSR2 signal(s): only the first is acted on "
                       "(one save, one requeue at most)"]


class SignalWhileLogging(logging.Handler):
    """A log handler that sends the main thread a second USR2 while that thread is inside
    ``emit`` for the first signal, so holding this handler's lock: as a repeat that lands
    in a logging call of the main thread. ``signal.pthread_kill`` runs the Python handler
    before it returns, still under the lock."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sent = False
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if (not self.sent and threading.current_thread() is threading.main_thread()
                and "got SIGUSR2" in record.getMessage()):
            self.sent = True
            to_main_thread()


@pytest.fixture
def signal_while_logging():
    logger = logging.getLogger(JOB_LOG)
    handler, level = SignalWhileLogging(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_signal_inside_a_logging_call_does_not_deadlock_the_save(task, signal_while_logging):
    """QA's stall: a repeat USR2 interrupts the main thread inside a logging call, holding
    the handler's lock; the training thread logs through the same handler on its way to
    the save. The save is made and recorded as made, well within save_timeout_s.

    Before, the nested handler waited for the training thread there, which waited for
    that lock: stuck for all of save_timeout_s, recorded ``saved: false``."""
    def make(job: TrainingJob) -> Callable[[list[str]], int]:
        def entry(argv: list[str]) -> int:
            to_main_thread()
            assert preemption.STOP_REQUESTED.wait(10), "no stop request after the signal"
            logging.getLogger(JOB_LOG).info("training thread: saving at the step boundary")
            return 0
        return entry

    # a stuck save waits all of save_timeout_s and is recorded as not made (saved:
    # false): the record, not a wall-clock bound (20.5 s once on a loaded machine with
    # the save made), tells the two apart
    job, answers = task.run(0, make, max_requeues=3, save_timeout_s=40)
    job()
    assert signal_while_logging.sent, "the second signal was not sent"
    assert saves(task) == [("requeue_requested", True, None)], "stuck on the logging lock?"
    assert requeued(answers)
    assert "training thread: saving at the step boundary" in signal_while_logging.messages


def test_a_signal_while_the_job_sets_up_is_acted_on_outside_the_handler(task, monkeypatch):
    """USR2 while the task is still setting up (reading its restart count, before the
    training thread exists): noted, then acted on by the main thread as any other: the
    requeue is requested and recorded in slurm_jobs.jsonl, saying no save was possible.

    Before, the noting handler was installed only after the set-up: submitit's handler ran
    nested in whatever the main thread was doing (logging, file I/O), with the job not yet
    started, and its requeue went unrecorded."""
    import launch.slurm.job as job_module

    counted = job_module.restart_count

    def restart_count_signalled(*args, **kwargs):
        to_main_thread()  # the handler runs before this returns
        return counted(*args, **kwargs)

    monkeypatch.setattr(job_module, "restart_count", restart_count_signalled)
    job, answers = task.run(0, lambda job: (lambda argv: 0), max_requeues=3)
    job()
    assert requeued(answers)
    assert saves(task) == [("requeue_requested", False, "training had not started")]


def test_repeats_after_the_run_ended_are_logged(task, caplog, monkeypatch):
    """Two USR2 as the run completes: the task ends as completed (no save, no requeue)
    and the ignored repeat is said once in the log, as during a save.

    Before, a repeat was logged only from within a save on the signal.

    The job's handler is called by the training thread itself, as the main thread's
    would be, and the main thread waits in one long slice: a real signal could be acted
    on between the two, or (landing as the main thread blocks) only when its wait ends."""
    import launch.slurm.job as job_module

    monkeypatch.setattr(job_module, "POLL_S", 120)  # join returns as the thread ends

    def make(job: TrainingJob) -> Callable[[list[str]], int]:
        def entry(argv: list[str]) -> int:
            on_signal = signal.getsignal(USR2)
            on_signal(USR2, None)
            on_signal(USR2, None)
            return 0  # completes before the main thread acts on the first signal
        return entry

    job, answers = task.run(0, make, max_requeues=3)
    with caplog.at_level(logging.WARNING, logger=JOB_LOG):
        job()
    assert answers == []  # submitit's handler never ran: the task ends as completed
    messages = [r.getMessage() for r in caplog.records]
    assert "task 0 got SIGUSR2; its run has completed: nothing to save, not requeueing" \
        in messages
    assert [m for m in messages if "further" in m] == [
        "ignored 1 further SIGUSR2 signal(s): only the first is acted on (one save, one "
        "requeue at most)"]
