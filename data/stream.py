"""Resumable raw-sample streams of one (rank, worker) slot: per source, then mixed and
shuffled, each with a constant-size cursor that a resumed run restores without replay.

**Source cursor** (:class:`SourceStream`, one per source and slot): the source's epoch and
the position in this slot's share of that epoch's shard permutation (:mod:`data.epochs`),
the unit being read (shard URL and part), the byte offset of the next tar header in it and
the samples passed in it, and the fault state of :class:`~data.shard_schedule.ShardSchedule`
(shards set aside with their own cursors, shards dropped as missing or unreadable, shards
whose damage was counted). Resuming opens the current shard once, at that byte offset (a
local file seeks, ``s3://`` issues one ranged GET through s3fs), and nothing before it is
read again. A compressed shard cannot be entered mid-way: it is read again from its start
(bounded by one shard).

**Mix** (:class:`MixedStream`): draw ``k`` of the slot picks its source from a uniform
number derived from ``(seed, slot, k)`` against the weights of the sources still going, so
the mix is a function of the draw counter and the cursors alone (no RNG state to save or
replay). Each weight is scaled by the slot's share of the source's current epoch
(:meth:`SourceStream.share`): slots dealt more units draw the source more often, so all
slots end an epoch of a source at about the same time, and cluster-wide the mix is the
configured one (``tests/test_data_epochs.py`` simulates the H recipe at 4,096 slots).

**Shuffle buffer: references, re-fetched.** Raw samples are shuffled in blocks of
``shuffle_buffer`` consecutive draws, each block permuted by a seed derived from ``(seed,
slot, block number)``. The saved state names the block by the source cursors and draw
counter at its start (those are its references) plus how many of its samples were emitted;
a resumed stream re-reads that one block (at most ``shuffle_buffer`` raw samples, starting
with one ranged read per source), skips the emitted samples and continues, so the resumed
stream is exactly the uninterrupted one from the saved point on (unless the re-read breaks:
see "Faults end a block"; to the end of the block at least: a resumed stream retries the
shards set aside after failed reads at once, from the next block on, where the
uninterrupted one waited for their cooldowns; the same samples, each once). Counts made
while re-reading the block were already reported before the checkpoint and are muted. The
state also keeps the cursors where the block's fill ended (``MixState.end``): a resume on
another slot count hands the block to one new slot, which finishes it as this one would
have (:mod:`data.adopted`), and re-deals the rest from there (:mod:`data.redeal`), so
none of the block is repeated; and the skips counted from the block's start
(``MixState.skips``, a few entries), which such a resume from a state saved before the end
was kept takes out of the totals (its new slots read the block's shards again, unmuted).
(The alternative, dropping the buffer and refilling it, would lose up to a buffer of
samples per worker at every resume and make the resumed stream differ.)

**Faults end a block.** Re-reading a block from its start cursors reads what was read
only if nothing in the read depended on the clock or on a transient fault: a failed read
(set aside, the next shard read in its place) or the retry of a set-aside shard (when it
came due) may not happen again, or not at the same sample. So such a fault ends the block
being filled (``ShardSchedule.faults``): the sample drawn after it opens the next block, as
at an epoch change, and the block's state keeps its length and the next block's start
(``MixState.cut``, one more set of source cursors, only while inside such a block). A
resume inside it re-reads that many samples with :meth:`ShardSchedule.replay` on (no
set-aside shard retried; a read failing now retried in place), hands out the rest, then
goes on from the saved next start, where the uninterrupted run went on. Best effort: a
shard of the block refused, failing ``SHARD_ATTEMPTS`` reads in a row, or missing since the
save ends the replay (one warning; ``ShardSchedule.replay``,
``MixedStream._reread_check``); the block is then filled on from the live streams, counted
as a fresh run counts, and may differ from the uninterrupted run's. Before, the re-read met
no fault and retried the restored set-aside shards at once: it built another block and
skipped the wrong samples (up to a block per worker and resume, silently). The cost: a
block cut short per fault (two per failed read: the failure, the retry), and two integer
reads per draw.

**Cost at scale** (427M samples, 44k shards, 512 GPUs x 8 workers = 4,096 slots): a resume
computes one permutation per source (44k integers in all, milliseconds), opens one ranged
read per source and worker (3 x 4,096 GETs cluster-wide) and re-reads at most one shuffle
block per worker: ``shuffle_buffer`` raw samples, on average half of them not yet emitted
(the default 1,000 x ~50 KB = ~50 MB per worker, ~200 GB cluster-wide, read in parallel by
4,096 readers; the H preset's 5,000: ~250 MB per worker, ~1 TB cluster-wide; a smaller
buffer costs proportionally less). None of it grows with the samples consumed: the same
after 10^3 samples or after 30 epochs (the replay it replaces read ~7.5 TB after 300M
samples). The saved state is a few hundred bytes per worker plus the (rare) set-aside and
dropped shard names, twice that inside a block (its start and its end cursors; the end is
taken once per block). Measured: ``benchmarks/data_resume.py``, and for a resume on
another slot count ``benchmarks/data_resize.py``.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data.config import S3Config
from data.epochs import first_slot, parts_per_shard, slot_units, unit_of
from data.shard_schedule import SetAside, ShardSchedule
from data.sources import RawSample, count_lost, read_shard
from data.state import derive_seed, key_url, seeded_permutation, unit_key
from data.stats import MET_EVENTS, SkipCounter
from data.storage import ShardPrefetcher
from data.tar_stream import ShardCursor
from runtime.redact import redact_url

log = logging.getLogger(__name__)

_U63 = float(2**63)

MAX_OWED = 4
"""Reads of one set-aside unit owed to later epochs at most (see
:meth:`SourceStream._owe`): a saved cursor holds at most this many short entries per
set-aside unit, whatever the run's length. The tests' 12-sample epochs owe up to 3."""


@dataclass
class SourceCursor:
    """Where one source stream of one slot is (JSON-ready through :meth:`to_dict`).

    ``epoch``/``position``: the next unit to start is ``position`` in this slot's share of
    epoch ``epoch``. ``unit``: the unit being read (its key: the shard URL, plus ``#r/m``
    for part ``r`` of ``m``), None between units; ``offset``: tar byte of its next sample's
    header; ``samples``: samples of the shard passed. ``aside``: key -> ``[offset, samples,
    compressed, failures, version, epoch, owed]`` of shards whose read failed and waits
    for a retry, ``epoch`` the one the unit was dealt in (its retry may come after the
    slot went on to the next epoch; ``version``, ``epoch`` absent in states saved before
    they were kept: such a unit is taken as of the slot's current epoch); ``owed``, only
    when the slot was dealt the unit again meanwhile: those reads (at most
    :data:`MAX_OWED`), ``[epoch, *start]`` each (``start``: an old slot's ``offset,
    samples, compressed, version`` in it, see ``share``; none: from its start), set aside
    once this one is done; ``dropped``:
    keys never read again (missing, unreadable, given up); ``damaged``: keys whose damage
    was already counted.

    After a resume on another slot count (:mod:`data.redeal`): ``share``, when not None,
    replaces this slot's deal: ``[epoch, key]`` entries, the slot's part of what the old
    slots left of epochs ``epoch`` .. ``share_last`` (``position`` indexes it); dealing goes
    on at epoch ``share_last + 1``. ``share_total``: entries over all new slots (the mixer's
    weight scale). An entry ``[epoch, key, offset, samples, compressed, version]`` is a
    unit an old slot was inside: it goes on at that byte offset.

    ``count_epoch``: the epoch whose reads count what damaged and missing shards lose (see
    :class:`SourceStream`); None in states saved before it existed (then the stream's
    ``first_epoch``). ``version``: the version of ``unit``'s object that ``offset`` was
    taken in (:func:`data.storage.object_version`; a resume into another one reads it
    again from its start), None when unknown.
    """

    epoch: int = 0
    position: int = 0
    unit: str | None = None
    offset: int = 0
    samples: int = 0
    compressed: bool = False
    aside: dict[str, list] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    share: list[list] | None = None
    share_last: int = 0
    share_total: int = 0
    count_epoch: int | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceCursor:
        """Inverse of :meth:`to_dict`."""
        share = d.get("share")
        return cls(**{**d, "aside": {k: list(v) for k, v in d["aside"].items()},
                      "dropped": list(d["dropped"]), "damaged": list(d["damaged"]),
                      "share": [list(e) for e in share] if share is not None else None})


class SourceStream:
    """Raw samples of one source for one slot, epoch after epoch without replacement, with
    the fault policy of :class:`~data.shard_schedule.ShardSchedule` and a resumable
    :class:`SourceCursor` (:meth:`cursor` after any sample; ``cursor=`` to resume).

    ``resampled``: epochs forever, shards split into parts when the source has fewer
    shards than slots; else one pass (epoch ``first_epoch`` only, whole shards).
    ``shuffle``: seeded permutation per epoch; else the listed order.
    ``deal_offset``/``deal_stride``: where the epoch's dealing starts
    (:func:`data.epochs.first_slot`; :func:`data.epochs.extra_offsets` gives them).

    **Counting what is lost, once per run.** Every slot reads a damaged or missing shard
    the same way, and a resampled source deals it to some slot in every epoch (to another
    slot each time, at thousands of slots), and to every part's slot when shards are split.
    So that the run's totals count each damaged shard and each lost sample once, only the
    reads of units dealt in epoch ``count_epoch`` (default ``first_epoch``: the epoch every
    slot starts in, where each unit is dealt to exactly one slot) count them, the shard
    itself only through its part 0 and the lost samples by part (:func:`read_shard`);
    reads in later epochs skip the same samples without counting them again. Shards a slot
    gives up after failed reads (a property of that slot's reads, not of the shard's bytes)
    are counted whenever that happens.
    """

    def __init__(self, name: str, urls: list[str], slot: int, nslots: int, seed: int,
                 s3: S3Config, counter: SkipCounter, resampled: bool = True,
                 shuffle: bool = True, first_epoch: int = 0,
                 cursor: SourceCursor | None = None, deal_offset: int = 0,
                 deal_stride: int = 0, count_epoch: int | None = None,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None):
        if not urls:
            raise ValueError(f"source {name!r}: no shard URLs")
        self.name, self.urls, self.slot, self.nslots = name, urls, slot, nslots
        self.seed, self.s3, self.counter = seed, s3, counter
        self.resampled, self.shuffle = resampled, shuffle
        self.deal_offset, self.deal_stride = deal_offset, deal_stride
        self.parts = parts_per_shard(len(urls), nslots) if resampled else 1
        self._cursor = cursor or SourceCursor(epoch=first_epoch)
        if self._cursor.count_epoch is None:
            self._cursor.count_epoch = first_epoch if count_epoch is None else count_epoch
        self._units_epoch: int | None = None
        self._units: np.ndarray | None = None
        timing = {k: v for k, v in (("clock", clock), ("sleep", sleep)) if v is not None}
        self.schedule = ShardSchedule(self._draws(), len(urls) * self.parts, resampled, name,
                                      s3, counter, self._give_up, redrawn=self._owe,
                                      **timing)
        self._faults: tuple[list[str], list[str]] = ([], [])  # see _sorted_faults
        self._restore_faults()
        # Reads ahead the shard this slot's deal names next (see _open); never changes
        # which shard is read, so samples and cursors are the same with it off.
        self._prefetcher = ShardPrefetcher(s3)
        self._lookahead: tuple[int, np.ndarray] | None = None
        self._unit_start: SourceCursor | None = None
        self._unit_met: Counter[tuple[str, str]] = Counter()
        # the epoch each set-aside unit was dealt in (its retry reads it as that epoch's)
        self._aside_epochs: dict[str, int] = {
            key: entry[5] for key, entry in self._cursor.aside.items()
            if len(entry) > 5 and entry[5] is not None}
        # reads of a set-aside unit dealt to this slot again meanwhile (see _owe)
        self._owed: dict[str, list[list]] = {
            key: [list(e) for e in entry[6]] for key, entry in self._cursor.aside.items()
            if len(entry) > 6 and entry[6]}

    # -- state ---------------------------------------------------------------------------
    def cursor(self) -> SourceCursor:
        """A copy of the current cursor, with the fault state of the schedule."""
        c = self._cursor
        aside = {k: [e.cursor.offset, e.cursor.samples, e.cursor.compressed, e.failures,
                     e.cursor.version, self._aside_epochs.get(k),
                     *([[list(o) for o in self._owed[k]]] if k in self._owed else [])]
                 for k, e in sorted(self.schedule.aside.items())}
        dropped, damaged = self._sorted_faults()
        return SourceCursor(c.epoch, c.position, c.unit, c.offset, c.samples, c.compressed,
                            aside, dropped, damaged,
                            [list(e) for e in c.share] if c.share is not None else None,
                            c.share_last, c.share_total, c.count_epoch, c.version)

    def _sorted_faults(self) -> tuple[list[str], list[str]]:
        """The schedule's dropped and damaged units, sorted (copies). Both sets only grow
        (``GrowingSet``): their sorted copies here take the keys added since the last
        call, each inserted in place. The cursor is taken once per unit, and sorting the
        sets afresh each time cost O(d log d) per unit with d dropped units, quadratic over
        a source with many missing shards (10,000 missing: 22.6 s, mostly sorting)."""
        for faults, kept in ((self.schedule.dropped, self._faults[0]),
                             (self.schedule.damaged, self._faults[1])):
            for key in faults.added[len(kept):]:
                bisect.insort(kept, key)
        return list(self._faults[0]), list(self._faults[1])

    def _restore_faults(self) -> None:
        now = self.schedule.clock()
        for key, (offset, samples, compressed, failures, *version) in (
                self._cursor.aside.items()):  # no version: saved before it was kept
            # Retried first after a resume: the outage that set it aside may be over.
            start = ShardCursor(offset, samples, compressed, *version[:1])
            self.schedule.aside[key] = SetAside(start, failures, now, due=now)
        self.schedule.dropped.update(self._cursor.dropped)
        self.schedule.damaged.update(self._cursor.damaged)

    # -- units ---------------------------------------------------------------------------
    def key(self, unit_id: int) -> str:
        """The name of a unit in cursors, logs and the fault policy (:func:`unit_key`)."""
        unit = unit_of(unit_id, self.parts)
        return unit_key(self.urls, unit.shard, unit.part, unit.parts)

    def locate(self, key: str) -> tuple[str, int, int]:
        """(shard URL, part, parts) of a unit key: :meth:`split_key` with the URL of a
        key that names it by index (:func:`data.state.key_url`)."""
        name, part, parts = self.split_key(key)
        return key_url(self.urls, name), part, parts

    def share(self) -> float:
        """This slot's share of the current epoch relative to an average slot (units held
        x slots / units): the mixer scales the source's weight by it, so that a slot dealt
        11 shards instead of 10 (or 2 parts instead of 1) draws the source that much more
        often and every slot ends its epoch of the source at about the same time."""
        c = self._cursor
        if c.share is not None and c.position < len(c.share):  # re-dealt after a resize
            return len(c.share) * self.nslots / c.share_total
        # A re-dealt share that is used up, or was empty (fewer units left than new
        # slots), is weighed by the deal that follows it: weighed by the empty share (0),
        # the source would never be drawn again on this slot, so never move on to it.
        epoch = c.share_last + 1 if c.share is not None else c.epoch
        units = self._epoch_units(epoch)
        return len(units) * self.nslots / (len(self.urls) * self.parts)

    @staticmethod
    def split_key(key: str) -> tuple[str, int, int]:
        """(shard URL, part, parts) of a unit key (``url`` or ``url#part/parts``). The key
        carries its own split: a unit re-dealt after a slot-count change keeps the split it
        was dealt with, whatever this run's :func:`data.epochs.parts_per_shard`."""
        url, sep, tail = key.rpartition("#")
        if sep and "/" in tail:
            part, _, parts = tail.partition("/")
            if part.isdigit() and parts.isdigit():
                return url, int(part), int(parts)
        return key, 0, 1

    def _epoch_units(self, epoch: int) -> np.ndarray:
        if self._units_epoch != epoch:
            start = first_slot(self.nslots, epoch, self.deal_offset, self.deal_stride)
            self._units = slot_units(len(self.urls) * self.parts, self.nslots, self.slot,
                                     self.seed, self.name, epoch, self.shuffle, start)
            self._units_epoch = epoch
        return self._units

    def _draws(self) -> Iterator[str]:
        c = self._cursor
        if c.share is not None:  # what the old slots left, then the deal goes on
            while c.position < len(c.share):
                c.position += 1
                yield c.share[c.position - 1][1]
            if not self.resampled:
                return
            c.epoch, c.position, c.share = c.share_last + 1, 0, None
        while True:
            units = self._epoch_units(c.epoch)
            while c.position < len(units):
                c.position += 1
                yield self.key(units[c.position - 1])
            if not self.resampled:
                return  # one pass done (resampled: parts_per_shard gives every slot units)
            c.epoch, c.position = c.epoch + 1, 0

    def _next_url(self) -> str | None:
        """The shard the deal names next for a fresh read (a guess: a set-aside shard may be
        retried first), looking into the next epoch at the end of this one."""
        for key in self._upcoming_keys():
            if key not in self.schedule.dropped and key not in self.schedule.aside:
                return self.locate(key)[0]
        return None

    def _upcoming_keys(self) -> Iterator[str]:
        c = self._cursor
        if c.share is not None:  # a re-dealt share first, then the deal of share_last + 1
            yield from (entry[1] for entry in c.share[c.position:])
            following = c.share_last + 1
        else:
            yield from (self.key(u) for u in self._epoch_units(c.epoch)[c.position:])
            following = c.epoch + 1
        if not self.resampled:
            return
        # its own cache: share() reads the current epoch's units at every mix draw
        if self._lookahead is None or self._lookahead[0] != following:
            start = first_slot(self.nslots, following, self.deal_offset, self.deal_stride)
            self._lookahead = (following, slot_units(
                len(self.urls) * self.parts, self.nslots, self.slot, self.seed, self.name,
                following, self.shuffle, start))
        yield from (self.key(u) for u in self._lookahead[1])

    def _prefetch_next(self) -> None:
        upcoming = self._next_url()
        if upcoming is not None:
            self._prefetcher.start(upcoming)

    def _owe(self, key: str) -> None:
        """The deal just named ``key`` again (its next epoch, this slot) while its read of
        an earlier epoch is set aside: that epoch's read is owed too, after this one.

        At most :data:`MAX_OWED` reads per unit are owed: a slot dealt the unit yet again
        (its epochs of the source shorter than the retry cooldown, the unit's reads
        breaking each time: tiny sources, never at scale, where a slot's epoch of a source
        lasts hours) skips this read, logged, its samples counted ``lost_samples`` (when
        the shard's sample count is known, as for a given-up read). Owed without limit,
        the list grew with the run (2,364 reads after 20k samples of a 2-shard source
        whose shard broke on every read from its start) and every saved cursor with it."""
        c = self._cursor  # at the entry just drawn
        entry = (c.share[c.position - 1] if c.share is not None and c.position
                 else [c.epoch, key])
        owed = self._owed.setdefault(key, [])
        if len(owed) < MAX_OWED:
            owed.append([entry[0], *entry[2:]])
            return
        log.warning("source %r: unit %s dealt to this slot again (epoch %d) while its read of "
                    "epoch %d waits for a retry and %d more are owed: this epoch's read is "
                    "skipped, its samples lost", self.name, redact_url(key), entry[0],
                    self._aside_epochs.get(key, c.epoch), len(owed))
        url, part, parts = self.locate(key)
        count_lost(url, self.name, self.s3, self.counter, ShardCursor(*entry[2:6]).samples,
                   False, part, parts)

    def _start_owed(self, key: str) -> None:
        """``key``'s set-aside read is done: its first owed read (:meth:`_owe`) is set
        aside in its place, due at once, as a unit of its own epoch (read like a retry);
        none if the shard was dropped (missing, unreadable, given up: never read again)."""
        owed = self._owed.pop(key, None)
        if not owed or key in self.schedule.dropped:
            return
        (epoch, *start), rest = owed[0], owed[1:]
        if rest:
            self._owed[key] = rest
        now = self.schedule.clock()
        self.schedule.aside[key] = SetAside(ShardCursor(*start), 0, now, due=now)
        self._aside_epochs[key] = epoch

    def close(self) -> None:
        """Drop the read-ahead of the next shard (the stream is not read on)."""
        self._prefetcher.cancel()

    def _give_up(self, key: str, cursor: ShardCursor, reason: str) -> None:
        self.counter.skip(self.name, reason)
        url, part, parts = self.locate(key)
        count_lost(url, self.name, self.s3, self.counter, cursor.samples, False, part, parts)

    def reading_epoch(self) -> int:
        """The epoch of the unit being read, the one it was dealt in: for the retry of a
        set-aside unit, maybe one before the last draw's; between units, the epoch of the
        unit last drawn."""
        c = self._cursor
        if c.unit is not None and c.unit in self._aside_epochs:  # a retry (a set-aside
            return self._aside_epochs[c.unit]  # unit is never drawn afresh meanwhile)
        if c.share is not None and 0 < c.position <= len(c.share):
            return c.share[c.position - 1][0]
        return c.epoch

    def unit_start(self) -> SourceCursor | None:
        """The cursor as the current unit's read began, before its first sample (None
        before any): resuming from it reads that unit again from where it started."""
        return self._unit_start

    def met_in_unit(self) -> Counter[tuple[str, str]]:
        """Skips met (:attr:`SkipCounter.met`) since the current unit's read began: what
        a read from :meth:`unit_start` meets again up to here."""
        return self.counter.met - self._unit_met

    def _counts_losses(self, key: str) -> bool:
        """Whether the read of ``key`` (just drawn, or resumed) counts what its shard lost:
        a unit of epoch ``count_epoch`` whose damage this slot did not count yet."""
        return (self.reading_epoch() == self._cursor.count_epoch
                and key not in self.schedule.damaged)

    # -- samples -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[RawSample]:
        c = self._cursor
        barren, limit = 0, 10 * len(self.urls) * self.parts + 10
        pending = None
        if c.unit is not None:  # resumed inside a unit: continue it at its byte offset
            pending = (c.unit, ShardCursor(c.offset, c.samples, c.compressed, c.version))
        units = self.schedule.__iter__()
        while True:
            if pending is None:
                pending = next(units, None)
                if pending is None:
                    return
            key, start = pending
            pending = None
            if start is None and c.share is not None and c.position:
                entry = c.share[c.position - 1]  # the entry just drawn
                if entry[1] == key and len(entry) > 2:  # an old slot was inside it
                    start = ShardCursor(*entry[2:6])  # (no version: saved before it)
            outcome: dict[str, Any] = {}
            yield from self._read_unit(key, start, outcome)
            epoch = self.reading_epoch()  # this unit's (c.unit is still set)
            c.unit, c.version = None, None
            self.schedule.report(key, outcome)
            if key in self.schedule.aside:  # to be retried, as a unit of this epoch
                self._aside_epochs[key] = epoch
            else:
                self._aside_epochs.pop(key, None)
                self._start_owed(key)
            if outcome["status"] == "complete":
                barren = 0 if outcome["samples"] else barren + 1
            if self.resampled and barren >= limit:
                log.error("source %r: %d shard reads in a row gave no sample; ending its "
                          "stream", self.name, barren)
                self.counter.event(self.name, "sources_ended")
                return

    def _read_unit(self, key: str, start: ShardCursor | None,
                   outcome: dict[str, Any]) -> Iterator[RawSample]:
        c = self._cursor
        start = start or ShardCursor()
        c.unit, c.offset, c.samples, c.compressed, c.version = (
            key, start.offset, start.samples, start.compressed, start.version)
        self._unit_start = self.cursor()  # once per unit
        self._unit_met = self.counter.met.copy()  # a few entries, once per unit
        url, part, parts = self.locate(key)
        ahead = False
        for raw in read_shard(url, self.name, self.s3, self.counter, outcome, start,
                              count_damage=self._counts_losses(key),
                              opener=self._prefetcher.open, part=part, parts=parts):
            after = outcome["cursor"]
            c.offset, c.samples, c.compressed, c.version = (
                after.offset, after.samples, after.compressed, after.version)
            if (after.samples - 1) % parts == part:
                yield raw
            if not ahead:  # from the second sample on: a resume's first costs one read
                ahead = True
                self._prefetch_next()


@dataclass
class MixState:
    """Where a :class:`MixedStream` is: shuffle block ``block`` started at mix draw
    ``draws`` with the source cursors ``sources`` and ``emitted`` of its samples were handed
    out; ``index``: raw samples handed out so far (seeds each sample's augmentation).
    ``lead``: the source whose sample, drawn before the block began, opens it (the first
    sample of that source's next epoch, or the first after a fault, see ``cut``; its
    cursor in ``sources`` is at that sample's unit start), None when the block's first
    sample is drawn in it. ``size``: the block size ``block`` was filled with (a resume
    inside it fills it alike, even when the configured shuffle buffer changed since;
    later blocks take the new size). ``weights``: likewise the source weights the block
    was drawn with (a resume inside it draws it alike when the configured weights
    changed since: else it drew other samples, so skipping its emitted ones dropped
    samples never handed out and handed out again ones that had been; states saved
    before it was kept: none, the configured weights).

    ``cut``: None, or, inside a block that a fault ended (a failed read, a retry: see
    :class:`MixedStream`), ``{"length", "draws", "sources", "lead", "skips", "ended"}``:
    the block's sample count and the next block's start as the stream went on (what the
    block's last sample saves). A resume inside it re-reads ``length`` samples (the
    transient fault that ended the block is not met again) and then goes on from that
    start (unless the re-read broke: then from the live streams; states saved before it
    was kept: none).

    ``ended``: the sources whose stream had ended before the block began (one-pass
    sources read to their end), never drawn again. A resume that drew them to find out
    spent mix draws the uninterrupted run did not, and with three sources or more picked
    other sources for the block's samples than it had (states saved before it was kept:
    none).

    ``end``: inside a block not cut by a fault, the source cursors where the block's fill
    ended (the next block's start; ``cut["sources"]`` holds them in a cut block), None
    otherwise and in states saved before it was kept; ``end_skips``, what reading the
    next block's lead met (``cut["skips"]`` in a cut block): a read of the lead's unit
    from its start meets it again. A resume on the same slot count does
    not need them (it re-reads the block); one on another slot count re-deals what the old
    slots left from there, and hands each old block's rest to one new slot
    (:mod:`data.redeal`, :class:`data.adopted.AdoptingStream`).

    ``skips``: ``[source, reason, n]``, the skips this stream counted from ``sources`` on
    (reading the block and its lead, decoding its emitted samples; also the events of
    :data:`data.stats.MET_EVENTS`: damaged shards' unread bytes, the samples' tag counts):
    reported before the save, and met again by any read of the block. A resume on the
    same slot count mutes its re-read; one on another slot count cannot (other slots read
    the block's shards again), so it takes them back out of the totals
    (:mod:`data.redeal`). Empty at a block end; one entry per source and reason met
    otherwise (states saved before it was kept: none)."""

    block: int = 0
    emitted: int = 0
    draws: int = 0
    index: int = 0
    sources: list[dict[str, Any]] | None = None
    lead: int | None = None
    size: int | None = None
    weights: list[float] | None = None
    skips: list[list] = field(default_factory=list)
    cut: dict[str, Any] | None = None
    ended: list[int] = field(default_factory=list)
    end: list[dict[str, Any]] | None = None
    end_skips: list[list] = field(default_factory=list)


def _skip_list(met: Counter[tuple[str, str]]) -> list[list]:
    """``[source, reason, n]`` of ``met``'s positive counts, sorted (JSON-ready)."""
    return [[source, reason, n] for (source, reason), n in sorted(met.items()) if n > 0]


class MixedStream:
    """``(source id, raw sample)`` of one slot: sources mixed by weight with counter-based
    draws, then shuffled in blocks (see the module docstring); :meth:`state` after any
    sample, ``state=`` (from :meth:`state`) to resume exactly there.

    ``make_sources(cursors)`` builds the source streams (cursors: None for a fresh start).
    ``one_block``: hand out the rest of the block ``state`` is inside, then end (an old
    slot's block finished by a new slot after a resize, :mod:`data.adopted`).
    """

    def __init__(self, make_sources: Callable[[list[SourceCursor] | None],
                                              list[SourceStream]],
                 weights: list[float], seed: int, slot: int, block_size: int,
                 counter: SkipCounter, state: dict[str, Any] | None = None,
                 one_block: bool = False):
        self.make_sources, self.weights = make_sources, list(weights)
        self.seed, self.slot, self.counter = seed, slot, counter
        self.block_size = max(1, block_size)
        self.one_block = one_block
        self._state = MixState(**state) if state is not None else MixState()
        # the next block's start cursors while a block is handed out (MixState.end)
        self._end: list[dict[str, Any]] | None = None
        self._end_skips: list[list] = []  # what reading the next block's lead met
        # A state saved before blocks ended at epoch boundaries (no "lead" key) names a
        # block that may hold two epochs of a source: re-read it as it was filled then.
        self._legacy_block = state is not None and "lead" not in state
        self._streams: list[SourceStream] = []
        self._at_block_end = True  # state() then reads the cursors of the live streams
        # Inside a block: (skips met before its fill, counter.met when its fill began or,
        # when resumed, ended); state() adds what was met since (its samples' decoding).
        self._block_met: tuple[Counter, Counter] | None = None

    @property
    def index(self) -> int:
        """Raw samples handed out so far (from the start of the run, across resumes)."""
        return self._state.index

    def advance_index(self) -> None:
        """Count a sample handed out for this slot by another stream (an old slot's block
        it adopted, :mod:`data.adopted`): each sample's augmentation seed stays its own."""
        self._state.index += 1

    def state(self) -> dict[str, Any]:
        """The resumable position after the last sample handed out (JSON-ready)."""
        out = asdict(self._state)
        if self._at_block_end and self._streams:
            out["sources"] = [s.cursor().to_dict() for s in self._streams]
        if self._streams:  # (not started: the end as resumed)
            inside = self._state.emitted > 0 and self._state.cut is None
            out["end"] = self._end if inside else None
            out["end_skips"] = self._end_skips if inside else []
        if self._block_met is not None:
            before, mark = self._block_met
            out["skips"] = _skip_list(before + (self.counter.met - mark))
        return out

    def _pick(self, draw: int, active: list[int], base: list[float] | None = None) -> int:
        """The source of mix draw ``draw`` among ``active``, by the weights ``base`` (None:
        the configured ones)."""
        if len(active) == 1:
            return active[0]
        base = self.weights if base is None else base
        u = derive_seed(self.seed, "mix", self.slot, draw) / _U63
        weights = [base[i] * (self._streams[i].share() if self._streams else 1.0)
                   for i in active]
        x, acc = u * sum(weights), 0.0
        for i, w in zip(active, weights, strict=True):
            acc += w
            if x < acc:
                return i
        return active[-1]

    def __iter__(self) -> Iterator[tuple[int, RawSample]]:
        # a resume inside a block cut by a fault goes on from the next block's saved start
        while (yield from self._resumed()):
            pass

    def _resumed(self) -> Generator[tuple[int, RawSample], None, bool]:
        """The samples from the saved state on. True: it stopped at the end of the
        resumed block, a block cut by a fault (``MixState.cut``), with the state at the
        next block's start: resume from it (source streams built again)."""
        st = self._state
        cursors = ([SourceCursor.from_dict(d) for d in st.sources]
                   if st.sources is not None else None)
        self._streams = streams = self.make_sources(cursors)
        iters = [iter(s) for s in streams]
        active = [i for i in range(len(streams)) if i not in st.ended]
        live, skip = st.draws, st.emitted
        start, lead = st.sources, None
        # the block resumed inside was cut by a fault: it is re-read to its saved length
        cut = st.cut if skip > 0 else None
        # what the saved block met before the save (its muted re-read meets it again)
        before = Counter({(source, reason): n for source, reason, n in st.skips})
        # Re-reading what was read before the save (the block's lead, the block up to its
        # emitted samples): set-aside shards wait and a read failing now is retried in
        # place, so the re-read is the read (ShardSchedule.replay).
        replaying = self._replay(streams, skip > 0 or st.lead is not None)
        # Best effort (see _reread_check): met by the muted re-read beyond ``before`` and
        # counted since (a shard missing now); exact until a shard fails for good or goes
        # missing since the save
        reread, recounted, exact = self.counter.met.copy(), Counter(), True
        if st.lead is not None:  # the block opens with a sample read before it began
            muted, self.counter.muted = self.counter.muted, True  # reported before the save
            item = next(iters[st.lead], None)
            self.counter.muted = muted
            lead = (st.lead, item) if item is not None else None
            exact = self._reread_check(streams, reread, before, recounted, exact)
            replaying = self._replay(streams, skip > 0 and exact)
        while active or lead is not None:
            # a block resumed inside is filled to the size it had (the buffer may differ)
            # and drawn with the weights it had (they may differ too)
            size = (st.size or self.block_size) if skip > 0 else self.block_size
            weights = self._block_weights(st.weights if skip > 0 else None)
            if lead is None:  # the block's first sample is drawn in it: from the cursors now
                start = [s.cursor().to_dict() for s in streams] if size > 1 else None
            first, block_no, leader = live, st.block, lead[0] if lead is not None else None
            ended = self._ended(active)  # before the block
            # Re-reading a block whose first samples went out before the checkpoint: what
            # it counts was reported then.
            muted, self.counter.muted = self.counter.muted, skip > 0 or self.counter.muted
            mark, lead_met = self.counter.met.copy(), Counter()
            block = [lead] if lead is not None else []
            # the epoch of each source's samples in this block: a block never holds two
            # epochs of a source, so a slot's share of an epoch is a permutation of it
            epochs: list[int | None] = [None] * len(streams)
            if lead is not None:
                epochs[lead[0]] = streams[lead[0]].reading_epoch()
            lead = next_start = None
            faulted = False
            while active and len(block) < (cut["length"] if cut is not None else size):
                if self.one_block and not exact:
                    break  # (see below: an adopted block is not filled on)
                pick = self._pick(live, active, weights)
                live += 1
                faults = streams[pick].schedule.faults
                item = next(iters[pick], None)
                # A read failed or a set-aside shard was retried while drawing it: which
                # reads came next depended on the clock and on a fault a re-read from the
                # block's start may not meet. The block ends here, so that a resume inside
                # it re-reads what was read (MixState.cut).
                faulted = (size > 1 and not replaying
                           and streams[pick].schedule.faults != faults)
                if skip > 0:  # (muted: a re-read)
                    exact = self._reread_check(streams, reread, before, recounted, exact)
                    replaying = replaying and exact
                if item is None:
                    active.remove(pick)
                    if faulted:  # the next block starts at the cursors now
                        next_start = [s.cursor().to_dict() for s in streams]
                        break
                    continue
                epoch = streams[pick].reading_epoch()
                if faulted or (size > 1 and epochs[pick] not in (None, epoch)
                               and not self._legacy_block):
                    # the first sample of the source's next epoch (or after the fault) opens
                    # the next block; resuming there reads it again from its unit's start
                    lead = (pick, item)
                    next_start = [(s.unit_start() if i == pick else s.cursor()).to_dict()
                                  for i, s in enumerate(streams)]
                    lead_met = streams[pick].met_in_unit()  # re-read with the lead's unit
                    break
                epochs[pick] = epoch
                block.append((pick, item))
            self.counter.muted = muted
            replaying = self._replay(streams, False)
            if self.one_block and not exact:
                # An old slot's block whose re-read met what its first read did not (a
                # shard missing or failing since the save): filled on from the old slot's
                # deal, it read units the re-deal gave other slots (their samples handed
                # out twice). Its rest is dropped instead, said here (what the re-read met
                # was counted by _reread_check).
                # a cut block's length was saved; another may have ended before its size
                # (a source's epoch boundary): only a bound is known then
                bound = "" if cut is not None else "up to "
                log.warning("an adopted shuffle block (old slot %d, block %d) could not be "
                            "re-read as it was first read: its %s%d samples not yet handed "
                            "out are dropped (at most a shuffle buffer; filled on, it would "
                            "read shards other slots were dealt)", self.slot, block_no, bound,
                            max(0, (cut["length"] if cut is not None else size) - skip))
                for stream, it in zip(streams, iters, strict=True):
                    it.close()
                    stream.close()
                return False
            if not exact:  # filled on from other shards: it goes on from the live streams
                cut = None
            # a resumed cut block goes on where the run went on after it (the streams now
            # are where its re-read stopped, without the fault)
            jump = cut is not None
            if faulted:
                cut = {"length": len(block), "draws": live, "sources": next_start,
                       "lead": lead[0] if lead is not None else None,
                       "skips": _skip_list(lead_met), "ended": self._ended(active)}
            if skip > 0:  # a resumed block: ``before`` holds what its re-read just met
                mark = self.counter.met.copy()
            before += recounted  # met by this block's read too (a resume of it mutes them)
            recounted = Counter()
            if cut is not None:  # the next block starts where the run went on
                after = cut
            elif lead is not None:  # the next block opens with the sample read ahead
                after = {"draws": live, "sources": next_start, "lead": lead[0],
                         "skips": _skip_list(lead_met), "ended": self._ended(active)}
            else:  # the next block starts at the live cursors
                after = {"draws": live, "sources": None, "lead": None, "skips": [],
                         "ended": self._ended(active)}
            self._legacy_block = False
            # where this block ends, for a resume on another slot count (MixState.end): the
            # streams stand still while it is handed out; once per block (none of one
            # sample: never saved inside it)
            self._end = (None if len(block) - skip < 2 or cut is not None else
                         after["sources"] or [s.cursor().to_dict() for s in streams])
            self._end_skips = after["skips"] if self._end is not None else []
            order = self._block_order(block_no, len(block), size)
            for j in range(skip, len(block)):
                st.index += 1
                if j + 1 < len(block):  # resuming here re-reads this block from its start
                    st.block, st.emitted, st.draws, st.sources = block_no, j + 1, first, start
                    st.lead, st.size, self._at_block_end = leader, size, False
                    st.weights = weights
                    st.cut, st.ended, self._block_met = cut, ended, (before, mark)
                else:
                    self._next_block(block_no + 1, after)
                yield block[order[j]]
            if len(block) <= skip:  # (nothing re-read to hand out: go on all the same)
                self._next_block(block_no + 1, after)
            if jump or self.one_block:
                for stream, it in zip(streams, iters, strict=True):
                    it.close()  # its open shard
                    stream.close()
                return not self.one_block
            start, skip, cut = next_start, 0, None
            before = lead_met if lead is not None else Counter()
        return False

    def _reread_check(self, streams: list[SourceStream], since: Counter, before: Counter,
                      recounted: Counter, exact: bool) -> bool:
        """After a draw of a muted re-read (a resumed block's lead or fill): whether it is
        still exact. A re-read is muted because the saved block counted what it meets
        (``before``, ``MixState.skips``); what it meets beyond that (``met`` since
        ``since``: a shard missing or damaged since the save; a shard given up once the
        replay ended) nobody counted, so it is counted here, unmuted, and added to
        ``recounted``. Met beyond the saved block, or a schedule whose replay ended on a
        shard failing for good (:meth:`ShardSchedule.replay`), ends the replay of every
        source (their normal policy: set-aside shards retried, faults end blocks), and
        one warning says so. Exactness is lost then, the counts are kept."""
        new = (self.counter.met - since) - before - recounted
        if new:
            muted, self.counter.muted = self.counter.muted, False
            for (source, reason), n in sorted(new.items()):
                if reason in MET_EVENTS:
                    self.counter.event(source, reason, n)
                else:
                    self.counter.skip(source, reason, n)
                self.counter.met[source, reason] -= n  # met once (by the read), counted now
            self.counter.muted = muted
            recounted += new
        if not exact:
            return False
        if new:
            missing = [s.schedule.replay_missing for s in streams
                       if s.schedule.replay_missing is not None]
            log.warning("a resumed shuffle block, re-read, met what its first read did not "
                        "(%s%s; counted now): %s", ", ".join(f"{s} {r} {n}" for (s, r), n in
                                                            sorted(new.items())),
                        f"; shard {redact_url(missing[-1])} missing since the save"
                        if missing else "",
                        "an old slot's block adopted after a resize: its rest is dropped "
                        "(below)" if self.one_block else "it is filled on as a fresh run "
                        "would, so its samples may differ from the uninterrupted run's "
                        "(nothing else changes)")
        elif not any(s.schedule.replay_broken for s in streams):
            return True  # (the schedule that broke off warned)
        self._replay(streams, False)
        return False

    def _ended(self, active: list[int]) -> list[int]:
        return [i for i in range(len(self._streams)) if i not in active]

    def _next_block(self, block: int, start: dict[str, Any]) -> None:
        """The state at ``block``'s start: ``draws``, its first mix draw; ``sources``, the
        cursors there (None: the live ones); ``lead``, the source whose sample opens it;
        ``skips``, what that sample's read met; ``ended``, the sources ended by then."""
        st = self._state
        st.block, st.emitted, st.draws, st.sources = block, 0, start["draws"], start["sources"]
        st.lead, st.size, st.skips, st.cut = start["lead"], None, start["skips"], None
        st.weights = None
        st.ended = start.get("ended", [])
        self._at_block_end, self._block_met = start["sources"] is None, None

    def _block_weights(self, saved: list[float] | None) -> list[float]:
        """The weights a block is drawn with: ``saved``, those a resumed block had (when
        they differ from the configured ones, said once), else the configured ones."""
        if saved is None or list(saved) == self.weights:
            return self.weights
        if len(saved) != len(self.weights):  # other sources: refused before this runs
            raise ValueError(f"the saved shuffle block has {len(saved)} source weights, "
                             f"the run {len(self.weights)}")
        log.warning("source weights changed since the checkpoint (%s -> %s): the shuffle "
                    "block resumed inside is drawn with the old ones, as it was; the new "
                    "ones apply from the next block", saved, self.weights)
        return list(saved)

    @staticmethod
    def _replay(streams: list[SourceStream], on: bool) -> bool:
        for s in streams:
            s.schedule.replay(on)
        return on

    def _block_order(self, block: int, n: int, size: int) -> np.ndarray:
        if size == 1 or n <= 1:
            return np.arange(n)
        return seeded_permutation(derive_seed(self.seed, "block", self.slot, block), n)
