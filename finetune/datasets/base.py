"""A dataset of (image file, label file) pairs whose label ids go through a lookup table,
and what every segmentation layout's listing shares: the error of a set whose labels are
missing (listings, images and unreadable files: finetune/data_files.py, shared with
detection)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from finetune.data_files import UnreadableFile, first_few, read_image

# The label of pixels no loss or metric counts; the value of the released mmseg configs
# (``ignore_index=255``), defined here once for every segmentation dataset, head and metric.
IGNORE_INDEX = 255
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class UnlabelledImages(ValueError):
    """Images of a layout without their label file (a partial copy, a cut download): a
    config error, raised when the pairs are listed, before anything is built (a
    ``ValueError``, as every data check that ``internimage finetune`` reports in one line)."""


def refuse_unlabelled(image_dir: Path, total: int, unlabelled: list[Path],
                      expected: str) -> None:
    """Raise :class:`UnlabelledImages` when ``unlabelled`` (of the ``total`` images listed
    under ``image_dir``) is not empty: how many, the label path expected (``expected``,
    relative to the dataset root) and the first few, relative to ``image_dir``."""
    if not unlabelled:
        return
    first = first_few((str(p.relative_to(image_dir)) for p in unlabelled), len(unlabelled))
    raise UnlabelledImages(f"{len(unlabelled)} of {total} images in {image_dir} have no "
                           f"label file (expected {expected}; first: {first})")


def read_label(path: str | Path, lut: np.ndarray | None = None) -> np.ndarray:
    """Label PNG -> int64 ids, remapped by ``lut`` (index = stored id) when given;
    :class:`UnreadableFile` naming the file when it cannot be read as one."""
    try:
        # Palette ("P") and grey PNGs both store the class id per pixel; never convert to RGB.
        raw = np.array(Image.open(path), dtype=np.int64)
        if raw.ndim != 2:
            raise ValueError(f"label maps must be single-channel, got shape {raw.shape}")
        return raw if lut is None else lut[raw]
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, the file is named
        raise UnreadableFile(f"cannot read label map {path} ({type(err).__name__}: {err})") \
            from err


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
        image = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)
        label = torch.from_numpy(read_label(label_path, lut))
        if self.transform is not None:
            return self.transform(image, label)
        return image, label
