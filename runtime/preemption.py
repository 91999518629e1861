"""The one stop flag of a training process, and how every training loop honours it.

A launcher (launch/slurm/job.py, on SLURM's time-limit or preemption signal) calls
:func:`request_stop`, and a plain start (`internimage pretrain|finetune`, alone, under
torchrun or srun) has SIGTERM request it (:func:`stop_on_signals`); every training loop
(pre-training and each fine-tuning task) asks :func:`stop_agreed` at each step boundary.
The flag may be set on one rank only (submitit handles the signal on global rank 0), so
the answer is agreed over all ranks: every rank leaves at the same step, writes its part
of the checkpoint, and returns.

:func:`kill_point` is fault injection for tests: ``INTERNIMAGE_KILL_AFTER_STEP=k`` makes
the process SIGKILL itself at the end of step ``k`` (after that step's metrics and any
checkpoint), the way a node failure or ``kill -9`` ends a job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from runtime.dist import max_over_ranks

log = logging.getLogger(__name__)

# Set (by a launcher's signal handler on preemption) to make every rank save a checkpoint
# at the next step boundary and return.
STOP_REQUESTED = threading.Event()
KILL_AFTER_STEP_ENV = "INTERNIMAGE_KILL_AFTER_STEP"
# The signals :func:`stop_on_signals`' handler noted, in order. A list appended to, not the
# Event: a handler runs between two bytecodes of the main thread, and Event.set takes a lock
# that thread may hold (a second signal landing inside the first one's set()).
SIGNALLED: list[int] = []
# The signals this process's stop_on_signals turned into a save, while it runs: a forked
# data-loader worker inherits the value (loader_worker_init).
_SAVING_ON: tuple[int, ...] = ()
# The stop signal the ranks agreed on at a step boundary (stop_agreed; 0: none): every rank
# of a run stopped by a signal exits as signalled, also those it did not reach (another
# node's, whose torchrun would otherwise report the run as finished).
_AGREED: list[int] = [0]


def request_stop() -> None:
    """Ask the running training loop to save at its next step boundary and return."""
    STOP_REQUESTED.set()


def stop_agreed(device: torch.device) -> bool:
    """Whether a stop was requested (or a stop signal noted) on any rank (call at every
    step boundary, on every rank: collective). A signal noted on any rank is agreed on
    too (:func:`stop_signal`)."""
    # one all-reduce (max) of 2 x a rank's signal number (0: none) + 1 for a request: a
    # request alone is 1, and signal 1 (SIGHUP) is not taken for one
    own = (2 * SIGNALLED[0] if SIGNALLED else 0) + int(STOP_REQUESTED.is_set())
    agreed = max_over_ranks(own, device)
    if agreed >= 2:
        _AGREED[0] = agreed // 2
    return agreed > 0


def stop_signal() -> signal.Signals | None:
    """The stop signal of this run: the one the ranks agreed on at a step boundary, else
    the first :func:`stop_on_signals` noted in this process; None: none."""
    if _AGREED[0]:
        return signal.Signals(_AGREED[0])
    return signal.Signals(SIGNALLED[0]) if SIGNALLED else None


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """While the block runs, ``signals`` (SIGTERM) ask the training loop to save at its
    next step boundary and return, instead of ending the process at once.

    SIGTERM is what ends a plain start early: torchrun forwards it to its ranks' process
    groups (then SIGKILLs after 30 s), Kubernetes sends it before its grace period's
    SIGKILL, ``scancel`` and a SLURM time limit before KillWait's. Ended at once, the run
    lost every step since its last periodic checkpoint (hours at H scale).

    The handler takes no lock, logs nothing and waits on nothing (it may run while the
    main thread holds any lock); a repeat is only noted. Data-loader workers (every
    DataLoader's ``worker_init_fn`` is :func:`loader_worker_init`) ignore the signal while
    their rank saves: torchrun's killpg and scancel reach them too, and one ending would
    end its rank with "DataLoader worker is killed by signal" before the step boundary
    (their rank ends them when it returns; one whose rank is gone exits by torch's
    watchdog, within 5 s). Other forked children ignore it too. Outside the main
    thread nothing is installed: a SLURM job's training thread (launch/slurm/job.py), whose
    signals submitit and that job handle. What this does not cover: a rank blocked in a
    collective on a dead peer stays blocked until the collective timeout or the SIGKILL
    that follows (torchrun restarting after a failed rank waits those 30 s)."""
    SIGNALLED.clear()  # a run before this one in the same process (tests) left its own
    _AGREED[0] = 0
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    def on_signal(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:
            SIGNALLED.append(signum)

    global _SAVING_ON
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    _SAVING_ON = tuple(signals)
    try:
        yield
    finally:
        _SAVING_ON = ()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore(signum: int, frame: object) -> None:
    """A Python handler doing nothing: unlike SIG_IGN it is not inherited through exec,
    so a worker's ``pipe:`` subprocess (curl, aws s3 cp) still ends on a SIGTERM."""


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: in a worker forked by a rank inside
    :func:`stop_on_signals`, its stop signals are ignored. torch's worker handler (set just
    before this runs) ends the worker on a SIGTERM from anyone but its rank, and the rank's
    SIGCHLD handler then raises at once: the save at the step boundary never came. (A
    SIGTERM from the rank itself, torch's last resort for a worker that did not exit when
    told, is ignored too; torch's watchdog ends that worker once its rank has exited.)"""
    for sig in _SAVING_ON:
        signal.signal(sig, _ignore)


def kill_point(step: int) -> None:
    """SIGKILL this process when ``INTERNIMAGE_KILL_AFTER_STEP`` names ``step`` (tests)."""
    target = os.environ.get(KILL_AFTER_STEP_ENV)
    if target and int(target) == step:
        log.warning("%s=%s: killing this process (SIGKILL)", KILL_AFTER_STEP_ENV, target)
        os.kill(os.getpid(), signal.SIGKILL)
