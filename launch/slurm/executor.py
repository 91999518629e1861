"""submitit executors from a cluster profile, and the sbatch script they would submit.

The same profile drives the SLURM executor (sbatch + srun, one task per GPU) and
submitit's local executor (`--local`: the tasks as local processes, no scheduler).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmExecutor

from launch.slurm.after_exit import trap_lines
from launch.slurm.profile import ClusterProfile


class SlurmNotFoundError(RuntimeError):
    """No SLURM client (sbatch/srun) on PATH."""


def slurm_available() -> bool:
    """Whether this machine can submit to SLURM (submitit needs both commands)."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


def executor_parameters(profile: ClusterProfile, run_dir: Path) -> dict[str, Any]:
    """AutoExecutor parameters: generic ones, plus ``slurm_*`` ones SLURM alone reads
    (``run_dir``: the job's run directory, where the script's exit trap records)."""
    params: dict[str, Any] = {
        "name": profile.job_name,
        "nodes": profile.nodes,
        "tasks_per_node": profile.tasks,
        "gpus_per_node": profile.gpus_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "timeout_min": profile.time_min,
        "slurm_signal_delay_s": profile.signal_delay_s,
        # srun ends the other tasks as soon as one exits non-zero: without it they wait on
        # the dead rank in a collective until its timeout, holding the allocation. A clean
        # stop is not cut short: after a requeue rank 0 exits non-zero (submitit), but the
        # requeue it has already asked for ends every task anyway.
        # And the tasks' CPUs again: from Slurm 22.05 until 23.11 srun no longer inherits
        # sbatch's --cpus-per-task (22.05 release notes: "srun will no longer read in
        # SLURM_CPUS_PER_TASK"), so each task was bound to one CPU while its OpenMP
        # threads and data workers counted on cpus_per_task. Harmless on other versions.
        "slurm_srun_args": ["--kill-on-bad-exit=1",
                            f"--cpus-per-task={profile.cpus_per_task}"],
    }
    if profile.mem_gb is not None:
        params["mem_gb"] = profile.mem_gb
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        value = getattr(profile, key)
        if value:
            params[f"slurm_{key}"] = value
    # after the profile's own lines: the trap's python is the one the tasks run
    setup = [*profile.setup, *trap_lines(sys.executable, run_dir, profile.failure_requeues)]
    if setup:
        params["slurm_setup"] = setup
    params["slurm_additional_parameters"] = _with_requeue(profile.sbatch_extra)
    return params


def _with_requeue(sbatch_extra: dict[str, Any]) -> dict[str, Any]:
    """The profile's extra sbatch options with ``--requeue`` (or ``--no-requeue`` where the
    profile says so: ``requeue: false`` or ``no_requeue: true``). Requeueable by default,
    whatever the site's JobRequeue: the signal's and the exit trap's `scontrol requeue`,
    and SLURM's own requeue of a job on a failed node, need it. (submitit writes a bare
    flag for True only: ``requeue: false`` would become ``--requeue=False``.)"""
    extra = dict(sbatch_extra)
    wants = True
    for key in ("requeue", "no_requeue", "no-requeue"):
        if key in extra:
            wants = bool(extra.pop(key)) == (key == "requeue")
    extra["requeue" if wants else "no_requeue"] = True
    return extra


def make_executor(profile: ClusterProfile, run_dir: Path,
                  local: bool = False) -> submitit.AutoExecutor:
    """The executor that submits with this profile (SLURM, or local processes) a job
    whose run directory is ``run_dir``."""
    folder = Path(profile.folder).expanduser().absolute()
    if local:
        # the same time-out allowance as on SLURM (submitit's local default is 3)
        executor = submitit.AutoExecutor(folder=folder, cluster="local",
                                         local_max_num_timeout=profile.max_requeues)
        params = {k: v for k, v in executor_parameters(profile, run_dir).items()
                  if not k.startswith("slurm_")}
        if profile.nodes != 1:
            raise ValueError("--local runs on this machine only: use --nodes 1")
        executor.update_parameters(**params)
        return executor
    if not slurm_available():
        raise SlurmNotFoundError(
            "SLURM is not installed here (`sbatch`/`srun` not found on PATH): cannot submit. "
            "Run on a SLURM login node, use `--local` to run the same job as local "
            "processes through submitit, or `--dry-run` to see the sbatch script.")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=profile.max_requeues)
    executor.update_parameters(**executor_parameters(profile, run_dir))
    return executor


class _RenderingSlurmExecutor(SlurmExecutor):
    """submitit's SLURM executor, allowed where SLURM is absent: it only renders scripts."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def sbatch_script(profile: ClusterProfile, run_dir: Path) -> str:
    """The sbatch script submitit would submit for this profile and a job whose run
    directory is ``run_dir`` (nothing is submitted).

    The job id in paths stays the literal ``%j`` that SLURM fills in.
    """
    folder = Path(profile.folder).expanduser().absolute()
    executor = _RenderingSlurmExecutor(folder, max_num_timeout=profile.max_requeues)
    generic, specific = {}, {}
    for key, value in executor_parameters(profile, run_dir).items():
        if key.startswith("slurm_"):
            specific[key[len("slurm_"):]] = value
        else:
            generic[key] = value
    # the same translation AutoExecutor applies (timeout_min -> time, mem_gb -> mem, ...)
    executor.update_parameters(**executor._convert_parameters(generic), **specific)
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")
