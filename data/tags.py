"""Tags of samples: how a tags member is read, and the tag vocabulary built from shards.

:func:`parse_tags` is the one reader of a sample's tags (the training decode path uses it,
so a vocabulary built here matches what training sees). :func:`count_tags` streams shards
(through :func:`data.sources.read_shard`: integrity checked, damage counted) and counts
tags; :func:`top_tags` picks the vocabulary and :func:`write_vocab` writes it in the format
``pretrain.data.decode.TagVocab.load`` reads: one tag per line, lines starting with ``#``
being comments (so a tag starting with ``#`` cannot be in a vocabulary file).
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.config import S3Config
from data.sources import RawSample, read_whole_shard
from data.stats import SkipCounter


class MalformedTags(ValueError):
    """A tags member that is present but cannot be read as tags."""


def parse_tags(sample: RawSample, tags_key: str | None) -> list[str] | None:
    """Tags of a sample: ``ext:field`` reads a JSON member's list field, ``ext`` a comma
    separated text member. None when absent (no member, no such field, null or empty).
    Raises :class:`MalformedTags` for a member that is not valid JSON / UTF-8 or a field
    that is not a list or string (the caller keeps the sample untagged and counts it)."""
    if tags_key is None:
        return None
    ext, _, fld = tags_key.partition(":")
    data = sample.get(ext)
    if not data:
        return None
    try:
        if fld:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise MalformedTags(f"{ext} holds a JSON {type(doc).__name__}, not an object")
            value = doc.get(fld)
        else:
            value = data.decode("utf-8").split(",")
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedTags(str(err)) from None
    except RecursionError:  # json's C scanner on brackets nested too deep
        raise MalformedTags(f"{ext}: JSON nested too deep") from None
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise MalformedTags(f"{tags_key} is a {type(value).__name__}, not a list")
    tags = [str(t).strip() for t in value if str(t).strip()]
    return tags or None


def storable(tag: str) -> bool:
    """Whether ``tag`` survives a round trip through a vocabulary file (one line, not a
    ``#`` comment, no surrounding blanks)."""
    return bool(tag) and not tag.startswith("#") and "\n" not in tag and "\r" not in tag \
        and tag == tag.strip()


@dataclass
class TagCounts:
    """What :func:`count_tags` saw: ``tags``: samples carrying each tag (a tag repeated in
    one sample counts once); ``samples``: samples read; ``tagged``: samples with at least
    one tag; ``malformed``: samples whose tags member could not be read; ``shard_skips``:
    shard-level damage (``missing_shard``, ``truncated_shard``...) by reason.

    For :meth:`coverage` (the vocabulary is only known once every sample is counted) each
    tagged sample's tags are kept as integer ids (one per distinct tag, in the order first
    seen) in one flat ``array``, with the end of each sample's ids in another: 4 bytes per
    tag of a sample plus 8 per sample. A Python set per sample cost ~740 bytes (~10 GiB
    for YFCC-15M)."""

    tags: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    tagged: int = 0
    malformed: int = 0
    shard_skips: dict[str, int] = field(default_factory=dict)
    _ids: dict[str, int] = field(default_factory=dict, repr=False)  # tag -> its id
    _flat: array = field(default_factory=lambda: array("I"), repr=False)  # samples' ids
    _ends: array = field(default_factory=lambda: array("Q"), repr=False)  # end in _flat

    def add(self, tags: Iterable[str]) -> None:
        """Count one tagged sample carrying ``tags`` (repeats count once; empty: nothing)."""
        names, ids = set(tags), self._ids
        if not names:
            return
        unique = {ids.setdefault(t, len(ids)) for t in names}
        self.tagged += 1
        self.tags.update(names)
        self._flat.extend(unique)
        self._ends.append(len(self._flat))

    def coverage(self, vocab: Iterable[str]) -> float:
        """Fraction of tagged samples with at least one tag in ``vocab`` (0 if none)."""
        if not self.tagged:
            return 0.0
        # which ids are in the vocabulary, looked up per stored id (a table, not a set:
        # a vectorised pass over a few hundred million ids)
        wanted = np.zeros(len(self._ids), dtype=bool)
        for tag in vocab:
            if tag in self._ids:
                wanted[self._ids[tag]] = True
        flat = np.frombuffer(self._flat, dtype=np.uint32)  # views: no copy
        ends = np.frombuffer(self._ends, dtype=np.uint64)
        covered = 0
        # in blocks of samples: the per-id temporaries stay small whatever the count
        for lo in range(0, len(ends), _COVERAGE_BLOCK):
            block_ends = ends[lo:lo + _COVERAGE_BLOCK].astype(np.int64)
            first = int(ends[lo - 1]) if lo else 0
            hit = wanted[flat[first:int(block_ends[-1])]]
            # every stored sample holds at least one id, so no segment is empty (where
            # reduceat would answer the next element instead of an empty reduction)
            starts = np.concatenate(([0], block_ends[:-1] - first))
            covered += int(np.logical_or.reduceat(hit, starts).sum())
        return covered / self.tagged


_COVERAGE_BLOCK = 1 << 20
"""Samples per block of :meth:`TagCounts.coverage`'s pass."""


def count_tags(urls: list[str], tags_key: str, s3: S3Config | None = None) -> TagCounts:
    """Stream the shards ``urls`` once and count the tags under ``tags_key`` (the data
    config's ``tags_key``: ``json:tags`` or ``ext``). Keeps each tagged sample's tag ids
    (a few bytes a tag) for :meth:`TagCounts.coverage`.

    A read that breaks is resumed where it broke (:func:`data.sources.read_whole_shard`);
    one that keeps failing raises :class:`data.sources.ShardReadError` naming the shard: a
    vocabulary counted on part of the shards would be wrong without a word. A missing or
    damaged shard is counted in ``shard_skips`` (its bytes will not change on a re-read)."""
    s3 = s3 or S3Config()
    counter = SkipCounter()
    out = TagCounts()
    for url in urls:
        for raw in read_whole_shard(url, "tags", s3, counter):
            out.samples += 1
            try:
                tags = parse_tags(raw, tags_key)
            except MalformedTags:
                out.malformed += 1
                continue
            if tags:
                out.add(tags)
    out.shard_skips = {name: n for kind, _, name, n in counter.drain() if kind == "skip"}
    return out


def top_tags(counts: Counter[str], top: int) -> list[str]:
    """The ``top`` most frequent storable tags, most frequent first, ties by name (so the
    vocabulary, and the index of each tag in it, is a function of the counts alone)."""
    ranked = sorted((t for t in counts if storable(t)), key=lambda t: (-counts[t], t))
    return ranked[:top]


def write_vocab(tags: list[str], path: str | Path) -> Path:
    """Write ``tags`` one per line (``TagVocab.load``'s format); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in tags), encoding="utf-8")
    return path
