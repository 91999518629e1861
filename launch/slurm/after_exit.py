"""What a job's batch script does once its tasks have ended: requeue a run that failed.

A task that dies (a GPU or driver error, the OOM killer, a collective that timed out, a
rank whose node stopped answering) ends the whole job: srun's ``--kill-on-bad-exit`` ends
the other tasks, the batch script exits non-zero and SLURM marks the job FAILED. The
time-out and preemption signal requeues the job itself (launch/slurm/job.py), but nothing
did so for a failure: at 512 GPUs one comes every few days, and the run waited for
someone to notice and submit it again. Every task's command already resumes from the
run's latest checkpoint (``--resume auto``), so a requeue is all a failed run needs. (A
node that SLURM itself declares failed is SLURM's to requeue: the script asks for
``--requeue``, launch/slurm/executor.py, so it does, whatever the site's default.)

The sbatch script runs this module from its EXIT trap (:func:`trap_lines`, added to the
script's set-up by launch/slurm/executor.py) with srun's exit status. It requeues the job
(``scontrol requeue``, the job's own id) when, by :func:`decide`:

- srun exited non-zero: a task failed (0: every task returned). A batch shell that SLURM
  ends (``scancel``, the time limit, a requeue) gets SIGTERM while it waits for srun, and
  bash runs the trap at once with the status of the last command that completed (0);
- SLURM still runs this attempt of the job: ``JobState=RUNNING`` with ``Restarts`` equal
  to this attempt's ``SLURM_RESTART_COUNT``. A job being cancelled or requeued (by the
  signal's handler, an operator, SLURM's own preemption) is COMPLETING by then, or counts
  one restart more (seen on this project's test cluster, Slurm 22.05, when srun returned
  first). Such a job is SLURM's business: nothing is recorded. An unanswered ``scontrol``
  is asked again, then taken as a failure not requeued (said so);
- rank 0 did not record that this attempt's run completed (another task failed as it
  exited) or gave up after ``max_requeues`` time-outs. A ``requeue_requested`` of the
  signal's handler does not count: SLURM running the same attempt still shows that its
  requeue did not happen. Nor did rank 0's run stop on an error that says a retry cannot
  help (``retry_helps = False``: a non-finite loss under ``run.on_nonfinite=stop``
  resumes from the same checkpoint and data, and diverges again);
- fewer than ``failure_requeues`` requeues of this job for a failure found the run's
  checkpoint where it is now. A failure that comes back before the run saves again (a
  crash at the same step, a refused resume, a node that always fails) is tried that many
  times and then left FAILED; one after a new checkpoint counts afresh, so a weeks-long
  run survives any number of sporadic failures as long as it makes progress between
  them. Refusals (exit status 2) are not told apart (a checkpoint load that failed on a
  bad node's GPU or a flaky file system is refused too, and would succeed elsewhere),
  and a refused attempt counts against the bound whatever the checkpoint does (a second
  submission of a running job's command, refused by the run lock while the first job
  keeps saving, would otherwise be requeued for as long as the first one runs).

Each failure is recorded in the run's ``slurm_jobs.jsonl`` (``failure_requeue``, then
``failure_requeue_failed`` if ``scontrol requeue`` refused; or ``failure_not_requeued``,
with the reason). The requeued job waits out SLURM's hold on requeued batch jobs (its
EligibleTime, about two minutes) and resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.slurm.environment import TaskInfo, read_records, record
from launch.slurm.job import same_checkpoint
from launch.slurm.wait import UNANSWERED, slurm_job

log = logging.getLogger(__name__)

# How often, and how far apart, an unanswered ``scontrol show job`` is asked again (a
# busy controller; the job stays RUNNING meanwhile, so nothing is lost by waiting)
ASKS, ASK_EVERY_S = 3, 5.0


def slurm_ended_it(state: str | None, restarts: int | None, attempt: int) -> bool:
    """Whether SLURM has ended or requeued this attempt itself (a cancel, the time limit,
    a node failure, a requeue): not RUNNING, or restarted since (``restarts`` above
    ``attempt``). An unanswered state is not taken for either."""
    return state != UNANSWERED and (state != "RUNNING" or restarts != attempt)


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
    if state == UNANSWERED:
        return False, ("scontrol did not answer: SLURM's state of the job is unknown; "
                       "submit the same command again to resume")
    if slurm_ended_it(state, restarts, attempt):
        return False, (f"SLURM ended or requeued this attempt itself (JobState={state}, "
                       f"Restarts={restarts}, this attempt {attempt})")
    starts = [i for i, r in enumerate(job_records)
              if r.get("event") == "start" and r.get("requeue") == attempt]
    signalled = ""
    for r in job_records[starts[-1] + 1:] if starts else []:
        if r.get("event") == "gave_up":
            return False, "the job reached its time limit more often than --max-requeues"
        if r.get("event") == "ended" and r.get("status") == 0:
            return False, "the run completed (rank 0 returned 0); another task failed after"
        if r.get("event") == "ended" and r.get("retry") is False:
            return False, (f"the run stopped where a retry cannot help ({r.get('error')}): "
                           "mend the cause, then submit the same command again")
        if r.get("event") == "requeue_requested":
            signalled = "; the time-out/preemption signal's requeue did not happen"
    tried, refusals = _failures_without_progress(job_records, checkpoint)
    if tried + refusals >= failure_requeues:
        if refusals:  # another job's checkpoints (the run lock's case) are no progress
            return False, (f"failed {tried + refusals + 1} times without progress of its "
                           f"own (failure_requeues={failure_requeues}), the last "
                           f"{refusals} before this one refused at their start: "
                           f"{_last_refusal(job_records)}{signalled}")
        return False, (f"failed {tried + 1} times without a new checkpoint in between "
                       f"(failure_requeues={failure_requeues}){signalled}")
    return True, (f"srun exited with status {status}; requeue {tried + refusals + 1} of at "
                  f"most {failure_requeues} without progress{signalled}")


def _refused_start(r: dict[str, Any]) -> bool:
    """Whether ``ended`` record ``r`` is a start that was refused (exit 2 before the run
    passed its start checks: the run lock, a resume check). A refusal after them (a save
    that hit a full disk, a store refusing reads) came from a run that trained; records
    written before ``started`` was recorded count as refused starts."""
    return bool(r.get("refused")) and not r.get("started", False)


def _last_refusal(job_records: Sequence[dict[str, Any]]) -> str:
    """The error of the job's last refused start, shortened (its record keeps it whole)."""
    for r in reversed(job_records):
        if r.get("event") == "ended" and _refused_start(r):
            return str(r.get("error", "no error recorded"))[:300]
    return "no error recorded"


