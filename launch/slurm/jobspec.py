"""What a submitted job runs: an `internimage pretrain|finetune` command line, checked.

The command is validated here, before anything is submitted (unknown flags or config
keys fail on the login node, not after hours in the queue), and pinned: an absolute
run directory (a requeued job must find its checkpoints whatever its working directory)
and ``--resume auto`` unless the user chose where to resume from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from launch.config import ConfigError

JOB_COMMANDS = ("pretrain", "finetune")


@dataclass(frozen=True)
class JobSpec:
    """A checked `internimage` command line and the run directory it writes."""

    argv: list[str]
    run_dir: Path

    @property
    def command(self) -> str:
        return self.argv[0]


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with every ``flag VALUE`` / ``flag=VALUE`` replaced by one ``flag value``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            out.append(arg)
    return [*out, flag, value]


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse like `internimage` itself does (key=value overrides may follow options)."""
    from launch.cli import build_parser

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as err:  # argparse already printed why
        raise ConfigError(f"invalid `{argv[0]}` arguments: {' '.join(argv[1:])}") from err
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown:
        raise ConfigError(f"`{argv[0]}` does not accept: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
    return args


def _run_dir(args: argparse.Namespace) -> Path | None:
    if getattr(args, "output_dir", None):
        return Path(args.output_dir)
    for item in reversed(getattr(args, "overrides", [])):
        key, _, value = item.partition("=")
        if key.strip() == "run.output_dir" and value:
            return Path(value)
    if args.command == "pretrain":
        from launch.commands.pretrain import load

        return Path(load(args).run.output_dir)  # also validates the whole config
    return None


def job_spec(job: list[str]) -> JobSpec:
    """Check ``job`` (``["pretrain", ...]``) and pin its run directory and resume policy."""
    if not job or job[0] not in JOB_COMMANDS:
        got = job[0] if job else "nothing"
        raise ConfigError(f"submit: the job must be one of {list(JOB_COMMANDS)}, got {got!r}")
    args = _parse(job)
    if args.command == "pretrain":
        from launch.commands.pretrain import load

        load(args)  # fail now on a bad config, not inside the job
    if getattr(args, "dry_run", False):
        raise ConfigError(f"submit: `{job[0]} --dry-run` plans without training; run it "
                          "directly, or use `submit --dry-run` to see the sbatch script")
    run_dir = _run_dir(args)
    if run_dir is None:
        raise ConfigError(f"submit {job[0]}: give --output-dir so that a requeued job finds "
                          "its checkpoints")
    run_dir = run_dir.resolve()
    argv = with_flag(list(job), "--output-dir", str(run_dir))
    if getattr(args, "resume", None) is None:
        argv += ["--resume", "auto"]
    return JobSpec(argv, run_dir)
