"""Data pipeline throughput: decode + augment + tokenise, samples/s per DataLoader worker.

A fair comparison with open_clip's webdataset pipeline (open_clip_train 3.3.0,
``src/open_clip_train/data.py``: ``get_wds_dataset``, used as installed) on the same local
shards of photo-like JPEGs (sizes 400x300 to 1024x768, 25-100 KB, synthesised with PIL from
gradients, blobs and noise; cached under --cache) and the same settings: open_clip's
training transform (``open_clip.image_transform``: random resized crop, scale 0.9-1,
bicubic, no flip, CLIP normalisation), 77-token context, batch 64, and open_clip's sample
shuffle buffer (``_SAMPLE_SHUFFLE_SIZE``, 5,000) as ours, at 1 and 2 workers:

- ``ours``: pretrain.data.build_loader (seeded, resumable, bad-sample accounting, shard
  prefetch, JPEG draft decoding)
- ``ours_no_draft``: the same decoding every JPEG at full size (what open_clip does)
- ``open_clip``: open_clip_train.data.get_wds_dataset with its own image_transform

Prints (and with --out writes) one JSON object. Not a test.

    .venv/bin/python benchmarks/data_throughput.py --samples 2000 --workers 1 2
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import DataConfig, SourceConfig, build_loader  # noqa: E402
from pretrain.data import loader as loader_module  # noqa: E402
from pretrain.data.config import CLIP_MEAN, CLIP_STD  # noqa: E402
from pretrain.data.decode import ImageTransform  # noqa: E402

PHOTOS_VERSION = 1
OPEN_CLIP_SAMPLE_SHUFFLE = 5000  # open_clip_train/data.py _SAMPLE_SHUFFLE_SIZE (3.3.0)


def photo_jpeg(seed: int) -> tuple[bytes, tuple[int, int]]:
    """A photo-like JPEG: random size 400x300..1024x768, smooth gradients and blobs with
    texture and grain, saved at the highest of quality 90..40 that stays <= 100 KB."""
    rng, r = np.random.default_rng(seed), random.Random(seed)
    w = r.randint(400, 1024)
    h = max(300, min(768, round(w * r.uniform(0.6, 0.9))))
    sw, sh = w // 8 + 1, h // 8 + 1  # drawn at 1/8 scale, upsampled: smooth like a photo
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    img = (rng.uniform(0, 255, 3) + x[..., None] * rng.uniform(-2.4, 2.4, 3)
           + y[..., None] * rng.uniform(-2.4, 2.4, 3))
    for _ in range(6):
        cx, cy, rad = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(4, 25)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rad**2))
        img += blob[..., None] * rng.uniform(-120, 120, 3)
    img += rng.normal(0, 30, img.shape)
    small = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    big = np.asarray(small.resize((w, h), Image.BICUBIC), np.int16)
    big = big + rng.integers(-8, 9, big.shape, dtype=np.int16)
    photo = Image.fromarray(big.clip(0, 255).astype(np.uint8))
    for quality in (90, 80, 70, 60, 50, 40):
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=quality)
        if buf.tell() <= 100_000:
            break
    return buf.getvalue(), (w, h)


def ensure_photo_shards(cache: str, count: int, per_shard: int) -> tuple[list[str], dict]:
    """Shards of ``count`` photo-like samples under ``cache`` (written once); their URLs
    and a summary of the JPEGs (sizes, bytes)."""
    import webdataset as wds

    out = Path(cache) / f"photos-v{PHOTOS_VERSION}-{count}-{per_shard}"
    summary_path = out / "summary.json"
    if not summary_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        sizes, nbytes = [], []
        with wds.ShardWriter(str(out / "photos-%06d.tar"), maxcount=per_shard,
                             verbose=0) as sink:
            for i in range(count):
                jpeg, size = photo_jpeg(i)
                sizes.append(size)
                nbytes.append(len(jpeg))
                sink.write({"__key__": f"photo{i:06d}", "jpg": jpeg,
                            "txt": f"a photo of thing number {i % 97}"})
        kb = sorted(n / 1000 for n in nbytes)
        summary = {"images": count, "kb_min": round(kb[0], 1),
                   "kb_median": round(kb[len(kb) // 2], 1), "kb_max": round(kb[-1], 1),
                   "px_min": min(sizes, key=lambda s: s[0] * s[1]),
                   "px_max": max(sizes, key=lambda s: s[0] * s[1])}
        summary_path.write_text(json.dumps(summary))
    return sorted(str(p) for p in out.glob("photos-*.tar")), json.loads(
        summary_path.read_text())


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


def run_ours(urls: list[str], args, workers: int, draft: bool = True) -> dict:
    cfg = DataConfig(sources=[SourceConfig("photos", urls)], image_size=args.image_size,
                     batch_size=args.batch_size, workers=workers,
                     shuffle_buffer=OPEN_CLIP_SAMPLE_SHUFFLE, context_length=77,
                     crop_scale=(0.9, 1.0), hflip=0.0, mean=CLIP_MEAN, std=CLIP_STD)
    original = loader_module.ImageTransform
    if not draft:  # workers fork after this: they inherit it
        loader_module.ImageTransform = functools.partial(ImageTransform, draft=False)
    try:
        return _time_batches(build_loader(cfg, 0, 1), args.samples,
                             lambda b: len(b["keys"]))
    finally:
        loader_module.ImageTransform = original


def run_open_clip(urls: list[str], args, workers: int) -> dict:
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

    assert oc_data._SAMPLE_SHUFFLE_SIZE == OPEN_CLIP_SAMPLE_SHUFFLE, "open_clip changed"

    # open_clip_train 3.3.0's group_by_keys_nothrow predates the end-of-shard marker ({})
    # that webdataset 1.0.2's tar_file_expander yields and fails on it with KeyError
    # 'fname'; turning the marker off restores the behaviour open_clip was written for.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)

    preprocess = open_clip.image_transform(args.image_size, is_train=True, mean=CLIP_MEAN,
                                           std=CLIP_STD)
    ns = SimpleNamespace(
        train_data="::".join(urls), val_data=None, dataset_resampled=True,
        train_data_upsampling_factors=None, train_num_samples=args.samples * 4,
        batch_size=args.batch_size, workers=workers, world_size=1, seed=0,
        distributed=False)
    info = oc_data.get_wds_dataset(ns, preprocess, is_train=True, epoch=0,
                           tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return _time_batches(info.dataloader, args.samples, lambda b: len(b[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="timed samples per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1600, help="photos in the shards")
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                        "internimage-bench-data"))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    urls, photos = ensure_photo_shards(args.cache, args.images, args.per_shard)
    results: dict[str, dict] = {}
    for workers in args.workers:
        runners = {"ours": lambda w=workers: run_ours(urls, args, w),
                   "ours_no_draft": lambda w=workers: run_ours(urls, args, w, draft=False),
                   "open_clip": lambda w=workers: run_open_clip(urls, args, w)}
        runs: dict[str, list[dict]] = {name: [] for name in runners}
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit all alike
            for name, run in runners.items():
                runs[name].append(run())
        for name, rs in runs.items():
            rates = sorted(r["samples_per_s"] for r in rs)
            median = rates[len(rates) // 2]
            results[f"{name}@{workers}w"] = {
                "workers": workers, "samples_per_s": median,
                "samples_per_s_per_worker": round(median / workers, 1),
                "runs_samples_per_s": rates, "samples_per_run": rs[0]["samples"]}
    report = {
        "benchmark": "data_throughput", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared machine: other jobs ran at the same time"},
        "settings": {"samples": args.samples, "workers": args.workers,
                     "batch_size": args.batch_size, "image_size": args.image_size,
                     "repeats": args.repeats, "shards": len(urls), "photos": photos,
                     "shuffle_buffer": OPEN_CLIP_SAMPLE_SHUFFLE, "crop_scale": [0.9, 1.0],
                     "hflip": 0.0, "context_length": 77,
                     "open_clip": "open_clip_train 3.3.0 data.get_wds_dataset (installed)"},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