def _failures_without_progress(job_records: Sequence[dict[str, Any]],
                               checkpoint: Any) -> tuple[int, int]:
    """This job's earlier failure requeues that found the run's checkpoint where it is now,
    and the refused starts since its last attempt that got past its start (rank 0's
    ``ended`` record: :func:`_refused_start`): a refused start made no progress of its
    own, whatever checkpoints another job saves meanwhile. Counted by checkpoint alone, a
    second submission of a running job's command, refused by the run lock, was requeued
    for as long as the first job saved, each attempt holding its allocation; counted for
    the job's whole life, sporadic refusals (a lock file the file system failed to read)
    of a job that trains between them would end it."""
    tried, streak, refused = 0, 0, False
    for r in job_records:
        event = r.get("event")
        if event == "start":
            if not refused:  # the attempt before got past its start (or SLURM ended it)
                streak = 0
            refused = False
        elif event == "ended":
            refused = _refused_start(r)
            streak = streak if refused else 0  # an attempt that got past its start
        elif event == "failure_requeue":
            if refused:
                streak += 1
            else:
                streak = 0
                tried += same_checkpoint(r.get("checkpoint"), checkpoint)
    # the attempt judged now: a refused start continues the streak; one that got past its
    # start (or left no record: SIGKILLed by srun after another task failed) broke it
    return tried, streak if refused else 0


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


def main(argv: list[str] | None = None) -> int:
    """The trap's entry point; exits 0 (the job's state is SLURM's business), also when
    the run directory cannot be read or written (a full disk may be what ended the run:
    said in the log, the job left to end FAILED)."""
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
    for ask in range(ASKS):
        info = slurm_job(job_id)
        state, restarts = info.state, info.restarts
        if state != UNANSWERED:
            break
        if ask + 1 < ASKS:
            time.sleep(ASK_EVERY_S)
    if slurm_ended_it(state, restarts, attempt):  # SLURM's business: nothing to record
        log.info("job %s: SLURM ended or requeued this attempt itself (JobState=%s)",
                 job_id, state)
        return 0
    try:
        return _decide_and_act(args, job_id, attempt, state, restarts)
    except OSError as err:
        log.error("job %s: the run directory %s cannot be read or written (%s): not "
                  "requeued; submit the same command again to resume", job_id,
                  args.run_dir, err)
        return 0


def _decide_and_act(args: argparse.Namespace, job_id: str, attempt: int,
                    state: str | None, restarts: int | None) -> int:
    from launch.slurm.job import own_checkpoint

    records = [r for r in read_records(args.run_dir) if r.get("job_id") == job_id]
    checkpoint = own_checkpoint(args.run_dir)
    requeue, why = decide(args.status, state, restarts, attempt, records, checkpoint,
                          args.failure_requeues)
    me = TaskInfo(job_id=job_id, rank=0, local_rank=0,
                  world_size=int(os.environ.get("SLURM_NTASKS", "1")), master="",
                  cluster="slurm")
    if not requeue:
        log.warning("job %s not requeued after its failure: %s", job_id, why)
        record(args.run_dir, "failure_not_requeued", me, requeue=attempt,
               status=args.status, why=why)
        return 0
    log.warning("job %s: requeueing after a failure (%s); it resumes from its latest "
                "checkpoint", job_id, why)
    record(args.run_dir, "failure_requeue", me, requeue=attempt + 1, status=args.status,
           checkpoint=checkpoint, why=why)
    # recorded first: a requeue that works ends this shell (SIGTERM) before it returns
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True,
                              text=True, timeout=60)
        failed = f"exit status {proc.returncode}: {proc.stderr.strip()}" \
            if proc.returncode != 0 else None
    except (OSError, subprocess.SubprocessError) as err:
        failed = repr(err)
    if failed is not None:
        log.error("scontrol requeue %s failed (%s): the job ends FAILED; submit the same "
                  "command again to resume", job_id, failed)
        record(args.run_dir, "failure_requeue_failed", me, requeue=attempt + 1,
               error=failed[:1000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
