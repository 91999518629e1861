"""Inside a submitit job: the distributed set-up and the run's record of its jobs.

submitit tells each task where it sits (SLURM_PROCID, SLURM_LOCALID, node list, or the
local executor's equivalents); we export that as the torch.distributed variables our
training code reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the
code runs exactly as under torchrun.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

log = logging.getLogger(__name__)

JOBS_FILE = "slurm_jobs.jsonl"
LOCAL_STARTS = ".local_starts"
"""Under submitit's local executor: one small file per task of each job, holding how often
that task has started (:func:`restart_count`)."""


@dataclass(frozen=True)
class TaskInfo:
    """Where this task sits in its job."""

    job_id: str
    rank: int
    local_rank: int
    world_size: int
    master: str
    cluster: str  # "slurm" or "local"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def export_distributed_env(cpus_per_task: int, master_port: int | None = None) -> TaskInfo:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT for this task.

    CUDA_VISIBLE_DEVICES is left as SLURM set it: with ``--gpus-per-node`` and no binding
    every task of a node sees all of the node's GPUs; where the cluster binds one GPU per
    task (``--gpus-per-task=1``, ``--gpu-bind``, a site default, cgroup ConstrainDevices)
    each task sees only its own. runtime/dist.py (``cuda_device_for_task``) picks the task's
    GPU in both cases from LOCAL_RANK and LOCAL_WORLD_SIZE (which submitit 1.5.4 exports
    as SLURM_NTASKS // SLURM_JOB_NUM_NODES: exact for our equal tasks per node). Thread
    pools are sized to the CPUs SLURM gave the task, so 2 tasks on 2 cores do not
    oversubscribe. ``master_port``: the rendezvous port (a profile's ``master_port``);
    None: submitit's, derived from the job id, the same for every task of the job.
    """
    # The submitting shell's variables travel into the job (sbatch --export=ALL): overwrite
    # them, and drop its MASTER_PORT first, which submitit would take as the job's (helpers
    # .TorchDistributedEnvironment._get_master_port) instead of deriving one from the job
    # id: two jobs sharing a first node would then both listen on it (EADDRINUSE).
    os.environ.pop("MASTER_PORT", None)
    if master_port is not None:  # asked for by the profile: taken as the job's
        os.environ["MASTER_PORT"] = str(master_port)
    dist = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", cpus_per_task))
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    os.environ.setdefault("MKL_NUM_THREADS", str(cpus))
    env = submitit.JobEnvironment()
    return TaskInfo(job_id=str(env.job_id), rank=dist.rank, local_rank=dist.local_rank,
                    world_size=dist.world_size, master=f"{dist.master_addr}:{dist.master_port}",
                    cluster=env.cluster)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's job records (one JSON line per job start, end, requeue request, failure
    requeue, give-up).

    A line that does not parse (cut short by a node crash during an append) is skipped
    with a warning: it failed every later start of the job, requeues included."""
    path = run_dir / JOBS_FILE
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            records.append(row)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d line(s) that are no JSON record (cut short by a "
                    "crash?)", path, bad)
    return records


def restart_count(run_dir: Path, info: TaskInfo) -> int:
    """How often this job has been restarted so far, for any reason.

    SLURM counts every restart of a batch job (SLURM_RESTART_COUNT, absent before the
    first): a requeue on the time-limit signal, a preemption requeued by SLURM
    (PreemptMode=REQUEUE), a node failure, `scontrol requeue`. So it only says how
    often, not why; :func:`timeout_count` is the count that ``--max-requeues`` limits.
    submitit's local executor has no such counter (it starts every task of the job again,
    under the same job id), so there each task counts its own starts, in a file of its
    own (``LOCAL_STARTS``/``<job id>.<rank>``): counting the job's ``start`` records, which
    rank 0 appends, would let a task that reads after rank 0 wrote this start's record
    count one restart more than rank 0 does (and resume, or wait for its store, alone).
    Called once per task start: it counts that start.
    """
    if info.cluster == "slurm":
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    path = run_dir / LOCAL_STARTS / f"{info.job_id}.{info.rank}"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = int(path.read_text() or 0) if path.is_file() else 0
    path.write_text(str(before + 1))
    return before


def timeout_count(run_dir: Path, job_id: str) -> int:
    """How many of this job's requeues so far were for its time limit.

    Rank 0 records each requeue it asks for with ``timed_out`` (see :func:`is_timeout`);
    restarts without such a record (SLURM's own preemption requeue, node failures,
    `scontrol requeue`) were not time-outs.
    """
    return sum(1 for r in read_records(run_dir)
               if r.get("job_id") == job_id and r.get("event") == "requeue_requested"
               and r.get("timed_out"))


def is_timeout(elapsed_s: float, time_limit_min: float | None) -> bool:
    """Whether the signal that came ``elapsed_s`` into the job means its time limit.

    The rule submitit applies before it decides on a requeue (submitit 1.5.4,
    ``SignalHandler.has_timed_out``): a time-out once the job has run 80% of its time
    limit or all but 10 minutes of it, whichever comes first; a preemption before. The
    same rule on the same numbers keeps this job's count of time-outs in step with the
    countdown submitit keeps (``slurm_max_num_timeout``), which refuses the requeue on its
    own once it runs out. An unknown limit counts as a preemption: nothing to count
    against.
    """
    if time_limit_min is None:
        return False
    limit_s = 60.0 * time_limit_min
    return elapsed_s >= min(0.8 * limit_s, limit_s - 600.0)


def submitted_time_limit_min() -> float | None:
    """The time limit (minutes) submitit judges this job's time-outs against; None if
    unknown.

    submitit keeps it in the job's submitted pickle (``DelayedSubmission._timeout_min``,
    set at submission from ``timeout_min``), not in SLURM's environment.
    """
    try:
        path = submitit.JobEnvironment().paths.submitted_pickle
        delayed = submitit.helpers.DelayedSubmission.load(path)
        return float(delayed._timeout_min)
    except Exception as err:  # no or unreadable pickle: judge every signal a preemption
        log.warning("cannot read the job's time limit from submitit's pickle (%r): "
                    "every signal counts as a preemption", err)
        return None


def record(run_dir: Path, event: str, info: TaskInfo, **extra: Any) -> None:
    """Append one line to RUN/slurm_jobs.jsonl (called on rank 0 only), durably."""
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {"event": event, "job_id": info.job_id, "cluster": info.cluster,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time(),
           "host": socket.gethostname(), "world_size": info.world_size, **extra}
    line = json.dumps(row) + "\n"
    path = run_dir / JOBS_FILE
    try:  # a line cut short by a crash would swallow this one: start on a new line
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
    except OSError:  # no file yet, or empty (nothing to seek back over)
        pass
    with path.open("a") as f:
        f.write(line)
        # on disk before the caller goes on (a requeue, an exit): the exit trap counts
        # these lines, and a batch host that crashes would otherwise lose the last ones;
        # a few lines per job attempt
        f.flush()
        os.fsync(f.fileno())
