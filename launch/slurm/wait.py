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
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import pickle_load

from launch.config import REFUSED_STATUS
from launch.slurm.job import START_LINE
from launch.slurm.profile import RESULT_GRACE_S

log = logging.getLogger(__name__)

# States after which SLURM will not run the job again (REQUEUED/PENDING are not final).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
# Final states that a requeue may pass through (a preemption with PreemptMode=REQUEUE, a
# node failure with requeue): believed only once they have held for the result grace.
SETTLING_STATES = {"PREEMPTED", "NODE_FAIL"}
# States in which no task of the job runs and SLURM will start it (again): a result file
# present then was written by a run that has ended without ending the job (a requeue).
WAITING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                  "CONFIGURING", "POWER_UP_NODE"}
# scontrol could not answer (controller busy or unreachable): ask again later.
UNANSWERED = "UNKNOWN"
# RESULT_GRACE_S (launch.slurm.profile): how long result files may lag behind the job's
# end by default; `submit --wait` passes the profile's result_grace_s.
# How long a final state that a requeue passes through (SETTLING_STATES) must hold before
# it is believed: SLURM's own requeue transition, nothing to do with file-system lag (so
# not the profile's result_grace_s, which a one-machine profile sets to 2 s); submitit's
# 15 s allowance, which this wait used for both before result_grace_s existed.
SETTLE_S = 15.0
# How long a job whose tasks all returned may take to be final in SLURM.
EXIT_GRACE_S = 60.0


@dataclass(frozen=True)
class SlurmJobInfo:
    """What ``scontrol show job`` says of a job: its state (None once SLURM forgot it,
    ``UNANSWERED`` when scontrol gave no answer) and how often SLURM restarted it."""

    state: str | None
    restarts: int | None = None


