"""Generated demo data for the dense tasks: simple shapes (rectangles, ellipses, triangles)
on noisy backgrounds, seeded and deterministic.

- ``ensure_shapes_coco``: a COCO-format instance set (JSON + PNG images, RLE masks).
- ``ensure_shapes_ade``: an ADE20K-layout semantic set (images/ + annotations/ PNG label
  maps, 0 = ignore/background-unlabelled, 1..3 = shape classes, 4 = background).
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("rectangle", "ellipse", "triangle")
# Each class has its own hue family (jittered) on a greyish ground: the shape and its
# colour both identify the class, so a tiny model learns the demo within minutes on a CPU.
CLASS_HUES = (0.0, 0.33, 0.62)
VERSION = 2


def _scene(rng: np.random.Generator, size: int, max_shapes: int):
    """(RGB uint8 image, list of (class index 0..2, bool mask)) of one scene."""
    base = np.full(3, rng.uniform(60, 200)) + rng.uniform(-15, 15, size=3)
    img = np.clip(base + rng.normal(0, 18, size=(size, size, 3)), 0, 255)
    shapes = []
    occupied = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(0, len(SHAPES)))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2.2, size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        if cls == 0:
            draw.rectangle(box, fill=1)
        elif cls == 1:
            draw.ellipse(box, fill=1)
        else:
            draw.polygon([(x0 + w // 2, y0), (x0, y0 + h - 1), (x0 + w - 1, y0 + h - 1)], fill=1)
        mask = np.asarray(canvas, dtype=bool)
        if (mask & occupied).sum() > 0.2 * mask.sum():  # keep instances mostly visible
            continue
        hue = (CLASS_HUES[cls] + rng.uniform(-0.06, 0.06)) % 1.0
        color = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0),
                                                   rng.uniform(0.55, 1.0)))
        img[mask] = np.clip(color + rng.normal(0, 10, size=(mask.sum(), 3)), 0, 255)
        for prev in shapes:  # a later shape hides what it covers
            prev[1] &= ~mask
        occupied |= mask
        shapes.append([cls, mask])
    return img.astype(np.uint8), [(c, m) for c, m in shapes if m.sum() >= 16]


def _atomic_dir(final: Path, write) -> Path:
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_shapes_coco(out: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> None:
    """COCO instance set: ``{train,val}/*.png`` and ``annotations/instances_{split}.json``."""
    from pycocotools import mask as mask_utils

    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(SHAPES)]
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        (out / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            rng = np.random.default_rng(seed * 7_919 + offset + i)
            img, shapes = _scene(rng, size, 4)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(out / split / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for cls, mask in shapes:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle["counts"] = rle["counts"].decode()
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1,
                             "segmentation": rle, "area": float(mask.sum()),
                             "bbox": [x, y, w, h], "iscrowd": 0})
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": categories}))


def write_shapes_ade(out: Path, n_train: int, n_val: int, size: int, seed: int = 0) -> None:
    """ADE20K layout: ``images/{training,validation}/*.jpg`` + ``annotations/.../*.png``."""
    for split, n, offset in (("training", n_train, 0), ("validation", n_val, 1_000_000)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(seed * 7_919 + offset + i + 17)
            img, shapes = _scene(rng, size, 5)
            label = np.full((size, size), 1 + len(SHAPES), dtype=np.uint8)  # background
            for cls, mask in shapes:
                label[mask] = cls + 1
            Image.fromarray(img).save(out / "images" / split / f"{i:06d}.jpg", quality=95)
            Image.fromarray(label).save(out / "annotations" / split / f"{i:06d}.png")
    (out / "classes.json").write_text(json.dumps([*SHAPES, "background"]))


def ensure_shapes_coco(cache_dir: str | Path, n_train: int = 400, n_val: int = 80,
                       size: int = 96, seed: int = 0) -> Path:
    """Root of the demo COCO set (written once, atomically, under ``cache_dir``)."""
    final = Path(cache_dir) / f"shapes-coco-v{VERSION}-{n_train}-{n_val}-{size}-{seed}"
    return _atomic_dir(final, lambda d: write_shapes_coco(d, n_train, n_val, size, seed))


def ensure_shapes_ade(cache_dir: str | Path, n_train: int = 400, n_val: int = 80,
                      size: int = 96, seed: int = 0) -> Path:
    """Root of the demo ADE20K-layout set (written once, atomically, under ``cache_dir``)."""
    final = Path(cache_dir) / f"shapes-ade-v{VERSION}-{n_train}-{n_val}-{size}-{seed}"
    return _atomic_dir(final, lambda d: write_shapes_ade(d, n_train, n_val, size, seed))
