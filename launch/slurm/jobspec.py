"""What a submitted job runs: an `internimage pretrain|finetune` command line, checked.

The command is validated here, before anything is submitted (unknown flags or config
keys, a ``--resume`` or ``--init`` the job would refuse fail on the login node, not after
hours in the queue), and pinned: the run directory the job's config chooses, absolute (a
requeued job must find its checkpoints whatever its working directory), and
``--resume auto`` unless the user chose where to resume from.

Credentials given as overrides never travel in the command line: submitit pickles the job
(its argv included) into the job folder, the run records its argv in ``slurm_jobs.jsonl``
and ``submit --dry-run`` prints it. Whether an override sets a credential is decided on its
parsed value, so every spelling counts: a dotted key (``data.s3.secret=...``) or a mapping
that holds one at any depth (``data.s3={key: ..., secret: ...}``, ``data={s3: {...}}``).
Each credential is replaced by ``null`` in the override and handed to the job through the
environment variable its consumer reads (``AWS_SECRET_ACCESS_KEY`` for s3fs/botocore);
sbatch passes the submitting environment on (its default ``--export=ALL``), as does
submitit's local executor.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launch.config import ConfigError, parse_overrides

JOB_COMMANDS = ("pretrain", "finetune")


@dataclass(frozen=True)
class JobSpec:
    """A checked `internimage` command line and the run directory it writes.

    ``env``: environment variables the job needs (credentials taken out of ``argv``); set
    them in the submitting process, never write them. ``resumes``: the checkpoint the job
    will continue when it starts (None: a fresh start), as resolved at submission.
    """

    argv: list[str]
    run_dir: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)
    resumes: Path | None = None

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


def _secret_keys(args: argparse.Namespace) -> dict[str, str | None]:
    """Dotted credential keys of the job's config class -> their environment variables."""
    from runtime.redact import secret_keys

    if args.command == "pretrain":
        from pretrain.config import PretrainConfig

        return secret_keys(PretrainConfig)
    from launch.commands.finetune import task_entry

    return secret_keys(task_entry(args.task)[0])


def _override_tree(arg: str) -> tuple[list[str], dict[str, Any]] | None:
    """The dotted key (split) and parsed tree of override ``arg``; None for anything that is
    no override (an option, a value the config loader refuses: it reports that itself)."""
    key, sep, _ = arg.partition("=")
    if arg.startswith("-") or not sep or not key.strip():
        return None
    try:
        return key.strip().split("."), parse_overrides([arg])
    except ConfigError:
        return None


def _lookup(tree: Any, path: list[str]) -> tuple[bool, Any]:
    """(whether ``tree`` holds ``path``, the value there)."""
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _nulled(parts: list[str], tree: dict[str, Any], found: dict[str, str | None]) -> str:
    """The override of key ``parts`` (parsed: ``tree``) rewritten with the credentials at
    the dotted keys ``found`` (-> their environment variables) set to null, checked to
    parse back to exactly that."""
    for dotted in found:
        *parents, leaf = dotted.split(".")
        _lookup(tree, parents)[1][leaf] = None
    value = _lookup(tree, parts)[1]
    key = ".".join(parts)
    if value is None:  # the key is the credential itself: as written before
        new = f"{key}=null"
    else:  # a mapping that held credentials: the rest of it, unchanged, in YAML flow style
        new = f"{key}=" + yaml.safe_dump(value, default_flow_style=True, sort_keys=False,
                                         width=2**31).strip()
    try:
        same = parse_overrides([new]) == tree
    except ConfigError:
        same = False
    if not same:  # never hand the job a config other than the one given
        where = ", ".join(f"{k} ({v})" if v else k for k, v in found.items())
        raise ConfigError(f"submit: the override of {key} holds credentials that cannot be "
                          f"taken out of the job's command line: {where}; give them through "
                          "those environment variables instead")
    return new


