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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from data.config import S3Config
from data.sources import RawSample, read_shard
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
    shard-level damage (``missing_shard``, ``truncated_shard``...) by reason."""

    tags: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    tagged: int = 0
    malformed: int = 0
    shard_skips: dict[str, int] = field(default_factory=dict)
    _sets: list[frozenset[str]] = field(default_factory=list, repr=False)

    def coverage(self, vocab: Iterable[str]) -> float:
        """Fraction of tagged samples with at least one tag in ``vocab`` (0 if none)."""
        if not self.tagged:
            return 0.0
        wanted = set(vocab)
        return sum(1 for s in self._sets if s & wanted) / self.tagged


def count_tags(urls: list[str], tags_key: str, s3: S3Config | None = None) -> TagCounts:
    """Stream the shards ``urls`` once and count the tags under ``tags_key`` (the data
    config's ``tags_key``: ``json:tags`` or ``ext``). Keeps one small set of tags per tagged
    sample in memory for :meth:`TagCounts.coverage` (interned strings)."""
    s3 = s3 or S3Config()
    counter = SkipCounter()
    out = TagCounts()
    names: dict[str, str] = {}
    for url in urls:
        for raw in read_shard(url, "tags", s3, counter):
            out.samples += 1
            try:
                tags = parse_tags(raw, tags_key)
            except MalformedTags:
                out.malformed += 1
                continue
            if not tags:
                continue
            unique = frozenset(names.setdefault(t, t) for t in tags)
            out.tagged += 1
            out.tags.update(unique)
            out._sets.append(unique)
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
