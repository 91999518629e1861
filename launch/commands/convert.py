"""`internimage convert SRC DST`: ZeRO checkpoint (any task's run) -> safetensors / released
layout."""

from __future__ import annotations

import argparse
import signal
import sys


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="convert a checkpoint for fine-tuning",
                       description="Consolidate a DeepSpeed ZeRO checkpoint (a pre-training "
                       "or fine-tuning run dir, its checkpoints/ dir, checkpoints/latest or a "
                       "step_* dir), a consolidated .safetensors file or a released .pth into "
                       "one safetensors "
                       "file (backbone under the released keys, pre-training heads under "
                       "pretrain.*, a detection/segmentation run's head under task.<task>.*) "
                       "or the released .pth layout (backbone only).")
    p.add_argument("src", help="run dir (pre-training or fine-tuning) | RUN/checkpoints | "
                   "RUN/checkpoints/latest | step_* dir | .pth | .safetensors")
    p.add_argument("dst")
    p.add_argument("--format", choices=["safetensors", "official"], default="safetensors")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--weights", choices=["model", "ema"], default="model",
                   help="ema: a classification run's EMA weights (the checkpoint's ema.pt, "
                   "what top1_ema evaluated; checkpoints/best_ema.json names its best)")
    p.set_defaults(func=run)


def _exit_on_sigterm(signum, frame) -> None:
    # scancel and a SLURM time limit send SIGTERM, whose default ends the process at once:
    # as SystemExit the export's cleanup runs (its half-written temporary file goes)
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from finetune.convert import convert
    from models import CheckpointError

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = convert(args.src, args.dst, fmt=args.format, dtype=args.dtype,
                         weights=args.weights)
    except CheckpointError as err:
        print(f"internimage convert: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report)
    return 0
