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


def export_distributed_env(cpus_per_task: int) -> TaskInfo:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for this task.

    CUDA_VISIBLE_DEVICES is left alone: every task of a node sees all of the node's GPUs
    and the training code picks ``cuda:LOCAL_RANK`` (as under torchrun). Thread pools are
    sized to the CPUs SLURM gave the task, so 2 tasks on 2 cores do not oversubscribe.
    """
    # overwrite: the submitting shell's variables travel into the job (sbatch --export=ALL)
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
    """The run's job records (one JSON line per job start, requeue request, give-up)."""
    path = run_dir / JOBS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def requeue_count(run_dir: Path, info: TaskInfo) -> int:
    """How often this job has been requeued so far.

    SLURM counts restarts of a batch job itself (SLURM_RESTART_COUNT, absent before the
    first); submitit's local executor has no such counter, so there we count this job's
    earlier starts in the run's record.
    """
    if info.cluster == "slurm":
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return sum(1 for r in read_records(run_dir)
               if r.get("job_id") == info.job_id and r.get("event") == "start")


def record(run_dir: Path, event: str, info: TaskInfo, **extra: Any) -> None:
    """Append one line to RUN/slurm_jobs.jsonl (called on rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {"event": event, "job_id": info.job_id, "cluster": info.cluster,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time(),
           "host": socket.gethostname(), "world_size": info.world_size, **extra}
    with (run_dir / JOBS_FILE).open("a") as f:
        f.write(json.dumps(row) + "\n")
