"""A dataset of (image file, label file) pairs whose label ids go through a lookup table,
and what every layout's listing shares: pairing by directory listings, and the errors of a
set whose labels are missing or cannot be read."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# The label of pixels no loss or metric counts; the value of the released mmseg configs
# (``ignore_index=255``), defined here once for every segmentation dataset, head and metric.
IGNORE_INDEX = 255
Transform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# how many unlabelled images an error names (the count says how many there are)
NAMED_UNLABELLED = 3
# unreadable training items in a row that end a run (the set is damaged, not a file)
MAX_UNREADABLE_IN_A_ROW = 16
log = logging.getLogger(__name__)
T = TypeVar("T")


class UnlabelledImages(ValueError):
    """Images of a layout without their label file (a partial copy, a cut download): a
    config error, raised when the pairs are listed, before anything is built (a
    ``ValueError``, as every data check that ``internimage finetune`` reports in one line)."""


class UnreadableFile(OSError):
    """An image or label file that exists but cannot be read (truncated, not an image, a
    label map of the wrong kind): the message names the file and the reader's error."""


def listed_names(folder: Path) -> frozenset[str]:
    """The names of the entries of ``folder`` (none when it does not exist).

    One directory listing answers "has this image a label file?" for the whole folder,
    where a stat per label costs ~1 ms on a network filesystem (two minutes for
    COCO-Stuff's 118k images); a name that lists but cannot be opened is an
    :class:`UnreadableFile` when it is read."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(e.name for e in entries)
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()


def files_named(folder: Path, suffix: str) -> list[Path]:
    """The entries of ``folder`` whose names end in ``suffix``, in name order (what
    ``sorted(folder.glob("*" + suffix))`` lists, hidden names included, as pathlib's glob
    includes them: the order of a dataset is part of an exact resume); none when it does
    not exist.

    One directory listing, sorted as name strings: sorting ``glob``'s Path objects took
    3.7 s of the 5 s a COCO-Stuff listing took at 118k images, and the start check and the
    dataset each list it."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(suffix))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / name for name in names]


def refuse_unlabelled(image_dir: Path, total: int, unlabelled: list[Path],
                      expected: str) -> None:
    """Raise :class:`UnlabelledImages` when ``unlabelled`` (of the ``total`` images listed
    under ``image_dir``) is not empty: how many, the label path expected (``expected``,
    relative to the dataset root) and the first few, relative to ``image_dir``."""
    if not unlabelled:
        return
    first = ", ".join(str(p.relative_to(image_dir)) for p in unlabelled[:NAMED_UNLABELLED])
    more = ", ..." if len(unlabelled) > NAMED_UNLABELLED else ""
    raise UnlabelledImages(f"{len(unlabelled)} of {total} images in {image_dir} have no "
                           f"label file (expected {expected}; first: {first}{more})")


class NextReadable:
    """Training's rule for an item that cannot be read (:class:`UnreadableFile`): the next
    item in index order is read in its place, so every batch keeps its size (the ranks step
    together) and a resume replays the same items (no random draw decides), as the
    classification sets skip theirs (``finetune.cls_data.SkipUnreadable``). Each
    replacement is logged with this process's count (``skipped``; a DataLoader worker
    counts its own); :data:`MAX_UNREADABLE_IN_A_ROW` in a row (or the whole set, when
    smaller) end the run. ``what``: the item's name in the messages (``pair``, ``image``)."""

    def __init__(self, what: str):
        self.what = what
        self.skipped = 0

    def read(self, load: Callable[[int], T], i: int, size: int) -> tuple[int, T]:
        """(index read, ``load`` of it): item ``i``'s, or the next readable one's."""
        tries = min(MAX_UNREADABLE_IN_A_ROW, size)
        for k in range(tries):
            j = (i + k) % size
            try:
                return j, load(j)
            except UnreadableFile as err:
                self.skipped += 1
                log.warning("data: training %s %d skipped, the next one read instead: %s "
                            "(%d skipped by this process)", self.what, j, err, self.skipped)
        raise RuntimeError(f"data: {tries} consecutive training {self.what}s from index {i} "
                           "cannot be read: the set is damaged, see the warnings above")


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> RGB uint8 (H, W, 3); :class:`UnreadableFile` naming it otherwise."""
    try:
        return np.array(Image.open(path).convert("RGB"))
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, the file is named
        raise UnreadableFile(f"cannot read image {path} ({type(err).__name__}: {err})") \
            from err


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