def credentials_to_env(argv: list[str], keys: dict[str, str | None]) -> tuple[list[str],
                                                                             dict[str, str]]:
    """``argv`` with every credential an override sets turned into ``null``, and the
    environment (variable -> value) that gives the job the same credentials.

    ``keys``: dotted credential key -> its environment variable
    (:func:`runtime.redact.secret_keys`). An override sets a credential when its parsed
    value reaches the key: ``data.s3.secret=S``, ``data.s3={secret: S}``,
    ``data={s3: {secret: S}}``. The environment holds what the job's config would have held
    with all overrides applied in order (a later override of ``data.s3`` replaces an earlier
    ``data.s3.secret``, as the config loader does).
    """
    out: list[str] = []
    final: dict[str, Any] = {}  # credential key -> the value the overrides leave it with
    for arg in argv:
        parsed = _override_tree(arg)
        if parsed is None:
            out.append(arg)
            continue
        parts, tree = parsed
        found: dict[str, str | None] = {}
        for dotted, var in keys.items():
            path = dotted.split(".")
            if path[:len(parts)] != parts:
                continue  # neither the credential nor a mapping above it
            present, value = _lookup(tree, path)
            final.pop(dotted, None)  # this override replaces whatever was set before
            if present:
                final[dotted] = value
                found[dotted] = var
        out.append(_nulled(parts, tree, found) if found else arg)
    env: dict[str, str] = {}
    for dotted, value in final.items():
        if value is None or value == "":
            continue  # unset in the job as on the command line: nothing to hand over
        if not isinstance(value, str):  # never quote the value: it is a credential
            raise ConfigError(f"submit: {dotted}: expected a string, got a "
                              f"{type(value).__name__} (value not shown: a credential; quote "
                              "it in YAML)")
        if keys[dotted] is None:
            raise ConfigError(f"submit: {dotted} is a credential and cannot travel in the "
                              "job's command line; put it in the --config file")
        env[keys[dotted]] = value  # unset in the job: its consumer reads this variable
    _no_inherited_token(env, final, keys)
    return out, env


# botocore's variables for a session token, of which it takes the first set non-empty
# (botocore.credentials.EnvProvider.TOKENS): an empty value reads as none
_SESSION_TOKENS = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def _no_inherited_token(env: dict[str, str], final: dict[str, Any],
                        keys: dict[str, str | None]) -> None:
    """Where the overrides give S3 credentials, the job's environment blanks the session
    token variables they do not set: run by hand, such a config hands s3fs what it gives
    (a key and secret alone: ``token=None``), but the job reads them from the environment,
    where botocore paired them with a session token the submitting shell exported (an SSO
    or STS session): refused by the store after the queue wait (InvalidToken,
    SignatureDoesNotMatch)."""
    for dotted, var in keys.items():
        if var not in _SESSION_TOKENS:
            continue
        group = dotted.rsplit(".", 1)[0]
        if any(d.rsplit(".", 1)[0] == group and final[d] for d in final):
            # botocore takes the first non-empty of AWS_SECURITY_TOKEN, AWS_SESSION_TOKEN:
            # both blanked but for the one given (a shell's legacy AWS_SECURITY_TOKEN
            # came before a token given as an override)
            for name in _SESSION_TOKENS:
                env.setdefault(name, "")


def _refuse_split_credentials(cfg: Any, env: dict[str, str],
                               keys: dict[str, str | None]) -> None:
    """Refuse credentials given partly in the ``--config`` file and partly as overrides:
    the overrides' travel in the environment (nulled in the job's command line), the
    file's stay in the job's config, and s3fs then got a token without its key (botocore
    ignores it and reads the environment) or a key without its secret
    (PartialCredentialsError): a job that failed after the queue wait where the same
    command run by hand worked."""
    given = {var for var, value in env.items() if value}
    if not given:
        return
    for dotted, var in keys.items():
        value: Any = cfg
        for part in dotted.split("."):
            value = getattr(value, part, None)
        if value and var not in given:
            raise ConfigError(
                f"submit: {dotted} comes from the --config file while other credentials of "
                f"it are given as overrides (value not shown): give them all one way, all "
                f"in the file or all as overrides (or in the environment: "
                f"{', '.join(sorted(v for v in keys.values() if v))})")


