"""What a job's batch script does once its tasks have ended: requeue a run that failed.

A task that dies (a GPU or driver error, the OOM killer, a collective that timed out, a
rank lost with its node) ends the whole job: srun's ``--kill-on-bad-exit`` ends the other
tasks, the batch script exits non-zero and SLURM marks the job FAILED. The time-out and
preemption signal requeues the job itself (launch/slurm/job.py), but nothing did so for a
failure: at 512 GPUs one comes every few days, and the run waited for someone to notice
and submit it again. Every task's command already resumes from the run's latest
checkpoint (``--resume auto``), so a requeue is all a failed run needs.

The sbatch script runs this module from its EXIT trap (:func:`trap_lines`, added to the
script's set-up by launch/slurm/executor.py) with srun's exit status. It requeues the job
(``scontrol requeue``, the job's own id) when, by :func:`decide`:

- srun exited non-zero: a task failed (0: every task returned);
- SLURM still runs this attempt of the job: ``JobState=RUNNING`` with ``Restarts`` equal
  to this attempt's ``SLURM_RESTART_COUNT``. A cancelled job, or one that is already
  being requeued (by the signal's handler, an operator's ``scontrol requeue``, SLURM's own
  preemption) is COMPLETING by the time the trap runs, or counts one restart more (both
  seen on this project's test cluster, Slurm 22.05: ``scancel`` and ``scontrol requeue``
  of a running job run the trap with COMPLETING; a task's failure with RUNNING);
- rank 0 did not record that the run ended without a failure to retry: a refusal (exit
  status 2: a bad config or a checkpoint it will not resume, the same on every try), a
  completed run (another task failed as it exited), the signal's requeue or its give-up
  after ``max_requeues`` time-outs;
- fewer than ``failure_requeues`` requeues of this job for a failure found the run's
  checkpoint where it is now. A failure that comes back before the run saves again (a
  crash at the same step, a node that always fails) is tried that many times and then
  left FAILED; one after a new checkpoint counts afresh, so a weeks-long run survives any
  number of sporadic failures as long as it makes progress between them.

Every decision is appended to the run's ``slurm_jobs.jsonl`` (``failure_requeue`` or
``failure_not_requeued`` with the reason). The requeued job waits out SLURM's hold on
requeued batch jobs (its EligibleTime, about two minutes) and resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.config import REFUSED_STATUS
from launch.slurm.environment import TaskInfo, read_records, record

log = logging.getLogger(__name__)

# Rank 0's records after a start that end the attempt in a way a requeue must not repeat
# (launch/slurm/job.py writes them): the signal's own requeue and its give-up.
_HANDLED = {"requeue_requested": "the job's time-out/preemption signal requeued it",
            "gave_up": "the job reached its time limit more often than --max-requeues"}


def decide(status: int, state: str | None, restarts: int | None, attempt: int,
           job_records: Sequence[dict[str, Any]], checkpoint: Any,
           failure_requeues: int) -> tuple[bool, str]:
    """Whether to requeue this attempt of a job whose srun exited with ``status``, and why.

    ``state``/``restarts``: SLURM's ``JobState``/``Restarts`` of the job now; ``attempt``:
    this attempt's ``SLURM_RESTART_COUNT``; ``job_records``: the job's lines of
    ``slurm_jobs.jsonl``, in order; ``checkpoint``: the run's newest checkpoint now
    (:func:`launch.slurm.job.own_checkpoint`); ``failure_requeues``: how many failures in
    a row without a new checkpoint are requeued.
    """
    if status == 0:
        return False, "every task returned"
    if state != "RUNNING" or restarts != attempt:
        return False, (f"SLURM no longer runs this attempt (JobState={state}, Restarts="
                       f"{restarts}, this attempt {attempt}): cancelled, or requeued already")
    starts = [i for i, r in enumerate(job_records)
              if r.get("event") == "start" and r.get("requeue") == attempt]
    for r in job_records[starts[-1] + 1:] if starts else []:
        if r.get("event") in _HANDLED:
            return False, _HANDLED[r["event"]]
        if r.get("event") == "ended" and r.get("status") == 0:
            return False, "the run completed (rank 0 returned 0); another task failed after"
        if r.get("event") == "ended" and r.get("refused"):
            return False, (f"the run refused to start or go on (exit status "
                           f"{REFUSED_STATUS}): the same command line would be refused again")
    tried = sum(1 for r in job_records
                if r.get("event") == "failure_requeue" and r.get("checkpoint") == checkpoint)
    if tried >= failure_requeues:
        return False, (f"failed {tried + 1} times without a new checkpoint in between "
                       f"(failure_requeues={failure_requeues})")
    return True, (f"srun exited with status {status}; requeue {tried + 1} of at most "
                  f"{failure_requeues} without a new checkpoint")


def trap_lines(python: str, run_dir: Path, failure_requeues: int) -> list[str]:
    """The sbatch script's lines that run this module when the script exits, with srun's
    exit status (the status of the last command, which a trap's first command still
    sees); none when ``failure_requeues`` is 0."""
    if failure_requeues <= 0:
        return []
    command = " ".join([shlex.quote(python), "-m", "launch.slurm.after_exit", "--status",
                        '"$status"', "--run-dir", shlex.quote(str(run_dir)),
                        "--failure-requeues", str(failure_requeues)])
    return [f"internimage_after_exit() {{ status=$?; {command}; }}",
            "trap internimage_after_exit EXIT"]


def _slurm_job(job_id: str) -> tuple[str | None, int | None]:
    from launch.slurm.wait import slurm_job  # scontrol's answer, parsed once

    info = slurm_job(job_id)
    return info.state, info.restarts


def main(argv: list[str] | None = None) -> int:
    """The trap's entry point; always exits 0 (the job's state is SLURM's business)."""
    from launch.slurm.job import own_checkpoint

    p = argparse.ArgumentParser(prog="python -m launch.slurm.after_exit")
    p.add_argument("--status", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--failure-requeues", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    job_id = os.environ["SLURM_JOB_ID"]
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if args.status == 0:  # the common end: nothing to ask SLURM or to record
        return 0
    state, restarts = _slurm_job(job_id)
    records = [r for r in read_records(args.run_dir) if r.get("job_id") == job_id]
    checkpoint = own_checkpoint(args.run_dir)
    requeue, why = decide(args.status, state, restarts, attempt, records, checkpoint,
                          args.failure_requeues)
    info = TaskInfo(job_id=job_id, rank=0, local_rank=0,
                    world_size=int(os.environ.get("SLURM_NTASKS", "1")), master="",
                    cluster="slurm")
    if not requeue:
        log.warning("job %s not requeued after its failure: %s", job_id, why)
        record(args.run_dir, "failure_not_requeued", info, requeue=attempt,
               status=args.status, why=why)
        return 0
    log.warning("job %s: requeueing after a failure (%s); it resumes from its latest "
                "checkpoint", job_id, why)
    record(args.run_dir, "failure_requeue", info, requeue=attempt + 1, status=args.status,
           checkpoint=checkpoint, why=why)
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, proc.returncode,
                  proc.stderr.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
