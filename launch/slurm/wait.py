"""Waiting for a submitted job (`submit --wait`) and telling the user how it ended.

submitit knows a job is over when every task has written its result file, or when
`sacct` says so; clusters without SLURM accounting have no `sacct`, and a job killed
from outside writes no result. So the wait also asks the controller (`scontrol show
job`) and stops once the job is in a final state.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import submitit

# States after which SLURM will not run the job again (REQUEUED/PENDING are not final).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def slurm_state(job_id: str) -> str | None:
    """The controller's state of ``job_id``; None once SLURM has forgotten the job."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else None


def results_written(job: submitit.Job) -> bool:
    """Every task has written its result file (without asking sacct)."""
    tasks = [job.task(k) for k in range(job.num_tasks)]
    return all(Path(t.paths.result_pickle).exists() for t in tasks)


def wait_for(job: submitit.Job, poll_s: float = 2.0) -> None:
    """Block until ``job`` is over (all results written, or SLURM says it is final)."""
    if not isinstance(job, submitit.SlurmJob):
        job.wait()  # local jobs: submitit watches the processes itself
        return
    while not results_written(job):
        state = slurm_state(job.job_id)
        if state is None or state in FINAL_STATES:
            # results may still be on their way to the shared file system
            deadline = time.time() + 15
            while not results_written(job) and time.time() < deadline:
                time.sleep(1)
            return
        time.sleep(poll_s)
    # every task returned; the job ends once its processes have exited (bounded)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = slurm_state(job.job_id)
        if state is None or state in FINAL_STATES:
            return
        time.sleep(0.5)


def failure(job: submitit.Job) -> str | None:
    """Why the job failed (None if every task succeeded)."""
    try:
        error = job.exception()
    except submitit.core.utils.UncompletedJobError as err:
        return str(err)
    return None if error is None else str(error)


def log_tail(job: submitit.Job, lines: int = 40) -> str:
    """The end of task 0's stderr and stdout logs."""
    out = []
    task = job.task(0) if job.num_tasks > 1 else job
    for path in (task.paths.stderr, task.paths.stdout):
        path = Path(path)
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==> {path} <==\n" + "\n".join(text))
    return "\n".join(out) or f"(no log files under {job.paths.folder})"
