"""`internimage submit`: run `pretrain` or `finetune` as a SLURM job through submitit.

Resources come from a cluster profile (configs/launch/*.yaml) with flags on top; the job
runs the same command line a user would type, in every task (one per GPU), requeues
itself on time-out or preemption and resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch.config import ConfigError

# flag -> ClusterProfile field
FLAGS = {
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task", "partition": "partition", "time": "time_min",
    "account": "account", "qos": "qos", "constraint": "constraint", "exclude": "exclude",
    "job_name": "job_name", "folder": "folder", "max_requeues": "max_requeues",
    "failure_requeues": "failure_requeues", "save_on_signal": "save_on_signal",
}


def register(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="submit pretrain/finetune to SLURM (submitit), with requeue",
        description="Submit `pretrain` or `finetune` to SLURM through submitit: one task per "
        "GPU, distributed set-up from SLURM's environment, requeue on preemption and time-out "
        "with resume from the latest checkpoint. Options go before the job; everything from "
        "the job's name on is the job's own command line.")
    p.add_argument("--profile", help="cluster profile: YAML path or a name in configs/launch/")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="memory per node, e.g. 64G or 500M")
    p.add_argument("--partition")
    p.add_argument("--time", type=int, help="time limit in minutes")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--exclude", help="nodes to avoid")
    p.add_argument("--job-name")
    p.add_argument("--folder", help="submitit folder for scripts and logs (%%j: the job id)")
    p.add_argument("--max-requeues", type=int,
                   help="time-outs after which the job stops instead of requeueing "
                   "(preemptions and SLURM's own restarts are not counted)")
    p.add_argument("--failure-requeues", type=int,
                   help="requeue a job whose task failed (GPU error, OOM kill, collective "
                   "timeout) up to this many times in a row without a new checkpoint; 0: "
                   "never (SLURM only: --local runs once)")
    p.add_argument("--save-on-signal", action=argparse.BooleanOptionalAction, default=None,
                   help="checkpoint on the time-out/preemption signal before requeueing")
    p.add_argument("--wait", action="store_true",
                   help="block until the job ends; non-zero exit and log tail if it failed")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resources and the sbatch script; submit nothing")
    p.add_argument("--local", action="store_true",
                   help="run through submitit's local executor instead of SLURM (waits)")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="pretrain|finetune ...",
                   help="the job's command line")
    p.set_defaults(func=run)


def _profile(args: argparse.Namespace):
    from launch.slurm.profile import load_profile, parse_mem_gb

    given = {field: getattr(args, flag) for flag, field in FLAGS.items()}
    if args.mem is not None:
        given["mem_gb"] = parse_mem_gb(args.mem)
    return load_profile(args.profile, given)


def _print_dry_run(profile, spec) -> None:
    from launch.slurm.executor import sbatch_script

    resources = {
        "nodes": profile.nodes, "tasks_per_node": profile.tasks,
        "gpus_per_node": profile.gpus_per_node, "world_size": profile.world_size,
        "cpus_per_task": profile.cpus_per_task, "mem_gb": profile.mem_gb,
        "partition": profile.partition, "time_min": profile.time_min,
        "account": profile.account, "qos": profile.qos, "constraint": profile.constraint,
        "exclude": profile.exclude, "job_name": profile.job_name, "folder": profile.folder,
        "max_requeues": profile.max_requeues, "failure_requeues": profile.failure_requeues,
        "save_on_signal": profile.save_on_signal,
        "signal_delay_s": profile.signal_delay_s, "result_grace_s": profile.result_grace_s,
        "run_dir": str(spec.run_dir),
    }
    print("# resources")
    for key, value in resources.items():
        print(f"{key}: {value if value is not None else '-'}")
    print(f"# each task runs: internimage {' '.join(spec.argv)}")
    print("# sbatch script (not submitted)")
    print(sbatch_script(profile, spec.run_dir))


def refuse_unexported(env: dict[str, str], sbatch_extra: dict) -> None:
    """Refuse a job whose credentials (moved from its overrides into ``env``) sbatch would
    not pass on: its ``--export`` (the profile's ``sbatch_extra``, else the submitting
    shell's ``SBATCH_EXPORT``, which sbatch reads when the option is absent) is NONE or a
    list without ALL or those variables. The job would start without them and fail at its
    first read of the data, after its wait in the queue."""
    value = sbatch_extra.get("export", os.environ.get("SBATCH_EXPORT"))
    if not env or value is None:
        return
    names = {item.split("=", 1)[0].strip() for item in str(value).split(",")}
    # (a blanked variable not passed on is unset in the job all the same)
    missing = sorted({name for name, v in env.items() if v} - names)
    if "ALL" not in names and missing:
        raise ConfigError(
            f"sbatch --export={value} would not pass {', '.join(missing)} to the job (the "
            f"credentials given as overrides travel in the environment, never in a file): "
            f"export ALL or name them, or set them in the job's environment otherwise")


def _resume_note(run_dir: Path, resumes: Path) -> str:
    """What the job does with the checkpoint it resumes, said before anything is submitted:
    the same command submitted again continues the run (resuming by hand), and a new run
    needs a directory of its own (a preset's default output dir is shared by every
    submission that does not name one); a rewind names what its first save deletes."""
    from runtime.checkpoint import is_own_checkpoint, read_latest, tags_after
    from runtime.checkpoint_path import CHECKPOINTS_DIR

    root = run_dir / CHECKPOINTS_DIR
    if not is_own_checkpoint(resumes, root):  # refused if run_dir held a run
        return f"{run_dir}: the job starts a new run from {resumes}"
    note = (f"{run_dir} holds a run: the job continues it from {resumes.name}; give "
            "another --output-dir to start a new run")
    later = tags_after(root, resumes.name)
    if later and read_latest(root) != resumes.name:
        note += f" ({', '.join(later)} deleted at the job's first save)"
    return note


def run(args: argparse.Namespace) -> int:
    from launch.slurm.jobspec import job_spec

    profile = _profile(args)
    # checked against the job's world size (tasks x nodes): a resume its start would
    # refuse on that many ranks is refused now, not after its wait in the queue
    spec = job_spec(list(args.job), args.cli_parser, world_size=profile.world_size)
    if spec.resumes is not None:
        print(f"internimage submit: {_resume_note(spec.run_dir, spec.resumes)}",
              file=sys.stderr, flush=True)
    if args.dry_run:
        _print_dry_run(profile, spec)
        return 0
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from launch.slurm.executor import SlurmNotFoundError, make_executor
    from launch.slurm.job import TrainingJob
    from launch.slurm.wait import RunResults, failure, wait_for

    try:
        executor = make_executor(profile, spec.run_dir, local=args.local)
    except SlurmNotFoundError as err:
        print(f"internimage submit: {err}", file=sys.stderr)
        return 3
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not args.local:
        refuse_unexported(spec.env, profile.sbatch_extra)
    # credentials reach the job through the environment sbatch passes on, never the pickle
    os.environ.update(spec.env)
    training = TrainingJob(spec.argv, spec.run_dir, max_requeues=profile.max_requeues,
                           save_on_signal=profile.save_on_signal,
                           save_timeout_s=profile.save_timeout_s,
                           cpus_per_task=profile.cpus_per_task, entry=args.cli_entry,
                           master_port=profile.master_port)
    try:
        job = executor.submit(training)
    except (FailedJobError, FailedSubmissionError) as err:
        print(f"internimage submit: the submission failed:\n{err}", file=sys.stderr)
        return 3
    where = "local processes" if args.local else "SLURM"
    print(f"submitted job {job.job_id} to {where}: {profile.world_size} task(s), run dir "
          f"{spec.run_dir}, logs {job.paths.folder}", file=sys.stderr, flush=True)
    status = 0
    if args.wait or args.local:
        # bounded once SLURM says the job is over, even if its tasks were killed (no result)
        # through requeues: results of a run that SLURM requeued are not the job's
        results = RunResults(job)
        state = wait_for(job, grace_s=profile.result_grace_s, results=results)
        why = failure(job, state, results)
        if why:
            print(f"internimage submit: {why}", file=sys.stderr)  # names the job id
            status = 1
        else:
            print(f"job {job.job_id} completed", file=sys.stderr)
    print(job.job_id)
    return status
