"""Pre-training step time and memory per rank, activations and model states separately.

Synthetic batches (no data pipeline) through the real engine: M3I model, our AdamW groups,
DeepSpeed with the chosen ZeRO stage and precision. Run alone or under torchrun:

    python benchmarks/train_step.py --tiny --batch 16 --image-size 32          # CPU
    torchrun --nproc-per-node 8 benchmarks/train_step.py --model internimage_h \\
        --image-size 640 --batch 16 --zero 3 --precision bf16                   # GPUs

"model_states" is memory held between steps (parameter, gradient and optimizer
partitions); "activations" is the peak during a step above that (activations plus
parameters gathered on the fly). On CUDA both come from the caching allocator; on CPU from
the process's resident size (coarse). Prints one JSON line per rank.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from pretrain.config import EngineConfig, ModelConfig, PretrainConfig, TextConfig  # noqa: E402
from pretrain.data import DataConfig, SourceConfig  # noqa: E402
from pretrain.engine import DTYPES, build_engine, build_model  # noqa: E402
from pretrain.objectives import M3ILoss  # noqa: E402
from runtime.dist import init_distributed  # noqa: E402

GIB = 2**30


def _config(args: argparse.Namespace) -> PretrainConfig:
    tiny = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8]) if args.tiny else {}
    model = ModelConfig(name=args.model, with_cp=args.with_cp, embed_dim=args.embed_dim,
                        dcn_backend=args.backend, **tiny)
    text = TextConfig(width=64, heads=4, layers=2) if args.tiny else TextConfig()
    data = DataConfig(sources=[SourceConfig(name="synthetic", urls="unused.tar")],
                      image_size=args.image_size, batch_size=args.batch, context_length=77)
    engine = EngineConfig(zero_stage=args.zero, precision=args.precision,
                          offload_optimizer=args.offload)
    return PretrainConfig(model=model, text=text, data=data, engine=engine)


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="internimage_t")
    p.add_argument("--tiny", action="store_true", help="demo widths (channels 16, depths 1,1,2,1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--with-cp", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--backend", default="auto", help="DCNv3 backend")
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    cfg = _config(args)
    info = init_distributed()
    engine, _ = build_engine(cfg, build_model(cfg, num_tags=16), steps=1000)
    loss_fn = M3ILoss()
    dtype = DTYPES[cfg.engine.precision]
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=info.device,
                         dtype=dtype)
    tokens = torch.randint(1, 49000, (args.batch, 77), device=info.device)
    tags = torch.zeros(args.batch, 16, device=info.device)
    tags[:, 0] = 1
    has = torch.ones(args.batch, dtype=torch.bool, device=info.device)

    def step() -> None:
        image, text, tag_emb, scale = engine(images, tokens)
        loss, _ = loss_fn(image.float(), text.float(), tag_emb.float(), scale.float(), has,
                          tags, has)
        engine.backward(loss)
        engine.step()

    step()  # warm-up: optimizer states are created lazily at the first step
    if info.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(info.device)
    states = _memory_now(info.device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = _memory_peak(info.device)
    print(json.dumps({
        "rank": info.rank, "world_size": info.world_size, "device": str(info.device),
        "model": args.model + ("(tiny)" if args.tiny else ""), "batch_per_rank": args.batch,
        "image_size": args.image_size, "zero_stage": args.zero, "precision": args.precision,
        "activation_checkpointing": cfg.model.checkpointing(),
        "step_s_median": round(statistics.median(times), 4),
        "images_per_s_per_rank": round(args.batch / statistics.median(times), 2),
        "model_states_gib": round(states / GIB, 3),
        "activations_gib": round(max(peak - states, 0) / GIB, 3),
        "peak_gib": round(peak / GIB, 3),
        "memory_source": "cuda allocator" if info.device.type == "cuda" else "process RSS",
    }), flush=True)


if __name__ == "__main__":
    main()
