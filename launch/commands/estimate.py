"""`internimage estimate`: parameters and per-GPU memory of a model under ZeRO."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_SIZE = {"internimage_l": 384, "internimage_xl": 384, "internimage_h": 640}


def register(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="estimate parameters and per-GPU memory",
        description="Build the model on the meta device (instant, no memory) and print its "
        "parameters, DeepSpeed's ZeRO model-state estimate per GPU, a measured "
        "activation-memory estimate, ZeRO-3's reduce bucket and gathered parameters "
        "(DeepSpeed's defaults), and the peak a rank holds while the model is built.")
    p.add_argument("--model", required=True, help="internimage_t|s|b|l|xl|h or a released name")
    p.add_argument("--gpus", type=int, default=8, help="total GPUs (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage")
    p.add_argument("--image-size", type=int, help="default: the variant's released resolution")
    p.add_argument("--batch", type=int, default=16, help="images per GPU (default 16)")
    p.add_argument("--offload", action="store_true", help="ZeRO CPU offload of optimizer+params")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="estimate without activation checkpointing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _table(est) -> str:
    gib = 1024**3
    rows = [
        ("model", est.model),
        ("parameters", f"{est.params:,}"),
        ("largest layer parameters", f"{est.largest_layer_params:,}"),
        ("GPUs (per node)", f"{est.gpus} ({est.gpus_per_node})"),
        ("ZeRO stage / CPU offload", f"{est.zero_stage} / {'yes' if est.offload else 'no'}"),
        ("image size / batch per GPU", f"{est.image_size} / {est.batch_per_gpu}"),
        ("activation checkpointing", "yes" if est.activation_checkpointing else "no"),
        ("model states per GPU (DeepSpeed)", f"{est.model_states_per_gpu / gib:.2f} GiB"),
        ("model states CPU per node", f"{est.model_states_cpu_per_node / gib:.2f} GiB"),
        (f"activations per GPU ({est.dtype})", f"{est.activations_per_gpu / gib:.2f} GiB"),
        ("  without checkpointing",
         f"{est.activations_per_gpu_without_checkpointing / gib:.2f} GiB"),
        ("ZeRO reduce buckets per GPU", f"{est.reduce_bucket_per_gpu / gib:.2f} GiB"),
        ("ZeRO-3 gathered parameters per GPU", f"{est.live_parameters_per_gpu / gib:.2f} GiB"),
        ("total per GPU", f"{est.total_per_gpu / gib:.2f} GiB"),
        ("model build per rank (zero.Init: " + ("yes)" if est.zero_init else "no)"),
         f"{est.model_build_per_rank / gib:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from models import resolve_variant
    from pretrain.estimate import check_whole_nodes, estimate

    try:
        variant = resolve_variant(args.model)
    except ValueError as err:
        print(f"internimage estimate: {err}", file=sys.stderr)
        return 2
    for name in ("gpus", "gpus_per_node", "batch", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"internimage estimate: --{name.replace('_', '-')} must be >= 1, got {value}",
                  file=sys.stderr)
            return 2
    if args.offload and args.zero == 0:
        print("internimage estimate: --offload needs --zero 1, 2 or 3 (DeepSpeed's CPU Adam "
              "steps host parameters, which stage 0 keeps on the GPU)", file=sys.stderr)
        return 2
    try:
        check_whole_nodes(args.gpus, args.gpus_per_node)
    except ValueError as err:
        print(f"internimage estimate: {err}", file=sys.stderr)
        return 2
    size = args.image_size or DEFAULT_SIZE.get(variant, 224)
    est = estimate(variant, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                   zero_stage=args.zero, image_size=size,
                   batch_per_gpu=args.batch, offload=args.offload,
                   activation_checkpointing=not args.no_checkpointing)
    print(json.dumps(est.as_dict(), indent=2) if args.json else _table(est))
    return 0