def _job_credentials(job: list[str], args: argparse.Namespace,
                     cfg: Any) -> tuple[list[str], dict[str, str]]:
    """The job's command line without credentials and the environment they travel in
    (:func:`credentials_to_env`), refused when split between the file and the overrides
    (:func:`_refuse_split_credentials`)."""
    keys = _secret_keys(args)
    argv, env = credentials_to_env(list(job), keys)
    _refuse_split_credentials(cfg, env, keys)
    return argv, env


def _check_resume(command: str, resume: str, run_dir: Path) -> Path | None:
    """The checkpoint the job will resume from (None: a fresh start), resolved as the job
    itself resolves ``--resume resume`` in ``run_dir``; what the job would refuse (a path
    that is no training checkpoint, a fresh start over a run) is a ``ConfigError`` with the
    job's own one-line message, raised before anything waits in the queue."""
    from models import CheckpointError

    try:
        if command == "finetune":
            from finetune.engine import resume_checkpoint

            return resume_checkpoint(resume, run_dir, warn=False)
        from runtime.checkpoint import refuse_fresh_start, resolve_resume
        from runtime.checkpoint_path import CHECKPOINTS_DIR

        # the two checks pretrain.trainer.Trainer runs on its run's checkpoints, in its
        # order; warn=False: the job resolves again and says what a rewind abandons then
        root = run_dir / CHECKPOINTS_DIR
        resume_dir = resolve_resume(resume, root, warn=False)
        refuse_fresh_start(resume_dir, root, run_dir)
        return resume_dir
    except CheckpointError as err:  # the job would stop on it, with this message
        raise ConfigError(str(err)) from None


def _finetune_hash(task: str, cfg, saved: str | None) -> str | None:
    """The model hash a fine-tuning job of ``task`` checks its checkpoint's against (None:
    detection, whose class count comes from the validation annotation file, parsed by
    the job's start only: gigabytes of memory on a login node)."""
    if task == "classification":
        from finetune.zero import model_hash

        return model_hash(cfg)
    if task == "segmentation":
        from finetune.segmentation import resume_model_hash

        return resume_model_hash(cfg, saved)
    return None


def _check_finetune_resume(task: str, cfg, resume_dir: Path, world_size: int | None) -> None:
    """Refuse, as a ``ConfigError`` with the job's own one-line message, a fine-tuning
    resume of ``resume_dir`` that the job's start would refuse (``finetune.engine.open_run``'s
    checks: the task, ZeRO layout and precision, the model hash, the world size, the
    images per step). Fine-tuning resumes on the saved world size only (``world_size``:
    the job's tasks x nodes; None: not checked). Before, only the world size was checked
    here: a changed head or class count was queued, refused at its start, and requeued as
    a failure. A trainer state that cannot be read is left to the job, whose start names
    what is wrong."""
    from finetune.engine import batch_state, check_batch
    from models import CheckpointError
    from runtime.checkpoint import check_compatible, engine_layout, load_trainer_state

    try:
        state = load_trainer_state(resume_dir)
    except CheckpointError:
        return
    if (not isinstance(state, dict) or not isinstance(state.get("world_size"), int)
            or "model_hash" not in state):
        return
    # detection and segmentation train fp32 engines (bf16 is autocast): finetune/loop.py
    precision = cfg.run.precision if task == "classification" else "fp32"
    model_hash = _finetune_hash(task, cfg, state["model_hash"]) or state["model_hash"]
    try:
        check_compatible(state, model_hash,
                         state["world_size"] if world_size is None else world_size,
                         resume_dir, engine=engine_layout(cfg.run.zero_stage, precision),
                         task=task)
        check_batch(state, batch_state(cfg.run.batch_size, cfg.run.grad_accum), resume_dir)
    except CheckpointError as err:  # the job would stop on it, with this message
        raise ConfigError(str(err)) from None


