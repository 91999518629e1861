"""`internimage pretrain`: the main job (DeepSpeed ZeRO-3, M3I-style objectives)."""

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
    dump_config,
    flag_override,
    load_config,
    parse_overrides,
    refuse_plan_flags,
)

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"


def register(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="pre-train InternImage (no config: the CPU demo)",
        description="Pre-train InternImage with DeepSpeed ZeRO-3 on streamed webdataset "
        "shards. With no --config it runs the built-in CPU demo (configs/pretrain/demo.yaml).")
    p.add_argument("--config", help="YAML config (configs/pretrain/*.yaml); default: the demo")
    p.add_argument("--output-dir", help="run directory (run.output_dir)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="run N optimizer steps: sets run.max_steps=N and run.epochs=0, so it "
                   "wins over an epoch plan of the config (a smoke test of a preset); the "
                   "key run.max_steps alone is refused with run.epochs > 0")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--resume", help="auto (latest checkpoint of the run, if any) | PATH")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model on the meta device, print the plan; reads "
                   "no shards (an unreadable tag vocabulary is a warning here, refused by a "
                   "start)")
    p.add_argument("--gpus", type=int, default=None,
                   help="with --dry-run: GPUs to plan for (default: $WORLD_SIZE or 8)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="with --dry-run: GPUs per node (default 8; as `internimage estimate`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=run)


def load(args: argparse.Namespace, missing_data: str = "warn",
         warn_as: str = "internimage submit"):
    """The resolved PretrainConfig of these arguments (flags win over key=value); a run
    directory that is a file is refused here (also what `internimage submit` checks).

    ``--max-steps N`` runs N steps: it sets ``run.epochs=0`` too (logged when that drops an
    epoch plan); ``run.max_steps`` given as an override to an epoch run (``run.epochs > 0``,
    where it is not used) is refused. A tag vocabulary this machine cannot read
    (``pretrain.config.check_tag_vocab``) is refused with ``missing_data="refuse"`` (the
    command's own start), else (``"warn"``: `internimage submit` on a login node, which
    may not see the compute nodes' files, and the dry run, a plan made where the data may
    not be) a warning on stderr, prefixed ``warn_as``."""
    from pretrain.config import PretrainConfig, check_tag_vocab

    refuse_plan_flags(args, "gpus", "gpus_per_node")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: must be >= 1, got {args.max_steps}")
    overrides = list(args.overrides)
    for flag, key in (("output_dir", "run.output_dir"), ("max_steps", "run.max_steps"),
                      ("checkpoint_every", "run.checkpoint_every")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(flag_override(key, value))
    try:
        cfg = load_config(PretrainConfig, args.config or DEMO_CONFIG, overrides)
    except ValueError as err:  # (ConfigError's one) another task's preset: said so
        from launch.commands.task_configs import other_task_hint

        raise ConfigError(f"{err}{other_task_hint(args.config, 'internimage pretrain')}"
                          ) from None
    if args.max_steps is not None and cfg.run.epochs > 0:
        # the trainer runs max_steps only without an epoch plan: the flag took none and a
        # smoke test of the H preset planned its 30 epochs
        if os.environ.get("RANK", "0") == "0":
            log.info("--max-steps %d: the run is %d optimizer steps, not the config's epoch "
                     "plan (run.epochs=%g, set to 0)", args.max_steps, args.max_steps,
                     cfg.run.epochs)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, epochs=0.0))
    elif cfg.run.epochs > 0 and _overrides_max_steps(args.overrides):
        raise ConfigError(f"run.max_steps: not used by an epoch run (run.epochs="
                          f"{cfg.run.epochs:g}); give --max-steps N to run N steps (it sets "
                          f"run.epochs=0), or run.epochs=0 too")
    if cfg.data is None:
        raise ConfigError("data: no data sources configured (the demo config has them)")
    check_output_dir(cfg.run.output_dir,
                     "--output-dir" if args.output_dir is not None else "run.output_dir")
    try:
        check_tag_vocab(cfg.data, cfg.objective.tag_weight)
    except ValueError as err:
        if missing_data != "warn":
            raise ConfigError(str(err)) from None
        print(f"{warn_as}: warning: {err} (on this machine: a start fails unless the "
              "machine it runs on sees it)", file=sys.stderr, flush=True)
    return cfg


def _overrides_max_steps(overrides: list[str]) -> bool:
    """Whether the key=value ``overrides`` set ``run.max_steps`` (``run.max_steps=N``, or
    ``run={max_steps: N}``)."""
    run = parse_overrides(overrides).get("run")
    return isinstance(run, dict) and "max_steps" in run


def dry_run_gpus(gpus: int | None) -> int:
    """The GPU count a dry run plans for: ``--gpus``, else ``WORLD_SIZE``, else 8; refused
    below 1 (``--gpus 0`` planned for 8, a negative count printed a negative batch,
    ``WORLD_SIZE=0`` divided by zero)."""
    if gpus is not None:
        if gpus < 1:
            raise ConfigError(f"--gpus {gpus}: must be >= 1")
        return gpus
    from runtime.dist import launcher_world_size

    try:
        return launcher_world_size() or 8
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    # a dry run plans without reading data (the README's H plan, on a laptop or a login
    # node): an unreadable tag vocabulary is a warning there; the start refuses it
    cfg = load(args, missing_data="warn" if args.dry_run else "refuse",
               warn_as="internimage pretrain")
    if args.dry_run:
        from pretrain.plan import plan

        gpus = dry_run_gpus(args.gpus)
        per_node = 8 if args.gpus_per_node is None else args.gpus_per_node
        if per_node < 1:
            raise ConfigError(f"--gpus-per-node: must be >= 1, got {per_node}")
        try:
            result = plan(cfg, gpus, per_node)
        except ValueError as err:  # GPUs that fill no whole nodes (names the flags)
            raise ConfigError(str(err)) from None
        print(json.dumps(result, indent=2))
        from pretrain.engine import warmup_warning

        warning = warmup_warning(cfg.optim.warmup_steps, result["steps"])
        if warning:
            print(f"internimage pretrain: warning: {warning}", file=sys.stderr)
        return 0
    from launch.commands.refusals import end_failed_start, first_missing, signal_status
    from pretrain.demo import resolve_builtin
    from pretrain.trainer import pretrain
    from runtime.checkpoint import stage_config
    from runtime.checkpoint_path import CHECKPOINTS_DIR
    from runtime.preemption import stop_on_signals

    cfg = resolve_builtin(cfg)
    run_dir = Path(cfg.run.output_dir)
    is_main = os.environ.get("RANK", "0") == "0"
    created = first_missing(run_dir)  # the outermost folder this start creates (None: none)
    if is_main:  # becomes config.yaml once the resume checks passed (a refusal keeps the run's)
        stage_config(run_dir, lambda path: dump_config(cfg, path))
    try:
        with stop_on_signals():  # SIGTERM saves at the next step boundary
            final = pretrain(cfg, resume=args.resume)  # (its run lock released at the end)
    except BaseException as err:  # a refusal, an interrupt or a crash: as finetune's
        return end_failed_start(err, "pretrain", run_dir, created, is_main)
    status = signal_status(final, "pretrain", run_dir, is_main)
    if status is not None:
        return status
    if is_main:
        print(json.dumps({"final": final, "run_dir": str(Path(cfg.run.output_dir).resolve()),
                          "metrics": str(Path(cfg.run.output_dir, "metrics.jsonl").resolve()),
                          "checkpoints": str(Path(cfg.run.output_dir, CHECKPOINTS_DIR).resolve())}))
    return 0
