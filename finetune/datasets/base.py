"""A dataset of (image file, label file) pairs whose label ids go through a lookup table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# The label of pixels no loss or metric counts; the value of the released mmseg configs
# (``ignore_index=255``), defined here once for every segmentation dataset, head and metric.
IGNORE_INDEX = 255
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def read_label(path: str | Path, lut: np.ndarray | None = None) -> np.ndarray:
    """Label PNG -> int64 ids, remapped by ``lut`` (index = stored id) when given."""
    # Palette ("P") and grey PNGs both store the class id per pixel; never convert to RGB.
    raw = np.array(Image.open(path), dtype=np.int64)
    if raw.ndim != 2:
        raise ValueError(f"{path}: label maps must be single-channel, got shape {raw.shape}")
    return raw if lut is None else lut[raw]


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Dense id -> id table; ids absent from ``mapping`` become the ignore index."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


class PairedSegmentation(Dataset):
    """(image uint8 (3, H, W), label int64 (H, W)) per pair, then the optional ``transform``."""

    def __init__(self, pairs: Sequence[tuple[Path, Path, np.ndarray | None]],
                 transform: Transform | None = None):
        if not pairs:
            raise FileNotFoundError("no image/label pairs found")
        self.pairs = list(pairs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path, lut = self.pairs[i]
        image = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB")).copy())
        image = image.permute(2, 0, 1)
        label = torch.from_numpy(read_label(label_path, lut))
        if self.transform is not None:
            return self.transform(image, label)
        return image, label
