"""The one stop flag of a training process, and how every training loop honours it.

A launcher (launch/slurm/job.py, on SLURM's time-limit or preemption signal) calls
:func:`request_stop`; every training loop (pre-training and each fine-tuning task) asks
:func:`stop_agreed` at each step boundary. The flag may be set on one rank only (submitit
handles the signal on global rank 0), so the answer is agreed over all ranks: every rank
leaves at the same step, writes its part of the checkpoint, and returns.

:func:`kill_point` is fault injection for tests: ``INTERNIMAGE_KILL_AFTER_STEP=k`` makes
the process SIGKILL itself at the end of step ``k`` (after that step's metrics and any
checkpoint), the way a node failure or ``kill -9`` ends a job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from runtime.dist import any_rank

log = logging.getLogger(__name__)

# Set (by a launcher's signal handler on preemption) to make every rank save a checkpoint
# at the next step boundary and return.
STOP_REQUESTED = threading.Event()
KILL_AFTER_STEP_ENV = "INTERNIMAGE_KILL_AFTER_STEP"


def request_stop() -> None:
    """Ask the running training loop to save at its next step boundary and return."""
    STOP_REQUESTED.set()


def stop_agreed(device: torch.device) -> bool:
    """Whether a stop was requested on any rank (call at every step boundary, on every
    rank: collective)."""
    return any_rank(STOP_REQUESTED.is_set(), device)


def kill_point(step: int) -> None:
    """SIGKILL this process when ``INTERNIMAGE_KILL_AFTER_STEP`` names ``step`` (tests)."""
    target = os.environ.get(KILL_AFTER_STEP_ENV)
    if target and int(target) == step:
        log.warning("%s=%s: killing this process (SIGKILL)", KILL_AFTER_STEP_ENV, target)
        os.kill(os.getpid(), signal.SIGKILL)
