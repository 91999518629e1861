"""`internimage finetune classification|detection|segmentation`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from launch.config import (
    ConfigError,
    check_output_dir,
    config_hash,
    dump_config,
    flag_override,
    load_config,
    refuse_plan_flags,
)

log = logging.getLogger(__name__)


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="fine-tune on ImageNet / COCO / ADE20K",
                       description="Fine-tune a pre-trained InternImage downstream. With no "
                       "--config each task runs its built-in CPU demo.")
    p.add_argument("task", choices=["classification", "detection", "segmentation"])
    p.add_argument("--config", help="YAML config (configs/finetune/*.yaml); none: the demo")
    p.add_argument("--init", help="checkpoint: a pre-training run dir, its checkpoints/, "
                   "checkpoints/latest or a step_* dir, a convert output (.safetensors) or a "
                   "released .pth")
    p.add_argument("--output-dir", help="run directory (default: run.output_dir)")
    p.add_argument("--resume", help="auto | PATH of a training checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model on the meta device, print the plan")
    p.add_argument("--gpus", type=int, default=None,
                   help="with --dry-run: GPUs to plan for (default: $WORLD_SIZE, else "
                   "1, 8, 32 and 64)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --resume PATH|auto (classification also --init CKPT) "
                   "once on the validation set, no training; prints the metrics as one "
                   "JSON line")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    # key=value overrides may also follow the options (argparse leaves them as extras)
    p.set_defaults(func=run, accepts_extra=True)


def task_entry(task: str):
    """(config class, module) of fine-tuning task ``task``."""
    if task == "classification":
        from finetune import classification as mod

        return mod.ClassificationConfig, mod
    if task == "detection":
        from finetune import detection as mod

        return mod.DetectionConfig, mod
    from finetune import segmentation as mod

    return mod.SegmentationConfig, mod


def load(args: argparse.Namespace, extras: list[str] | tuple[str, ...] = ()):
    """The task's config from ``args`` (its ``--config``, the overrides and ``extras``, then
    ``--init`` and ``--output-dir``), validated: a ``ConfigError`` naming the key (a run
    directory that is a file included). Also what `internimage submit` checks before
    sbatch."""
    refuse_plan_flags(args, "gpus")
    overrides = list(args.overrides) + list(extras)
    if args.init:
        overrides.append(flag_override("init", args.init))
    if args.output_dir is not None:  # (an empty one refused below, not ignored)
        overrides.append(flag_override("run.output_dir", args.output_dir))
    try:
        cfg = load_config(task_entry(args.task)[0], args.config, overrides)
    except ValueError as err:  # __post_init__ checks name their key too (ConfigError's one)
        from launch.commands.task_configs import other_task_hint

        hint = other_task_hint(args.config, f"internimage finetune {args.task}")
        raise ConfigError(f"{err}{hint}") from None
    check_output_dir(cfg.run.output_dir,
                     "--output-dir" if args.output_dir is not None else "run.output_dir")
    return cfg


def run(args: argparse.Namespace) -> int:
    _, mod = task_entry(args.task)
    extras = list(getattr(args, "extra", []) or [])
    bad = [e for e in extras if "=" not in e or e.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognized arguments: {' '.join(bad)}")
    if args.eval_only:
        check_eval_only(args)
    cfg = load(args, extras)
    if args.dry_run:
        return dry_run(mod, cfg, args.gpus)
    if args.eval_only:
        return eval_only(args.task, cfg, args.resume)
    from finetune.engine import resume_checkpoint
    from launch.commands.refusals import end_failed_start, first_missing, signal_status
    from models import CheckpointError
    from runtime.checkpoint import stage_config
    from runtime.preemption import stop_on_signals

    out = Path(cfg.run.output_dir)
    try:
        # to know whether --init is needed; the training run resolves it again (and says
        # what a rewind abandons, once)
        resume_dir = resume_checkpoint(args.resume, out, warn=False)
    except CheckpointError as err:
        print(f"internimage finetune: {err}", file=sys.stderr)
        return 2
    train_cfg = checked_start(mod, cfg, resume_dir)
    is_main = os.environ.get("RANK", "0") == "0"
    created = first_missing(out)  # the outermost folder this start creates (None: none)
    if is_main:  # becomes config.yaml once the resume checks passed (a refusal keeps the run's)
        stage_config(out, lambda path: dump_config(cfg, path))
    log.info("finetune %s -> %s (config %s)", args.task, out, config_hash(cfg))
    try:
        with stop_on_signals():  # SIGTERM saves at the next step boundary
            result = mod.train(train_cfg, out, resume=args.resume)
    except BaseException as err:  # a refusal, an interrupt or a crash (a missing file)
        # (the task's train() has released the run directory's lock: run_lock.releasing)
        return end_failed_start(err, "finetune", out, created, is_main)
    status = signal_status(result, "finetune", out, is_main)
    if status is not None:
        return status
    # every rank's own log says what it computed; rank 0 alone prints it, as one JSON
    # line (as pretrain and --eval-only do: 512 ranks printed 512 copies before)
    log.info("finetune result on rank %d: %s", int(os.environ.get("RANK", "0")),
             json.dumps(result))
    if is_main:
        print(json.dumps(result), flush=True)
    return 0


def dry_run(mod, cfg, gpus: int | None = None) -> int:
    """``--dry-run``: ``mod``'s plan of ``cfg`` on ``gpus`` processes (None: ``WORLD_SIZE``
    when set, else a few counts), after the start's checks that read no data: ``init`` a
    checkpoint (:func:`check_init`) recording this run's backbone (the task's dry run
    checks its metadata first, no tensor read). Refusals as a start's: one line, exit 2.
    The data paths are not checked: a plan is made where the data may not be (a laptop, a
    login node); ``internimage submit`` warns about them and the start refuses them."""
    from launch.commands.pretrain import dry_run_gpus
    from models import CheckpointError

    if gpus is not None or "WORLD_SIZE" in os.environ:
        gpus = dry_run_gpus(gpus)  # refused below 1, named by its source
    check_init(cfg.init)
    try:
        return mod.dry_run(cfg, gpus)
    except CheckpointError as err:  # the init's recorded backbone, checked before building
        raise init_refusal(err) from None


def init_refusal(err: Exception) -> ConfigError:
    """The refusal of an ``init`` that this run cannot start from, as every check of it
    words it (``init: <why>``): the same line from a dry run, a start and a submit."""
    return ConfigError(f"init: {err}")


def check_eval_only(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, an ``--eval-only`` of a task that has none or
    without exactly one weight source (also what `internimage submit` checks)."""
    if args.task != "classification" and (args.init or not args.resume):
        raise ConfigError(f"--eval-only of {args.task} evaluates a {args.task} run's own "
                          "checkpoint: --resume PATH|auto (an --init is a backbone, whose "
                          "head would start fresh and score chance)")
    if bool(args.init) == bool(args.resume):
        raise ConfigError("--eval-only needs --init CKPT or --resume PATH"
                          + (", not both" if args.init else ""))