def _check_pretrain_resume(cfg, resume_dir: Path) -> None:
    """Raise :class:`ConfigError` for a pre-training resume of ``resume_dir`` that the
    job's start would refuse (``pretrain.trainer.Trainer``'s ``check_compatible``: the
    task, ZeRO layout and precision, the model/text-tower hash; any world size). Before, a
    changed model config over an existing run was queued, refused at its start, and
    requeued as a failure twice more. A state or tag vocabulary that cannot be read here
    (or the built-in demo's, written on first use) is left to the job, whose start names
    what is wrong."""
    from models import CheckpointError
    from pretrain.data.decode import TagVocab
    from pretrain.engine import model_hash
    from runtime.checkpoint import (
        PRETRAIN_TASK,
        check_compatible,
        engine_layout,
        load_trainer_state,
    )

    vocab = cfg.data.tag_vocab if cfg.data is not None else None
    if vocab is not None and vocab.startswith("builtin:"):
        return
    try:
        state = load_trainer_state(resume_dir)
        num_tags = len(TagVocab.load(vocab))
    except (CheckpointError, OSError, UnicodeError):
        return
    if not isinstance(state, dict) or "model_hash" not in state:
        return
    try:
        check_compatible(state, model_hash(cfg, num_tags), state.get("world_size", 0),
                         resume_dir, allow_resize=True,
                         engine=engine_layout(cfg.engine.zero_stage, cfg.engine.precision),
                         task=PRETRAIN_TASK)
    except CheckpointError as err:  # the job would stop on it, with this message
        raise ConfigError(str(err)) from None


def job_spec(job: list[str], parser: argparse.ArgumentParser,
             world_size: int | None = None) -> JobSpec:
    """Check ``job`` (``["pretrain", ...]``, parsed by the `internimage` ``parser``) and pin
    its run directory and resume policy. ``world_size``: the job's number of tasks, against
    which the checkpoint it will resume is checked (None: not checked)."""
    if not job or job[0] not in JOB_COMMANDS:
        got = job[0] if job else "nothing"
        raise ConfigError(f"submit: the job must be one of {list(JOB_COMMANDS)}, got {got!r}")
    args = _parse(job, parser)
    # fail now on a bad config, not inside the job after its wait in the queue
    if args.command == "pretrain":
        from launch.commands.pretrain import load
    else:
        from launch.commands.finetune import load
    cfg = load(args)
    if getattr(args, "dry_run", False):
        raise ConfigError(f"submit: `{job[0]} --dry-run` plans without training; run it "
                          "directly, or use `submit --dry-run` to see the sbatch script")
    # the run dir the job's own loader chooses (flag, override, --config or the default)
    run_dir = Path(cfg.run.output_dir).resolve()
    if getattr(args, "eval_only", False):
        # one evaluation of the weights it names: no --resume auto, and no fresh-start
        # refusal (it starts no run over the one in run_dir); weights it cannot evaluate
        # are refused now, not after the job's wait in the queue
        from launch.commands.finetune import check_eval_only, checked_eval
        from models import CheckpointError

        check_eval_only(args)
        try:
            checked_eval(args.task, cfg, args.resume, missing_data="warn")
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
        argv, env = _job_credentials(job, args, cfg)
        return JobSpec(with_flag(argv, "--output-dir", str(run_dir)), run_dir, env)
    # the job runs with --resume auto unless one was given (appended below); an empty
    # --resume stays as given: the job then starts afresh, or refuses to over a run
    resume = "auto" if args.resume is None else args.resume
    resume_dir = _check_resume(args.command, resume, run_dir)
    if args.command == "finetune" and resume_dir is not None:
        _check_finetune_resume(args.task, cfg, resume_dir, world_size)
    if args.command == "pretrain" and resume_dir is not None:
        _check_pretrain_resume(cfg, resume_dir)
    if args.command == "finetune":  # the job's own start checks (a resumed job's: no init)
        from launch.commands.finetune import checked_start, task_entry

        checked_start(task_entry(args.task)[1], cfg, resume_dir, missing_data="warn")
    argv, env = _job_credentials(job, args, cfg)
    argv = with_flag(argv, "--output-dir", str(run_dir))
    if args.resume is None:
        argv += ["--resume", "auto"]
    return JobSpec(argv, run_dir, env, resume_dir)
