"""Does M3I's image branch help? Pre-train the demo model on the built-in digits with the
image branch on or off (same steps, same everything else), then report a linear probe of
the frozen image tower (logistic regression on pooled features, train split -> val split)
and the zero-shot top-1. One run per call; prints JSON. CPU, one process, ZeRO stage 0.

    python benchmarks/m3i_probe.py --image-weight 0 --steps 200 --out /tmp/probe_off
    python benchmarks/m3i_probe.py --image-weight 1 --steps 200 --out /tmp/probe_on
    python benchmarks/m3i_probe.py --image-weight 1 --image-loss cosine \
        --decorrelation-weight 0.1 --steps 200 --out /tmp/probe_cosine
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _features(model, urls: list[str], zero_shot, data, device
              ) -> tuple[np.ndarray, np.ndarray]:
    from dataclasses import replace

    from pretrain.data.decode import ImageTransform
    from pretrain.zeroshot import decode_batch, read_share

    # the demo's held-out config with other shards: its class names bound the labels kept
    share = read_share(replace(zero_shot, urls=urls, max_batches=0), data, 0, 1)
    transform = ImageTransform(data.image_size, train=False, mean=data.mean, std=data.std)
    feats, labels = [], []
    with torch.no_grad():
        for samples in share.batches:
            batch = decode_batch(samples, transform)
            if batch is None:
                continue
            feats.append(model.visual.forward_pooled(batch[0].to(device)).float().cpu())
            labels.append(batch[1])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-weight", type=float, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--image-loss", default="unigrad", help="objective.image.loss")
    parser.add_argument("--decorrelation-weight", type=float, default=0.02)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.demo import resolve_builtin
    from pretrain.trainer import Trainer

    overrides = [f"objective.image.weight={args.image_weight}",
                 f"objective.image.loss={args.image_loss}",
                 f"objective.image.decorrelation_weight={args.decorrelation_weight}",
                 f"data.image_size={args.image_size}", f"run.max_steps={args.steps}",
                 f"run.output_dir={args.out}", "run.checkpoint_every=0",
                 "run.progress=false", "run.tensorboard=false", "engine.zero_stage=0",
                 "zero_shot.every=0", "objective.image.decoder_width=64",
                 "objective.image.decoder_heads=4", "objective.image.decoder_depth=2",
                 # the eager op: "auto" compiles the CPU op for the teacher's larger batch
                 "model.dcn_backend=reference"]
    cfg = resolve_builtin(load_config(PretrainConfig, DEMO_CONFIG, overrides))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    final = trainer.fit()
    seconds = time.perf_counter() - start
    model = trainer.engine.module.eval()
    train_urls = cfg.data.sources[0].urls
    train_urls = train_urls if isinstance(train_urls, list) else [train_urls]
    x_train, y_train = _features(model, train_urls, cfg.zero_shot, cfg.data,
                                 trainer.info.device)
    x_val, y_val = _features(model, cfg.zero_shot.urls, cfg.zero_shot, cfg.data,
                             trainer.info.device)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=3000).fit(scaler.transform(x_train), y_train)
    print(json.dumps({
        "image_weight": args.image_weight, "image_loss": args.image_loss,
        "decorrelation_weight": args.decorrelation_weight, "steps": args.steps,
        "image_size": args.image_size,
        "train_seconds": round(seconds, 1), "probe_train": len(y_train), "probe_val": len(y_val),
        "linear_probe_top1": float(probe.score(scaler.transform(x_val), y_val)),
        "zero_shot_top1": final.get("zero_shot_top1"),
        "final_loss_terms": {k: v for k, v in final.items() if k.startswith("loss")},
    }))


if __name__ == "__main__":
    main()