def eval_only(task: str, cfg, resume: str | None) -> int:
    """``--eval-only``: the checks of ``finetune.eval_only`` (classification) or
    ``finetune.dense_eval_only`` (a refusal: one line, exit 2), then one evaluation; rank 0
    prints its metrics as the last line, one JSON object. No run directory is created:
    the training start's checks (a fresh start over a run) and its config.yaml do not
    apply."""
    from data.shard_schedule import StorageAccessError
    from finetune.dense_eval_only import evaluate_dense_checkpoint
    from finetune.eval_only import evaluate_checkpoint
    from models import CheckpointError

    try:
        cfg, source = checked_eval(task, cfg, resume)
        result = (evaluate_checkpoint(cfg, source) if task == "classification"
                  else evaluate_dense_checkpoint(task, cfg, source))
    except (CheckpointError, StorageAccessError) as err:
        print(f"internimage finetune: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), flush=True)
    return 0


def checked_eval(task: str, cfg, resume: str | None, missing_data: str = "refuse"):
    """``(cfg, source)`` of an ``--eval-only`` once ``finetune.eval_only``'s checks passed
    (``internimage finetune`` and, on the login node, ``internimage submit``): ``cfg``
    without ``init`` when ``resume`` names the weights (a config's own init, a stage-2
    preset's, is not what is evaluated). Weights that cannot be evaluated raise a
    ``CheckpointError``; missing validation data is a ``ConfigError`` naming its key, or
    with ``missing_data="warn"`` (at submit: the compute nodes may see other data) a
    warning on stderr (``source`` is then None)."""
    if resume:
        cfg = dataclasses.replace(cfg, init=None)
    from finetune.dense_eval_only import check_dense_eval_start
    from finetune.eval_only import check_eval_start

    try:
        if task == "classification":
            return cfg, check_eval_start(cfg, resume)
        return cfg, check_dense_eval_start(task, cfg, resume,
                                           thorough=missing_data != "warn")
    except ValueError as err:  # names its key (data paths)
        if missing_data != "warn":
            raise ConfigError(str(err)) from None
        print(f"internimage submit: warning: {err}, on this machine: the job fails at its "
              "start unless its nodes see it", file=sys.stderr, flush=True)
        return cfg, None


def checked_start(mod, cfg, resume_dir: Path | None, missing_data: str = "refuse"):
    """The config a start of ``mod``'s task trains with, once every check before anything
    is built or written has passed (``internimage finetune`` and, on the login node,
    ``internimage submit``): without ``init`` when the run resumes ``resume_dir`` (the
    checkpoint holds every weight; the init source may be gone since, pre-training pruned
    that step, and a requeued job must still start), else ``init`` is a checkpoint; then
    the backbone ``init`` records and the data paths (a missing dataset root:
    ``data.root: PATH not found (expected ...)``). Refusals are a ``ConfigError`` (one
    line, no traceback). ``missing_data="warn"`` (at submit, on a login node that may not
    see the compute nodes' data, or not look into them: an ``OSError``): missing data is a
    warning on stderr instead."""
    from models import CheckpointError

    if resume_dir is not None and cfg.init:
        log.info("resuming from %s: init %s is not needed, neither checked nor loaded",
                 resume_dir, cfg.init)
        cfg = dataclasses.replace(cfg, init=None)
    else:
        check_init(cfg.init)
    try:
        # at submit, on a login node: no check that reads data files (a COCO annotation
        # file is gigabytes of memory to parse; the job's start parses it)
        mod.check_start(cfg, thorough=missing_data != "warn")
    except CheckpointError as err:
        raise init_refusal(err) from None
    except (ValueError, OSError) as err:  # a ValueError names its key (config checks)
        if missing_data == "warn":
            print(f"internimage submit: warning: {err}, on this machine: the job fails at "
                  "its start unless its nodes see it", file=sys.stderr, flush=True)
        elif isinstance(err, OSError):
            raise
        else:
            raise ConfigError(str(err)) from None
    return cfg


def check_init(init: str | None) -> None:
    """Refuse, before any compute, an ``init`` that is no checkpoint (one line naming the
    accepted forms)."""
    if not init:
        return
    from runtime.checkpoint_path import CheckpointPathError, resolve_checkpoint

    try:
        resolve_checkpoint(init)
    except CheckpointPathError as err:
        raise init_refusal(err) from None
