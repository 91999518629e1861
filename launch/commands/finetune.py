"""`internimage finetune classification|detection|segmentation`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from launch.config import ConfigError, config_hash, dump_config, load_config

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


def run(args: argparse.Namespace) -> int:
    cls, mod = task_entry(args.task)
    extras = list(getattr(args, "extra", []) or [])
    bad = [e for e in extras if "=" not in e or e.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognized arguments: {' '.join(bad)}")
    overrides = list(args.overrides) + extras
    if args.init:
        overrides.append(f"init={args.init}")
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        cfg = load_config(cls, args.config, overrides)
    except ValueError as err:  # __post_init__ checks name their key too
        raise ConfigError(str(err)) from None
    if cfg.init:  # before any compute: one line naming the accepted forms
        from runtime.checkpoint_path import CheckpointPathError, resolve_checkpoint

        try:
            resolve_checkpoint(cfg.init)
        except CheckpointPathError as err:
            raise ConfigError(f"init: {err}") from None
    if args.dry_run:
        return mod.dry_run(cfg)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    log.info("finetune %s -> %s (config %s)", args.task, out, config_hash(cfg))
    from models import CheckpointError

    try:
        result = mod.train(cfg, out, resume=args.resume)
    except CheckpointError as err:
        print(f"internimage finetune: {err}", file=sys.stderr)
        return 2
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0
