"""Cluster profiles: the typed, validated defaults of `internimage submit`.

A profile is a YAML file over :class:`ClusterProfile` (configs/launch/*.yaml); command-line
flags override its values. Everything is checked before anything is submitted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from launch.config import ConfigError, build, read_config_file

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "launch"
# How long result files may lag behind the job's end on a shared file system: submitit's
# own allowance (Job._results_timeout_s in submitit 1.5.4); the default of result_grace_s.
RESULT_GRACE_S = 15.0
# How much earlier than sbatch's --signal=SIG@delay SLURM may send the signal ("up to 60
# seconds earlier than specified", sbatch(1), --signal).
SIGNAL_EARLY_S = 60


@dataclass
class ClusterProfile:
    """Resources and requeue policy of a SLURM job (one task per GPU)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    # None: one task per GPU, or 1 without GPUs.
    tasks_per_node: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    job_name: str = "internimage"
    # submitit's folder: sbatch script, pickles and %j_%t_log.out/err; %j = the job id.
    folder: str = "runs/submitit/%j"
    max_requeues: int = 3
    # A task's failure (a GPU error, the OOM killer, a collective timeout): requeue the
    # job this many times in a row without a new checkpoint in between (each new
    # checkpoint counts afresh; launch/slurm/after_exit.py); 0: a failure ends the job
    # FAILED. SLURM only (the batch script's exit trap).
    failure_requeues: int = 2
    # On the time-out/preemption signal, save a checkpoint before asking for the requeue.
    save_on_signal: bool = True
    # How long the signal handler waits for that save (must end before SLURM's kill).
    save_timeout_s: int = 60
    # SLURM sends USR2 this many seconds before the time limit (sbatch --signal).
    signal_delay_s: int = 120
    # `submit --wait`: once SLURM says the job is over, how long a task's result file may
    # still arrive (it can lag behind the job's end on a shared file system; a task killed
    # without writing one is reported after it). Also how long a PREEMPTED or NODE_FAIL
    # state must hold before it is taken as final (a requeue passes through them).
    # A single machine (its local disk) needs little.
    result_grace_s: float = RESULT_GRACE_S
    # Shell lines run in the sbatch script before srun (module load, exports...).
    setup: list[str] = field(default_factory=list)
    # The tasks' rendezvous port (torch.distributed's MASTER_PORT on the first node). None:
    # derived from the job id (submitit), so jobs sharing a node do not collide; a
    # MASTER_PORT in the submitting shell is not used.
    master_port: int | None = None
    # Extra `#SBATCH --key=value` lines that have no field here.
    sbatch_extra: dict[str, str | int | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_requeues", "failure_requeues", "save_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"tasks_per_node: must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks > self.gpus_per_node:
            # each task drives a GPU of its own (runtime.dist.cuda_device_for_task): the
            # extra ones would fail at start-up, after the job's wait in the queue
            raise ValueError(f"tasks_per_node ({self.tasks}) must not exceed gpus_per_node "
                             f"({self.gpus_per_node}): one task per GPU")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port: must be a port 1..65535, got {self.master_port}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb: must be > 0, got {self.mem_gb}")
        if not (math.isfinite(self.result_grace_s) and self.result_grace_s >= 0):
            # an infinite grace would wait forever for a task killed without a result
            raise ValueError(f"result_grace_s: must be a finite number >= 0, got "
                             f"{self.result_grace_s}")
        if self.signal_delay_s < 1:
            raise ValueError(f"signal_delay_s: must be >= 1, got {self.signal_delay_s}")
        if self.time_min * 60 <= self.signal_delay_s + SIGNAL_EARLY_S:
            # SLURM signals once the job is within signal_delay_s of its limit (and may do
            # so up to a minute early): here that is at once, so every attempt saved and
            # requeued at its first step, counting a time-out, until max_requeues ran out
            raise ValueError(
                f"time_min (--time) {self.time_min} min ({self.time_min * 60} s) must be "
                f"longer than signal_delay_s ({self.signal_delay_s} s) + {SIGNAL_EARLY_S} s: "
                f"SLURM sends the time-limit signal signal_delay_s before the limit (up to "
                f"{SIGNAL_EARLY_S} s earlier), so the job would get it at once and requeue "
                f"without training; give a longer --time or a smaller signal_delay_s")
        if self.save_on_signal and self.save_timeout_s >= self.signal_delay_s:
            raise ValueError(f"save_timeout_s ({self.save_timeout_s}) must be below "
                             f"signal_delay_s ({self.signal_delay_s}): the save has to end "
                             "before SLURM kills the job")
        if not self.job_name.strip():
            raise ValueError("job_name: must not be empty")

    @property
    def tasks(self) -> int:
        """Tasks per node actually used: as given, else one per GPU, else one."""
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


def parse_mem_gb(text: str) -> float:
    """'64G', '500M', '1T' or a plain number of GB -> GB (what submitit's mem_gb takes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([MGT]?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"mem: expected e.g. 64G, 500M or a number of GB, got {text!r}")
    scale = {"M": 1 / 1024, "G": 1.0, "": 1.0, "T": 1024.0}[match.group(2).upper()]
    return float(match.group(1)) * scale


def resolve_profile_path(name: str) -> Path:
    """A path as given, or a profile name under configs/launch/ (``local_cpu``)."""
    path = Path(name)
    if path.is_file():
        return path
    named = PROFILE_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if named.is_file():
        return named
    known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    raise ConfigError(f"profile not found: {name} (a YAML path or one of {known})")


def load_profile(name: str | None, overrides: dict[str, object]) -> ClusterProfile:
    """The profile ``name`` (None: defaults) with command-line values (not None) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(ClusterProfile)})
    if unknown:
        raise ConfigError(f"unknown profile key(s): {unknown}")
    # the flags over the file's values, checked together: a check across keys (time_min
    # against signal_delay_s) judges what the job gets, not the file alone
    data = read_config_file(resolve_profile_path(name)) if name else {}
    return build(ClusterProfile, {**data, **given})
