"""`internimage pretrain`: the main job (DeepSpeed ZeRO-3, M3I-style objectives)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from launch.config import check_output_dir, dump_config, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo.yaml"


def register(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="pre-train InternImage (no config: the CPU demo)",
        description="Pre-train InternImage with DeepSpeed ZeRO-3 on streamed webdataset "
        "shards. With no --config it runs the built-in CPU demo (configs/pretrain/demo.yaml).")
    p.add_argument("--config", help="YAML config (configs/pretrain/*.yaml); default: the demo")
    p.add_argument("--output-dir", help="run directory (run.output_dir)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (run.max_steps)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--resume", help="auto (latest checkpoint of the run, if any) | PATH")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model on the meta device, print the plan; no data")
    p.add_argument("--gpus", type=int, default=None,
                   help="with --dry-run: GPUs to plan for (default: $WORLD_SIZE or 8)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=run)


def load(args: argparse.Namespace):
    """The resolved PretrainConfig of these arguments (flags win over key=value); a run
    directory that is a file is refused here (also what `internimage submit` checks)."""
    from pretrain.config import PretrainConfig

    overrides = list(args.overrides)
    for flag, key in (("output_dir", "run.output_dir"), ("max_steps", "run.max_steps"),
                      ("checkpoint_every", "run.checkpoint_every")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(PretrainConfig, args.config or DEMO_CONFIG, overrides)
    if cfg.data is None:
        from launch.config import ConfigError

        raise ConfigError("data: no data sources configured (the demo config has them)")
    check_output_dir(cfg.run.output_dir,
                     "--output-dir" if args.output_dir is not None else "run.output_dir")
    return cfg


def dry_run_gpus(gpus: int | None) -> int:
    """The GPU count a dry run plans for: ``--gpus``, else ``WORLD_SIZE``, else 8; refused
    below 1 (``--gpus 0`` planned for 8, a negative count printed a negative batch,
    ``WORLD_SIZE=0`` divided by zero)."""
    from launch.config import ConfigError

    if gpus is None:
        value = os.environ.get("WORLD_SIZE", "8")
        try:
            gpus = int(value)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE={value!r}: not a GPU count") from None
        source = f"WORLD_SIZE={gpus}"
    else:
        source = f"--gpus {gpus}"
    if gpus < 1:
        raise ConfigError(f"{source}: must be >= 1")
    return gpus


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    if args.dry_run:
        from pretrain.plan import plan

        print(json.dumps(plan(cfg, dry_run_gpus(args.gpus)), indent=2))
        return 0
    from launch.commands.refusals import refusal_line, training_refusals
    from pretrain.demo import resolve_builtin
    from pretrain.trainer import pretrain
    from runtime.checkpoint import discard_config, stage_config
    from runtime.checkpoint_path import CHECKPOINTS_DIR

    cfg = resolve_builtin(cfg)
    run_dir = Path(cfg.run.output_dir)
    is_main = os.environ.get("RANK", "0") == "0"
    if is_main:  # becomes config.yaml once the resume checks passed (a refusal keeps the run's)
        stage_config(run_dir, lambda path: dump_config(cfg, path))
    try:
        final = pretrain(cfg, resume=args.resume)
    except BaseException as err:
        # whatever ended the start, a refusal or a crash: rank 0's staged config goes
        # (this process's own file; nothing once published)
        if is_main:
            discard_config(run_dir)
        if not isinstance(err, training_refusals()):
            raise
        # one line, exit 2, as finetune
        print(f"internimage pretrain: {refusal_line(err)}", file=sys.stderr)
        return 2
    if is_main:
        print(json.dumps({"final": final, "run_dir": str(Path(cfg.run.output_dir).resolve()),
                          "metrics": str(Path(cfg.run.output_dir, "metrics.jsonl").resolve()),
                          "checkpoints": str(Path(cfg.run.output_dir, CHECKPOINTS_DIR).resolve())}))
    return 0
