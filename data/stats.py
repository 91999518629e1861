"""Counting what the pipeline skipped and saw, across DataLoader worker processes.

Workers are separate processes, so each worker keeps a local :class:`SkipCounter` and ships
the counts accumulated since its previous batch inside that batch (``batch["counts"]``);
the loader in the main process folds them into one :class:`DataStats` the trainer reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SKIP_REASONS = ("missing_image", "undecodable_image", "empty_image", "oversized_image",
                "missing_caption", "missing_shard", "unreadable_shard", "truncated_shard",
                "lost_samples", "duplicate_member", "forbidden_shard")
"""Why a sample, or a whole shard (the ``*_shard`` reasons), was dropped.

``oversized_image``: the image header declares more pixels than ``data.max_image_pixels``
(not decoded). ``missing_shard``: the shard does not exist (404 / NoSuchKey).
``unreadable_shard``: nothing of it could be read (not a tar), or it failed every retry
while other shards could be read.
``forbidden_shard``: the object store refused every read of it while other shards of the
stream could be read (a per-object permission; refused credentials end the run instead,
see :mod:`data.shard_schedule`).
``truncated_shard``: it broke before its end-of-archive marker (cut short, a corrupt header).
``duplicate_member``: a sample with two members of one extension (ambiguous).
``lost_samples``: samples of damaged or given-up shards that were not delivered: exact when
the shard's sample count is known (img2dataset's ``<shard>_stats.json``), else only the
sample cut in the middle (see :func:`data.sources.count_lost`).

A missing or damaged shard and its lost samples are counted once per run, however many
slots, parts and epochs read it (:class:`data.stream.SourceStream`); a shard given up after
failed reads is counted each time a slot gives it up.
"""


MET_EVENTS = ("unread_bytes", "unknown_tags", "malformed_tags")
"""Events that count what the data holds, like the skips: a damaged shard's
``unread_bytes`` (once per run, by the read that counts its ``truncated_shard``) and the
tags of each sample handed out (``unknown_tags``, ``malformed_tags``: once per sample and
epoch). Tallied in :attr:`SkipCounter.met` with the skips, so a resize takes those of the
old workers' current blocks out of the totals with them (:meth:`DataStats.withdraw`): the
new slots read those samples again and count them again. Other events count this run's
own reads (``shards_opened`` counts a re-read again) and are not.

