"""Waiting for a submitted job (`submit --wait`) and telling the user how it ended.

submitit knows a job is over when every task has written its result file, or when
`sacct` says so. Clusters without SLURM accounting have no working `sacct`, and a task
killed from outside (SIGKILL from the OOM killer, a failed node, SLURM's kill after a
SIGTERM) writes no result: submitit's ``job.wait()``/``job.exception()`` then wait
forever. So the wait here never calls those for a SLURM job: it asks the controller
(`scontrol show job`) and, once the job is final or forgotten, gives the result files a
bounded grace period and reads them directly; a task without one is reported as killed.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import pickle_load

log = logging.getLogger(__name__)

# States after which SLURM will not run the job again (REQUEUED/PENDING are not final).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
# scontrol could not answer (controller busy or unreachable): ask again later.
UNANSWERED = "UNKNOWN"
# How long result files may lag behind the job's end on a shared file system: submitit's
# own allowance (Job._results_timeout_s in submitit 1.5.4).
RESULT_GRACE_S = 15.0
# How long a job whose tasks all returned may take to be final in SLURM.
EXIT_GRACE_S = 60.0


def slurm_state(job_id: str) -> str | None:
    """The controller's state of ``job_id``; None once SLURM has forgotten (purged) the job;
    ``UNANSWERED`` when scontrol gave no answer (a transient failure, not a final state)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return UNANSWERED
    match = re.search(r"JobState=(\S+)", proc.stdout)
    if match:
        return match.group(1)
    # SLURM's answer for a job id it does not hold (never had, or purged after MinJobAge)
    return None if "Invalid job id" in proc.stderr else UNANSWERED


def is_over(state: str | None) -> bool:
    """SLURM will not run the job (again): final, or no longer known to the controller."""
    return state is None or state in FINAL_STATES


def results_written(job: submitit.Job) -> bool:
    """Every task has written its result file (without asking sacct)."""
    tasks = [job.task(k) for k in range(job.num_tasks)]
    return all(Path(t.paths.result_pickle).exists() for t in tasks)


def wait_for(job: submitit.Job, poll_s: float = 2.0, grace_s: float = RESULT_GRACE_S,
             exit_grace_s: float = EXIT_GRACE_S) -> str | None:
    """Block until ``job`` is over; return its last state (None: SLURM forgot the job).

    A SLURM job is over when every task has written its result, or when SLURM says it is
    final (or no longer knows it) and the missing results have not come within
    ``grace_s``. A job that SLURM restarts meanwhile (requeue) is waited for again. Once
    SLURM is final, the wait is bounded; while SLURM says the job runs, it waits.
    """
    if not isinstance(job, submitit.SlurmJob):
        job.wait()  # local jobs: submitit watches the processes itself
        return job.state
    warned = False
    while True:
        if results_written(job):
            return _until_final(job.job_id, exit_grace_s, poll_s)
        state = slurm_state(job.job_id)
        if is_over(state):
            state = _results_grace(job, state, grace_s, poll_s)
            if is_over(state):
                return state
        elif state == UNANSWERED and not warned:
            log.warning("scontrol cannot tell the state of job %s; still waiting",
                        job.job_id)
            warned = True
        time.sleep(poll_s)


def _results_grace(job: submitit.Job, state: str | None, grace_s: float,
                   poll_s: float) -> str | None:
    """SLURM says the job is over: wait up to ``grace_s`` for the missing result files
    (they may lag on a shared file system). Returns the state SLURM reports at the end;
    a non-final one means SLURM restarted the job (requeue) and the wait goes on."""
    deadline = time.time() + grace_s
    while not results_written(job) and time.time() < deadline:
        time.sleep(min(poll_s, 1.0))
        now = slurm_state(job.job_id)
        if now != UNANSWERED:
            state = now
        if not is_over(state):
            return state
    return state


def _until_final(job_id: str, bound_s: float, poll_s: float) -> str | None:
    """Every task returned; the job ends once its processes have exited (bounded)."""
    deadline = time.time() + bound_s
    state = slurm_state(job_id)
    while not is_over(state) and time.time() < deadline:
        time.sleep(min(poll_s, 0.5))
        state = slurm_state(job_id)
    return state


@dataclass(frozen=True)
class TaskOutcome:
    """How one task of a job ended, read from its result file."""

    task: int
    status: str  # "success", "error", "missing" (no result file) or "unreadable"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "success"


def task_outcome(job: submitit.Job, task: int) -> TaskOutcome:
    """Read task ``task``'s result file directly (never blocks, unlike ``job.exception()``).

    submitit's task writes ``("success", result)`` or ``("error", traceback)`` there when
    its function returns or raises; a task killed by a signal writes nothing.
    """
    path = Path(job.task(task).paths.result_pickle)
    if not path.exists():
        return TaskOutcome(task, "missing", f"killed without writing a result (no {path}; "
                           "e.g. SIGKILL by the OOM killer, a node failure or SLURM)")
    try:
        status, payload = pickle_load(path)
    except Exception as err:  # a truncated or foreign file: report it, do not crash
        return TaskOutcome(task, "unreadable", f"result file {path} unreadable: {err!r}")
    if status == "success":
        return TaskOutcome(task, "success")
    return TaskOutcome(task, "error", f"raised an exception:\n{payload}")


def ending(job_id: str, state: str | None) -> str:
    """How the job ended, in words, for messages."""
    if state is None:
        return (f"job {job_id} is no longer known to SLURM (purged from the controller; "
                "final state unknown)")
    return f"job {job_id} ended in state {state}"


def failure(job: submitit.Job, state: str | None) -> str | None:
    """Why the job failed, with the tail of the relevant logs; None if every task succeeded.

    ``state`` is what :func:`wait_for` returned.
    """
    outcomes = [task_outcome(job, k) for k in range(job.num_tasks)]
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return None
    lines = [f"{ending(job.job_id, state)}; {len(failed)} of {len(outcomes)} task(s) "
             "did not succeed:"]
    lines += [f"task {o.task}: {o.detail}" for o in failed]
    # task 0's stderr also holds the batch script's and srun's messages ("tasks 0-1: Killed")
    shown = sorted({0, failed[0].task})
    lines.append(log_tail(job, shown, lines=40 // len(shown)))
    return "\n".join(lines)


def log_tail(job: submitit.Job, tasks: list[int] | None = None, lines: int = 40) -> str:
    """The end of the stderr and stdout logs of ``tasks`` (default: task 0)."""
    out = []
    for k in tasks or [0]:
        task = job.task(k)
        for path in (task.paths.stderr, task.paths.stdout):
            path = Path(path)
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"==> {path} <==\n" + "\n".join(text))
    return "\n".join(out) or f"(no log files under {job.paths.folder})"
