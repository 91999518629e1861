"""Built-in real demo data: scikit-learn's handwritten digits (1,797 8x8 scans shipped with
scikit-learn, no download) as image-text-tag webdataset shards.

Each scan becomes a small RGB JPEG (ink and paper colours, scale and position varied a
little, seeded), with a caption from a few templates and tags (digit name, parity,
small/large value). A fixed seeded split holds out ~15% as a validation shard.

Shared by every task's demo (pre-training, streamed classification, ``internimage shards
demo``), hence in data/; pre-training's source config over it is
``pretrain.data.demo.demo_source``.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.shard_writer import existing_shards


def cache_dir() -> Path:
    """Where built-in demo data is written on first use, for every task:
    ``$INTERNIMAGE_CACHE``, else ``$XDG_CACHE_HOME/internimage``, else
    ``~/.cache/internimage``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "internimage"
    return Path(os.environ.get("INTERNIMAGE_CACHE", default))


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
CAPTION_TEMPLATES = (
    "a photo of the digit {name}",
    "a handwritten {name}",
    "a scan of the number {name}",
    "the digit {value} written by hand",
    "a small picture of a handwritten {name}",
)
TAG_VOCAB = (*DIGIT_NAMES, "even", "odd", "small", "large")
DEMO_VERSION = 1
SPLIT_SEED = 0
VAL_FRACTION = 0.15


def digit_tags(label: int) -> list[str]:
    """Weak labels of a digit: its name, parity and whether it is below 5."""
    return [DIGIT_NAMES[label], "even" if label % 2 == 0 else "odd",
            "small" if label < 5 else "large"]


def render_digit(pixels: np.ndarray, size: int, rng: random.Random) -> Image.Image:
    """An 8x8 scan (values 0..16) as a ``size`` px RGB image: upsampled smoothly, scaled to
    80-100% of the canvas at a random offset, dark ink on light paper in varied tints."""
    ink = np.asarray(pixels, dtype=np.float32).reshape(8, 8) / 16.0
    inner = max(8, round(size * rng.uniform(0.8, 1.0)))
    glyph = Image.fromarray((ink * 255).astype(np.uint8)).resize((inner, inner),
                                                                 Image.BICUBIC)
    alpha = np.zeros((size, size), dtype=np.float32)
    x0, y0 = rng.randint(0, size - inner), rng.randint(0, size - inner)
    alpha[y0:y0 + inner, x0:x0 + inner] = np.asarray(glyph, dtype=np.float32) / 255.0
    paper = np.array([rng.uniform(200, 255) for _ in range(3)], dtype=np.float32)
    ink_rgb = np.array([rng.uniform(0, 90) for _ in range(3)], dtype=np.float32)
    rgb = paper * (1 - alpha[..., None]) + ink_rgb * alpha[..., None]
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _split(n: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = round(n * VAL_FRACTION)
    return sorted(order[n_val:]), sorted(order[:n_val])


def write_demo_shards(out: str | Path, image_size: int = 32, maxcount: int = 256,
                      seed: int = 0) -> Path:
    """Write the digits shards and ``manifest.json`` into directory ``out``; return the
    manifest path. Deterministic for given arguments. Shards of an earlier demo there are
    removed first (written over with another ``maxcount``, its higher-numbered shards
    stayed, and the manifest and a glob counted both sets)."""
    import webdataset as wds
    from sklearn.datasets import load_digits

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    train_ids, val_ids = _split(len(digits.target))
    (out / "tags.txt").write_text("\n".join(TAG_VOCAB) + "\n")
    splits: dict[str, Any] = {}
    for split, ids, pattern in (("train", train_ids, "train-%06d.tar"),
                                ("val", val_ids, "val-%06d.tar")):
        # the held-out split stays one shard: evaluation reads it whole
        count = maxcount if split == "train" else max(len(ids), 1)
        for old in existing_shards(str(out / pattern)):
            old.unlink()
        written: list[str] = []
        with wds.ShardWriter(str(out / pattern), maxcount=count, verbose=0,
                             post=written.append) as sink:
            for i in ids:
                label = int(digits.target[i])
                rng = random.Random(f"{seed}/{i}")
                caption = rng.choice(CAPTION_TEMPLATES).format(name=DIGIT_NAMES[label],
                                                               value=label)
                tags = digit_tags(label)
                sink.write({"__key__": f"digit{i:05d}",
                            "jpg": _jpeg(render_digit(digits.images[i], image_size, rng)),
                            "txt": caption, "cls": str(label),
                            "json": json.dumps({"label": label, "tags": tags,
                                                "index": i}).encode()})
        shards = [Path(name).name for name in written]
        splits[split] = {"shards": shards, "samples": len(ids),
                         "indices_sha": _digest(ids)}
    manifest = {
        "name": "digits", "version": DEMO_VERSION,
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten "
                  "digits, 1,797 8x8 scans)",
        "image_size": image_size, "seed": seed, "split_seed": SPLIT_SEED,
        "val_fraction": VAL_FRACTION, "splits": splits,
        "classes": list(DIGIT_NAMES), "caption_templates": list(CAPTION_TEMPLATES),
        "tag_vocab": "tags.txt", "tags": list(TAG_VOCAB),
        "members": {"image": "jpg", "caption": "txt", "label": "cls", "tags": "json:tags"},
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _digest(ids: list[int]) -> str:
    import hashlib

    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def ensure_demo_shards(cache_dir: str | Path, image_size: int = 32) -> Path:
    """Path of the demo ``manifest.json`` under ``cache_dir``, writing the shards first if
    they are not there. Safe when several ranks call it at once: each writes into its own
    temporary directory and renames it into place atomically; losers discard theirs."""
    cache_dir = Path(cache_dir)
    final = cache_dir / f"digits-v{DEMO_VERSION}-{image_size}px"
    manifest = final / "manifest.json"
    if manifest.is_file():
        return manifest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        write_demo_shards(tmp, image_size=image_size)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the user's runs
        try:
            os.rename(tmp, final)
        except OSError:
            if not manifest.is_file():  # not a lost race: a real problem
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def demo_source_urls(manifest: str | Path, split: str = "train") -> list[str]:
    """Absolute shard paths of ``split`` listed in a demo manifest."""
    manifest = Path(manifest)
    data = json.loads(manifest.read_text())
    return [str(manifest.parent / name) for name in data["splits"][split]["shards"]]


def demo_tag_vocab(manifest: str | Path) -> str:
    """Path of the demo's tag vocabulary file (for ``DataConfig.tag_vocab``)."""
    manifest = Path(manifest)
    return str(manifest.parent / json.loads(manifest.read_text())["tag_vocab"])
