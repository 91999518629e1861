"""Reading the files of a fine-tuning dataset (segmentation and detection alike): folder
listings (one directory listing answers for a whole folder, where a stat per file costs
~1 ms on a network filesystem), images, and what training does with a file that exists but
cannot be read (the next item read in its place, :class:`NextReadable`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from runtime.loop import RefusedStart

# how many missing files an error names (its count says how many there are)
NAMED_MISSING = 3
# unreadable training items in a row that end a run (the set is damaged, not a file)
MAX_UNREADABLE_IN_A_ROW = 16
log = logging.getLogger(__name__)
T = TypeVar("T")


def first_few(names: Iterable[str], total: int) -> str:
    """The first :data:`NAMED_MISSING` of ``names`` (``total`` of them), comma-separated,
    with ``, ...`` when there are more: the tail of a "first: ..." in an error."""
    shown = list(names)[:NAMED_MISSING]
    return ", ".join(shown) + (", ..." if total > NAMED_MISSING else "")


class ListingMismatch(RefusedStart):
    """The ranks listed different files for one set (a refused start, one line)."""


def _listing_digest(entries: Sequence[tuple], root: str | Path) -> tuple[int, str]:
    """(item count, SHA-256 of the listing): paths relative to ``root`` and integers."""
    digest, prefix = hashlib.sha256(), len(str(root))
    for entry in entries:
        for field in entry:
            if isinstance(field, (str, Path)):
                digest.update(str(field)[prefix:].encode())
            elif isinstance(field, int):
                digest.update(str(field).encode())
            digest.update(b"\t")
        digest.update(b"\n")
    return len(entries), digest.hexdigest()


def _judge(what: str, seen: list) -> None:
    """Raise :class:`ListingMismatch` unless the ranks' ``(count, digest)`` (or ``(None,
    error text)`` from a rank whose listing raised) are all one."""
    failed = [r for r, (count, _) in enumerate(seen) if count is None]
    if failed:
        first = failed[0]
        raise ListingMismatch(
            f"data: rank {first} could not list the {what} set ({seen[first][1]}); "
            f"{len(failed)} of {len(seen)} ranks failed. Every rank must see the same "
            "files: make every node's copy whole and alike, then start again")
    if len({d for _, d in seen}) == 1:
        return
    main = seen[0]
    other = [r for r, s in enumerate(seen) if s != main]
    first = other[0]
    raise ListingMismatch(
        f"data: the ranks listed different {what} sets: rank 0 {main[0]} items, rank "
        f"{first} {seen[first][0]}{' (other files)' if seen[first][0] == main[0] else ''}; "
        f"{len(other)} of {len(seen)} ranks differ from rank 0. Every rank must see the "
        "same files (their epochs and labels follow from them): make every node's copy "
        "whole and alike, then start again")


def agreed_set(what: str, build: Callable[[], T], entries: Callable[[T], Sequence[tuple]],
               root: str | Path, gather: Callable[[Any], list]) -> T:
    """``build()`` (a dataset, listing its folders) on every rank, refused on every rank
    (:class:`ListingMismatch`) unless every rank listed the same ``entries(dataset)`` for
    the set ``what`` (an ImageFolder's ``(path, label)`` samples, a segmentation set's
    ``(image, label, lut)`` pairs): their paths relative to ``root`` and their integers
    (labels) compared; other fields (a lookup table) are the same code's output on every
    rank. Collective: every rank calls it (``gather``: ``all_gather_objects``).

    Each rank lists its own copy of the folders. A node-local copy that is incomplete, or
    a folder synced while the job starts, gave that node's ranks another epoch length, so
    another evaluation, checkpoint and final step: the others waited in a collective it
    never entered (a hang at the first evaluation); with equal lengths, samplers that
    split different lists and labels shifted by a missing class, silently. A rank whose
    build raised (a class folder still empty mid-sync, an image whose label file has not
    arrived) raises its own error and every other rank a :class:`ListingMismatch` naming
    it, rather than ending alone while the others wait until the collective timeout.
    Cost: one SHA-256 over the listing per rank (ImageNet-22K's 14M paths: seconds, next
    to minutes of listing them) and one all-gather of ~100 bytes, once per start."""
    try:
        dataset: T | None = build()
        own: tuple = _listing_digest(entries(dataset), root)
        error: Exception | None = None
    except Exception as err:  # noqa: BLE001 - raised below, after every rank knows
        dataset, error = None, err
        own = (None, f"{type(err).__name__}: {err}"[:500])
    seen = gather(own)
    if error is not None:
        raise error
    _judge(what, seen)
    assert dataset is not None
    return dataset


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


class NextReadable:
    """Training's rule for an item that cannot be read (:class:`UnreadableFile`): the next
    item in index order is read in its place, so every batch keeps its size (the ranks step
    together) and a resume replays the same items (no random draw decides), for every
    task (segmentation, detection, the classification sets: ``finetune.cls_data``). Each
    replacement is logged with this process's count (``skipped``; a DataLoader worker
    counts its own, which is why :meth:`read_counted` also says how many items a read
    replaced: a count that travels with the item out of the worker, summed by every
    task's training loop into the ``skipped`` field of metrics.jsonl,
    finetune/skip_counts.py);
    :data:`MAX_UNREADABLE_IN_A_ROW` in a row (or the whole set, when smaller: no item is
    tried twice) end the run. ``what``: the item's name in the messages (``pair``,
    ``image``, ``sample``); ``errors``: what "cannot be read" is (the classification sets
    read through torchvision/PIL, whose errors are of any type)."""

    def __init__(self, what: str, errors: tuple[type[BaseException], ...] = (UnreadableFile,)):
        self.what, self.errors = what, errors
        self.skipped = 0

    def read_counted(self, load: Callable[[int], T], i: int,
                     size: int) -> tuple[int, T, int]:
        """(index read, ``load`` of it, how many unreadable items it replaced: 0 when item
        ``i`` was read): item ``i``'s, or the next readable one's."""
        tries = min(MAX_UNREADABLE_IN_A_ROW, size)
        for k in range(tries):
            j = (i + k) % size
            try:
                return j, load(j), k
            except self.errors as err:
                self.skipped += 1
                why = str(err) if isinstance(err, UnreadableFile) else \
                    f"{type(err).__name__}: {err}"
                log.warning("data: training %s %d skipped, the next one read instead: %s "
                            "(%d skipped by this process)", self.what, j, why, self.skipped)
        raise RuntimeError(f"data: {tries} consecutive training {self.what}s from index {i} "
                           "cannot be read: the set is damaged, see the warnings above")


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> RGB uint8 (H, W, 3); :class:`UnreadableFile` naming it otherwise."""
    try:
        return np.array(Image.open(path).convert("RGB"))
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, the file is named
        raise UnreadableFile(f"cannot read image {path} ({type(err).__name__}: {err})") \
            from err
