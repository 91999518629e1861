"""Data pipeline throughput: decode + augment + tokenise, samples/s per DataLoader worker.

Compares, on the same local shards of real JPEGs (the digits demo rendered at 224 px) and
the same settings (random resized crop scale 0.9-1, no flip, CLIP normalisation, 77-token
context, batch 64):

- ``ours``: pretrain.data.build_loader (seeded, resumable, with bad-sample accounting)
- ``ours_no_accounting``: the same with the per-worker skip counter replaced by a no-op
  (the checks still run; only the counting and its shipping in batches is gone)
- ``open_clip``: open_clip_train.data.get_wds_dataset with its own image_transform

Prints (and with --out writes) one JSON object. Not a test.

    .venv/bin/python benchmarks/data_throughput.py --samples 3000 --workers 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import DataConfig, SourceConfig, build_loader  # noqa: E402
from pretrain.data import loader as loader_module  # noqa: E402
from pretrain.data.config import CLIP_MEAN, CLIP_STD  # noqa: E402
from pretrain.data.demo import demo_source_urls, ensure_demo_shards  # noqa: E402


class NullCounter:
    """Skip counter that counts nothing (to measure the cost of accounting)."""

    muted = False

    def skip(self, *args, **kw) -> None:
        pass

    def event(self, *args, **kw) -> None:
        pass

    def drain(self) -> list:
        return []


def _time_batches(batches, samples: int, size_of) -> dict:
    """Samples/s after the first batch (which pays worker start-up)."""
    it = iter(batches)
    first = next(it)
    n, t0 = 0, time.perf_counter()
    del first
    for batch in it:
        n += size_of(batch)
        if n >= samples:
            break
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1)}


def run_ours(urls: list[str], args, accounting: bool) -> dict:
    cfg = DataConfig(sources=[SourceConfig("digits", urls)], image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers,
                     shuffle_buffer=1000, shuffle_initial=100, context_length=77,
                     crop_scale=(0.9, 1.0), hflip=0.0, mean=CLIP_MEAN, std=CLIP_STD)
    original = loader_module.SkipCounter
    if not accounting:
        loader_module.SkipCounter = NullCounter  # workers fork after this: they inherit it
    try:
        return _time_batches(build_loader(cfg, 0, 1), args.samples,
                             lambda b: len(b["keys"]))
    finally:
        loader_module.SkipCounter = original


def run_open_clip(urls: list[str], args) -> dict:
    import open_clip

    if "pandas" not in sys.modules:
        try:
            import pandas  # noqa: F401
        except ImportError:
            # open_clip_train.data imports pandas only for its CSV dataset, which this does
            # not use; a placeholder module avoids installing pandas just for the import.
            sys.modules["pandas"] = ModuleType("pandas")
    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    # open_clip_train 3.3.0's group_by_keys_nothrow predates the end-of-shard marker ({})
    # that webdataset 1.0.2's tar_file_expander yields and fails on it with KeyError
    # 'fname'; turning the marker off restores the behaviour open_clip was written for.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)

    preprocess = open_clip.image_transform(args.image_size, is_train=True, mean=CLIP_MEAN,
                                           std=CLIP_STD)
    ns = SimpleNamespace(
        train_data="::".join(urls), val_data=None, dataset_resampled=True,
        train_data_upsampling_factors=None, train_num_samples=args.samples * 4,
        batch_size=args.batch_size, workers=args.workers, world_size=1, seed=0,
        distributed=False)
    info = oc_data.get_wds_dataset(ns, preprocess, is_train=True, epoch=0,
                           tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return _time_batches(info.dataloader, args.samples, lambda b: len(b[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                        "internimage-bench-data"))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    manifest = ensure_demo_shards(args.cache, image_size=args.image_size)
    urls = demo_source_urls(manifest, "train")
    runners = {"ours": lambda: run_ours(urls, args, accounting=True),
               "ours_no_accounting": lambda: run_ours(urls, args, accounting=False),
               "open_clip": lambda: run_open_clip(urls, args)}
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit all alike
        for name, run in runners.items():
            runs[name].append(run())
    results = {}
    for name, rs in runs.items():
        rates = sorted(r["samples_per_s"] for r in rs)
        results[name] = {"samples_per_s": rates[len(rates) // 2], "runs_samples_per_s": rates,
                         "samples_per_run": rs[0]["samples"]}
    for r in results.values():
        r["samples_per_s_per_worker"] = round(r["samples_per_s"] / max(args.workers, 1), 1)
    report = {
        "benchmark": "data_throughput", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
        "settings": {"samples": args.samples, "workers": args.workers,
                     "batch_size": args.batch_size, "image_size": args.image_size,
                     "repeats": args.repeats, "shards": len(urls),
                     "source_jpeg_px": args.image_size, "crop_scale": [0.9, 1.0],
                     "hflip": 0.0, "context_length": 77},
        "results": results,
        "accounting_overhead_pct": round(100 * (results["ours_no_accounting"]["samples_per_s"]
                                                / results["ours"]["samples_per_s"] - 1), 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