def slurm_job(job_id: str) -> SlurmJobInfo:
    """The controller's state of ``job_id`` and its restart count (``Restarts=``)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return SlurmJobInfo(UNANSWERED)
    match = re.search(r"JobState=(\S+)", proc.stdout)
    if match:
        restarts = re.search(r"\bRestarts=(\d+)", proc.stdout)
        return SlurmJobInfo(match.group(1), int(restarts.group(1)) if restarts else None)
    # SLURM's answer for a job id it does not hold (never had, or purged after MinJobAge)
    return SlurmJobInfo(None if "Invalid job id" in proc.stderr else UNANSWERED)


def slurm_state(job_id: str) -> str | None:
    """The controller's state of ``job_id``; None once SLURM has forgotten (purged) the job;
    ``UNANSWERED`` when scontrol gave no answer (a transient failure, not a final state)."""
    return slurm_job(job_id).state


def is_over(state: str | None) -> bool:
    """SLURM will not run the job (again): final, or no longer known to the controller."""
    return state is None or state in FINAL_STATES


def _fingerprint(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RunResults:
    """The result files of the job's current run, told from those an earlier run left.

    SLURM restarts a requeued job (``scontrol requeue``, a preemption with
    PreemptMode=REQUEUE, a node failure) under the same job id, and its tasks write the same
    result files. The run that was requeued often writes them too: SLURM's SIGTERM kills
    the data-loader workers, the training raises and submitit writes ``("error", ...)``. Such
    files are no outcome of the job. They are told apart by what the waiter sees, with no
    clock compared (file-system and controller clocks may differ; a restart may come within
    the second): when SLURM shows the job waiting to run (again) (``WAITING_STATES``: no
    task runs then) or a higher restart count (``Restarts=``, in case a poll missed the
    wait), every result file present is from a run that has ended and is noted as stale by
    its identity (inode, size, mtime, ctime). A later run's file is a new one (submitit
    writes a temporary file and renames it; TrainingJob also removes its task's stale
    file as it starts), so it counts again. A waiter that starts only after a requeue
    relies on that removal.
    """

    def __init__(self, job: submitit.Job) -> None:
        self.job = job
        self.restarts: int | None = None
        self.stale: dict[int, tuple[int, int, int, int]] = {}

    def path(self, task: int) -> Path:
        return Path(self.job.task(task).paths.result_pickle)

    def observe(self, info: SlurmJobInfo) -> bool:
        """Note what SLURM says; True if it shows a restart (stale results noted)."""
        restarted = info.state in WAITING_STATES or (
            info.restarts is not None and self.restarts is not None
            and info.restarts > self.restarts)
        if info.restarts is not None:
            self.restarts = max(info.restarts, self.restarts or 0)
        if restarted:
            for task in range(self.job.num_tasks):
                fingerprint = _fingerprint(self.path(task))
                if fingerprint is not None:
                    self.stale[task] = fingerprint
        return restarted

    def is_stale(self, task: int) -> bool:
        return task in self.stale and _fingerprint(self.path(task)) == self.stale[task]

    def written(self, task: int) -> bool:
        return self.path(task).exists() and not self.is_stale(task)

    def all_written(self) -> bool:
        """Every task of the current run has written its result file."""
        return all(self.written(k) for k in range(self.job.num_tasks))


# _until_final's answer when the results it waited on turned out to be an earlier run's
_AGAIN = object()


def wait_for(job: submitit.Job, poll_s: float = 2.0, grace_s: float = RESULT_GRACE_S,
             exit_grace_s: float = EXIT_GRACE_S,
             results: RunResults | None = None) -> str | None:
    """Block until ``job`` is over; return its last state (None: SLURM forgot the job).

    A SLURM job is over when every task has written its result, or when SLURM says it is
    final (or no longer knows it) and the missing results have not come within
    ``grace_s``. A job that SLURM restarts meanwhile (requeue) is waited for again: results
    written by a run that SLURM then requeued are not the job's (see :class:`RunResults`;
    pass ``results`` to :func:`failure` to read only the final run's). Once SLURM is final,
    the wait is bounded; while SLURM says the job runs, it waits.
    """
    if not isinstance(job, submitit.SlurmJob):
        job.wait()  # local jobs: submitit watches the processes itself
        return job.state
    results = results if results is not None else RunResults(job)
    warned = False
    while True:
        info = slurm_job(job.job_id)
        results.observe(info)
        state = info.state
        if results.all_written():
            final = _until_final(job.job_id, results, exit_grace_s, SETTLE_S, poll_s)
            if final is not _AGAIN:
                return final  # type: ignore[return-value]
            continue  # requeued: wait for the next run
        if is_over(state):
            state = _results_grace(job, results, state, grace_s, poll_s)
            if is_over(state):
                return state
        elif state == UNANSWERED and not warned:
            log.warning("scontrol cannot tell the state of job %s; still waiting",
                        job.job_id)
            warned = True
        time.sleep(poll_s)


def _results_grace(job: submitit.Job, results: RunResults, state: str | None,
                   grace_s: float, poll_s: float) -> str | None:
    """SLURM says the job is over: wait up to ``grace_s`` for the missing result files
    (they may lag on a shared file system), and for a state a requeue passes through at
    least ``SETTLE_S``. Returns the state SLURM reports at the end; a non-final one means
    SLURM restarted the job (requeue) and the wait goes on."""
    start = time.time()

    def waiting() -> bool:
        bound = max(grace_s, SETTLE_S) if state in SETTLING_STATES else grace_s
        return time.time() < start + bound and (state in SETTLING_STATES
                                                or not results.all_written())

    while waiting():
        time.sleep(min(poll_s, 1.0))
        info = slurm_job(job.job_id)
        results.observe(info)
        if info.state != UNANSWERED:
            state = info.state
        if not is_over(state):
            return state
    return state


def _until_final(job_id: str, results: RunResults, bound_s: float, settle_s: float,
                 poll_s: float) -> object:
    """Every task of the current run returned; the job ends once its processes have exited
    (bounded by ``bound_s`` but for COMPLETING: a run whose results are in but whose
    processes do not exit is reported from its results). ``_AGAIN`` when SLURM restarts
    the job instead (the results were a requeued run's); a final state that a requeue
    passes through (``SETTLING_STATES``) is believed once it has held for ``settle_s``."""
    deadline = time.time() + bound_s
    settled: float | None = None
    while True:
        info = slurm_job(job_id)
        if results.observe(info) or not results.all_written():
            return _AGAIN  # a restart, or the next run removed (replaced) the files
        state = info.state
        if is_over(state):
            if state not in SETTLING_STATES:
                return state
            settled = settled if settled is not None else time.time() + settle_s
            if time.time() >= settled:
                return state
        elif time.time() >= deadline and state != "COMPLETING":
            # COMPLETING: SLURM is ending the run's processes, and will then make the job
            # final or requeue it (its SIGTERM may be what made the tasks return): its
            # own KillWait and UnkillableStepTimeout bound that, so it is waited out
            return state
        time.sleep(min(poll_s, 0.5))


@dataclass(frozen=True)
class TaskOutcome:
    """How one task of a job ended, read from its result file."""

    task: int
    status: str  # "success", "error", "missing" (no result file) or "unreadable"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "success"


def task_outcome(job: submitit.Job, task: int,
                 results: RunResults | None = None) -> TaskOutcome:
    """Read task ``task``'s result file directly (never blocks, unlike ``job.exception()``).

    submitit's task writes ``("success", result)`` or ``("error", traceback)`` there when
    its function returns or raises; a task killed by a signal writes nothing. With
    ``results`` (the waiter's), a file left by a run that SLURM requeued counts as none.
    """
    path = Path(job.task(task).paths.result_pickle)
    if results is not None and results.is_stale(task):
        return TaskOutcome(task, "missing", "killed without writing a result in the job's "
                           f"last run ({path} is from a run before a requeue; e.g. a node "
                           "failure or SLURM)")
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


def failure(job: submitit.Job, state: str | None,
            results: RunResults | None = None) -> str | None:
    """Why the job failed, with the tail of the relevant logs; None if every task succeeded.

    ``state`` is what :func:`wait_for` returned; ``results`` the :class:`RunResults` it
    waited with (then result files of a requeued run are not read as the job's).
    """
    outcomes = [task_outcome(job, k, results) for k in range(job.num_tasks)]
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return None
    lines = []
    refused = refusal(job, failed)
    if refused is not None:  # the job's own reason first, not line ~20 of a traceback
        lines.append(f"{ending(job.job_id, state)}: {refused}")
    lines.append(f"{ending(job.job_id, state)}; {len(failed)} of {len(outcomes)} task(s) "
                 "did not succeed:")
    lines += [f"task {o.task}: {o.detail}" for o in failed]
    # task 0's stderr also holds the batch script's and srun's messages ("tasks 0-1: Killed")
    shown = sorted({0, failed[0].task})
    lines.append(log_tail(job, shown, lines=40 // len(shown)))
    return "\n".join(lines)


# What launch.slurm.job.TrainingJob raises when the command exits non-zero, and the status
# with which `internimage pretrain|finetune` ends on a refusal (or a config error), having
# printed it in one line to stderr, ``internimage <command>: <why>`` (launch/cli.py,
# launch/commands/pretrain.py, launch/commands/finetune.py)
REFUSED_EXIT = f"exited with status {REFUSED_STATUS} "
REFUSAL_LINE = re.compile(r"^internimage (pretrain|finetune): \S.*$")
# The line launch.slurm.job.TrainingJob logs once at each start of every task, before it
# runs the command ("job 4242 task 0/2 (master node1), restart 1 (...)", its START_LINE
# format: each %s stands for any text, each %d for a whole number), to stderr: the
# start of an attempt in the task's stderr log, which submitit names %j_%t_log.err and
# SLURM appends to (open-mode append) at every requeue of the job, so one file holds all
# of the job's attempts. A task that refused has logged it: TrainingJob raises the
# "exited with status 2" it is judged by only after. (submitit's own "Starting with
# JobEnvironment(...)" is no such marker: it logs it at INFO level, which its logging
# config sends to stdout only, not stderr.)
ATTEMPT_START = re.compile(r"\b" + "".join(
    {"%s": ".*?", "%d": r"-?\d+"}.get(part, re.escape(part))
    for part in re.split(r"(%[sd])", START_LINE)))
# How much of a log's end is read, at most (a weeks-long job's logs grow with the run; what
# the report shows is at their end: the refusal is the command's last line before it exits,
# followed only by the job's traceback, submitit's error and srun's messages)
LOG_TAIL_BYTES = 256 * 1024


def _tail_lines(path: Path, max_bytes: int | None = None) -> list[str]:
    """The whole lines among the last ``max_bytes`` (default :data:`LOG_TAIL_BYTES`) bytes
    of ``path``, split where ``str.splitlines`` splits (``\\n``, also ``\\r``: a progress
    bar redrawn in place, as tqdm does in a log); a line that bound cuts is left out, unless
    no line starts within the window (one line longer than it): then the window is kept as
    it is, rather than nothing. The cost does not grow with the file."""
    max_bytes = LOG_TAIL_BYTES if max_bytes is None else max_bytes
    with path.open("rb") as f:
        start = max(0, f.seek(0, os.SEEK_END) - max_bytes)
        f.seek(max(0, start - 1))  # the byte before: does the window start a line?
        data = f.read(max_bytes + 1)
    if start == 0:
        return data.decode(errors="replace").splitlines()
    # the first piece is the line the bound cuts, or only the end of the line before the
    # window (the byte before it ends a line): either way no whole line of the window
    pieces = data.decode(errors="replace").splitlines(keepends=True)
    if len(pieces) > 1:
        return "".join(pieces[1:]).splitlines()
    return data[1:].decode(errors="replace").splitlines()


def refusal(job: submitit.Job, failed: list[TaskOutcome]) -> str | None:
    """The one line with which the job refused (a resume or start it cannot make, a config
    error: exit status 2), as its first such task printed it last to its stderr log; None
    when no task refused, or its log holds no such line.

    Only the job's last attempt is read (the log's lines after its last
    :data:`ATTEMPT_START`): an earlier attempt's refusal, before a requeue, is not how the
    job ended. And only the log's last :data:`LOG_TAIL_BYTES`: an attempt whose start is
    further back fills all of them.
    """
    for outcome in failed:
        if outcome.status != "error" or REFUSED_EXIT not in outcome.detail:
            continue
        path = Path(job.task(outcome.task).paths.stderr)
        if not path.is_file():
            continue
        lines = _tail_lines(path)
        starts = [i for i, line in enumerate(lines) if ATTEMPT_START.search(line)]
        if starts:
            lines = lines[starts[-1] + 1:]
        found = [line for line in lines if REFUSAL_LINE.match(line)]
        if found:
            return found[-1]
    return None


def log_tail(job: submitit.Job, tasks: list[int] | None = None, lines: int = 40) -> str:
    """The end of the stderr and stdout logs of ``tasks`` (default: task 0): their last
    ``lines`` lines within their last :data:`LOG_TAIL_BYTES`."""
    out = []
    for k in tasks or [0]:
        task = job.task(k)
        for path in (task.paths.stderr, task.paths.stdout):
            path = Path(path)
            if path.is_file():
                text = _tail_lines(path)[-lines:]
                out.append(f"==> {path} <==\n" + "\n".join(text))
    return "\n".join(out) or f"(no log files under {job.paths.folder})"