A block's tally runs from its fill to the save, which comes after its samples are decoded
and collated, so codecs count these per sample, when a sample is decoded (pre-training's
``unknown_tags`` too): counted when a batch is collated, the events of a batch's samples
from the block before, collated with the block's first ones, would be taken out with the
block though not read again."""


EVENTS = ("unknown_tags", "malformed_tags", "shards_opened", "shards_changed",
          "shard_retries", "shard_failures", "storage_waits", "storage_wait_seconds",
          "unread_bytes", "sources_ended", "pass_remainder")
"""Every event name the readers count (:meth:`SkipCounter.event`): with the sources and
:data:`SKIP_REASONS`, the fixed slots of :func:`count_slots`."""


def count_slots(sources: list[str]) -> list[tuple[str, ...]]:
    """Every entry a :meth:`DataStats.to_dict` of a loader over ``sources`` can hold, in
    one fixed order: ``(section, key)``, or ``(section, source, reason)`` for
    ``skipped_by_source`` (the keys of :func:`flat_counts`). Ranks sum their totals over
    these keys with one all-reduce of ~60 numbers (``runtime.dist.sum_counts``) instead of
    gathering every rank's dict to one rank: under NCCL a gather is point-to-point,
    connecting rank 0 to every other rank (GPU buffers per peer, NVIDIA/nccl#1685) at each
    log step and save."""
    return ([("samples", s) for s in sources] + [("skipped", r) for r in SKIP_REASONS]
            + [("skipped_by_source", s, r) for s in sources for r in SKIP_REASONS]
            + [("events", e) for e in EVENTS])


def flat_counts(totals: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """``totals`` (a :meth:`DataStats.to_dict`) keyed by :func:`count_slots`' tuples."""
    flat: dict[tuple[str, ...], float] = {}
    for section, counts in totals.items():
        for key, value in counts.items():
            if isinstance(value, dict):
                flat.update({(section, key, reason): n for reason, n in value.items()})
            else:
                flat[section, key] = value
    return flat


def nested_counts(flat: dict[tuple[str, ...], float]) -> dict[str, Any]:
    """The :meth:`DataStats.to_dict` form of :func:`flat_counts`' (zero entries left out,
    whole numbers as ints)."""
    out: dict[str, Any] = {}
    for (section, *keys), value in flat.items():
        if not value:
            continue
        node = out.setdefault(section, {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = int(value) if float(value).is_integer() else value
    return out


class SkipCounter:
    """Per-worker counts keyed ``(kind, source, name)``; ``drain`` hands over and resets.

    kinds: ``skip`` (reasons in :data:`SKIP_REASONS`) and ``event`` (things that are not
    drops: ``unknown_tags``, ``malformed_tags``, ``shards_opened`` (every open for reading:
    a shard read on from its saved position after a resume, or retried later, counts
    again), ``shards_changed`` (a shard's object replaced since its read began or its
    position was saved: read again from its start), ``shard_retries`` (in-place
    re-opens), ``shard_failures`` (reads set aside for a later retry), ``storage_waits`` and
    ``storage_wait_seconds`` (a stream waiting for its storage), ``unread_bytes`` (bytes
    after a break in a damaged shard), ``sources_ended``, ``pass_remainder`` (samples of a
    pass's end too few for a full training batch, left out of that pass)).

    ``met``: every skip since the counter was made, ``(source, reason)`` -> n, muted or
    not (never drained), and the events of :data:`MET_EVENTS` alike: what a read of the
    same samples meets, from which :class:`data.stream.MixedStream` tells what a re-read
    of its current shuffle block counts again (a few entries: one per source and reason
    met).
    """

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self.muted = False
        self.met: Counter[tuple[str, str]] = Counter()
        self.last_skip: str | None = None  # the reason of the latest skip (data.loader)

    def skip(self, source: str, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped samples (or shards) of ``source`` for ``reason``."""
        self.last_skip = reason
        if n:
            # muted too: a muted re-read meets what the saved block's count holds
            self.met[source, reason] += n
        if not self.muted and n:
            self._counts["skip", source, reason] += n

    def event(self, source: str, name: str, n: int = 1) -> None:
        """Count ``n`` occurrences of a non-dropping event."""
        if n and name in MET_EVENTS:  # muted too, as skips
            self.met[source, name] += n
        if not self.muted and n:
            self._counts["event", source, name] += n

    def drain(self) -> list[tuple[str, str, str, int]]:
        """All counts since the last drain (picklable), then start again from zero."""
        out = [(k, s, n, c) for (k, s, n), c in self._counts.items()]
        self._counts.clear()
        return out


@dataclass
class DataStats:
    """Totals over all workers of one loader, as seen by the consumer (main process).

    ``samples``: good samples delivered per source (the realised mix). ``skipped``: per
    reason, ``skipped_by_source``: per source and reason; ``events``: e.g. unknown_tags,
    shard_retries, shards_opened.
    """

    samples: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_by_source: dict[str, Counter] = field(default_factory=dict)
    events: Counter = field(default_factory=Counter)

    def add_counts(self, counts: list[tuple[str, str, str, int]]) -> None:
        """Fold one batch's drained worker counts in."""
        for kind, source, name, n in counts:
            if kind == "skip":
                self.skipped[name] += n
                self.skipped_by_source.setdefault(source, Counter())[name] += n
            else:
                self.events[name] += n

    def withdraw(self, skips: list[list]) -> None:
        """Take ``[source, reason, n]`` skips (and events of :data:`MET_EVENTS`) back out
        of the totals: counts that a re-read of the same samples will make again (see
        :func:`data.redeal.resized_state`)."""
        for source, reason, n in skips:
            if reason in MET_EVENTS:  # a damage measure, not a skip
                self.events[reason] -= n
                if self.events[reason] == 0:
                    del self.events[reason]
                continue
            self.skipped[reason] -= n
            by_source = self.skipped_by_source.setdefault(source, Counter())
            by_source[reason] -= n
            for counts in (self.skipped, by_source):  # as if never counted: no 0 entries
                if counts[reason] == 0:
                    del counts[reason]
            if not by_source:
                del self.skipped_by_source[source]

    @property
    def total_skipped(self) -> int:
        """All dropped samples and shards."""
        return sum(self.skipped.values())

    def mix(self) -> dict[str, float]:
        """Realised fraction of delivered samples per source."""
        total = sum(self.samples.values())
        return {k: v / total for k, v in sorted(self.samples.items())} if total else {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready totals (also the form stored in checkpoints)."""
        return {"samples": dict(self.samples), "skipped": dict(self.skipped),
                "skipped_by_source": {k: dict(v) for k, v in self.skipped_by_source.items()},
                "events": dict(self.events)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataStats:
        """Inverse of :meth:`to_dict`."""
        return cls(Counter(d.get("samples", {})), Counter(d.get("skipped", {})),
                   {k: Counter(v) for k, v in d.get("skipped_by_source", {}).items()},
                   Counter(d.get("events", {})))
