"""What a submitted job runs: an `internimage pretrain|finetune` command line, checked.

The command is validated here, before anything is submitted (unknown flags or config
keys fail on the login node, not after hours in the queue), and pinned: an absolute
run directory (a requeued job must find its checkpoints whatever its working directory)
and ``--resume auto`` unless the user chose where to resume from.

Credentials given as overrides (``data.s3.secret=...``) never travel in the command line:
submitit pickles the job (its argv included) into the job folder, and the run records its
argv in ``slurm_jobs.jsonl``. They are replaced by ``null`` there and handed to the job
through the environment variables their consumer reads (``AWS_SECRET_ACCESS_KEY`` for
s3fs/botocore); sbatch passes the submitting environment on (its default ``--export=ALL``),
as does submitit's local executor.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from launch.config import ConfigError

JOB_COMMANDS = ("pretrain", "finetune")


@dataclass(frozen=True)
class JobSpec:
    """A checked `internimage` command line and the run directory it writes.

    ``env``: environment variables the job needs (credentials taken out of ``argv``); set
    them in the submitting process, never write them.
    """

    argv: list[str]
    run_dir: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)

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


def _parse(argv: list[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse with `internimage`'s own ``parser`` (key=value overrides may follow options)."""
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


def _secret_keys(args: argparse.Namespace) -> dict[str, str | None]:
    """Dotted credential keys of the job's config class -> their environment variables."""
    from runtime.redact import secret_keys

    if args.command == "pretrain":
        from pretrain.config import PretrainConfig

        return secret_keys(PretrainConfig)
    from launch.commands.finetune import task_entry

    return secret_keys(task_entry(args.task)[0])


def credentials_to_env(argv: list[str], keys: dict[str, str | None]) -> tuple[list[str],
                                                                             dict[str, str]]:
    """``argv`` with each credential override ``KEY=VALUE`` turned into ``KEY=null``, and the
    environment (variable -> VALUE) that gives the job the same credentials."""
    out, env = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if arg.startswith("-") or not sep or key.strip() not in keys:
            out.append(arg)
            continue
        var = keys[key.strip()]
        if var is None:
            raise ConfigError(f"submit: {key.strip()} is a credential and cannot travel in the "
                              "job's command line; put it in the --config file")
        if value.strip():
            env[var] = value
        out.append(f"{key.strip()}=null")  # unset in the job: its consumer reads ``var``
    return out, env


def job_spec(job: list[str], parser: argparse.ArgumentParser) -> JobSpec:
    """Check ``job`` (``["pretrain", ...]``, parsed by the `internimage` ``parser``) and pin
    its run directory and resume policy."""
    if not job or job[0] not in JOB_COMMANDS:
        got = job[0] if job else "nothing"
        raise ConfigError(f"submit: the job must be one of {list(JOB_COMMANDS)}, got {got!r}")
    args = _parse(job, parser)
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
    argv, env = credentials_to_env(list(job), _secret_keys(args))
    argv = with_flag(argv, "--output-dir", str(run_dir))
    if getattr(args, "resume", None) is None:
        argv += ["--resume", "auto"]
    return JobSpec(argv, run_dir, env)
