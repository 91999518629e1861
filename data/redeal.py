"""Resume on another slot count (ranks x workers): what the old slots left of the current
epochs, re-dealt over the new slots, at shard granularity.

The saved per-slot cursors (:class:`data.stream.SourceCursor`) say, per source, which units
(shards, or parts of shards) of each epoch a slot has finished, which one it is inside (at
which byte offset) and which it set aside after a failed read. For each source, with
``E`` the oldest epoch any old slot is still in and ``L`` the newest one any slot reached,
the units of epochs ``E`` .. ``L`` that no old slot finished are dealt round the new slots
(epoch by epoch, keeping the old permutation's order); each new slot reads its entries
first, then goes on with the ordinary deal of epoch ``L + 1`` over the new slot count
(:mod:`data.epochs`); a one-pass source, the pass in progress only (see below). So every
unit of those epochs is read exactly once across the change:

- a unit an old slot was inside goes on at its saved byte offset (nothing of it repeated);
- nothing is skipped;
- nothing is repeated: each old worker inside a shuffle block hands it to one new slot,
  which finishes it as the old worker would have (:mod:`data.adopted`: the block re-read
  from its start cursors, muted, its handed-out samples skipped); the re-deal starts from
  the cursors at the block's end (``MixState.end``, or ``cut["sources"]``), so none of the
  block's units is dealt to anyone else. About one block per new slot, read before its own
  share.

**States saved before the block's end was kept** re-deal from the block's start: the
samples of each old worker's current block already handed out are read again, at most
``shuffle_buffer`` per old worker (~10M at the H preset's 4,096 slots and buffer 5,000),
logged and returned as ``repeated``. So are the samples a one-pass rank had handed out of
the pass after the one going on (below).

**Skip counts of those blocks** (such older states). Whatever an old worker counted from
its block's start (a missing or cut shard, lost samples, an undecodable image of a sample
handed out, the ``unread_bytes`` of a damaged shard, the ``unknown_tags`` and
``malformed_tags`` of the samples handed out: :data:`data.stats.MET_EVENTS`) the new slots
count again as they read the same shards. A resume on the same slot count (and an adopted
block) mutes its re-read of the block; the new slots cannot tell the block's samples from
the rest of their shards, so the skips (and those events) each old worker's state says its
block met (:class:`data.stream.MixState` ``skips``) are taken out of the totals instead
(:func:`resized_state`), to be counted once more by the re-read: totals end up those of a
run that never changed its slot count. Nothing of it goes to the new slots' positions.

Units keep the split they were dealt with (their key names ``#part/parts``), so a source
read in parts under the old slot count is finished in the same parts.

**Set-aside units** (a failed read waiting for its retry, at the cursor where it broke)
are re-dealt as units of the epoch they were dealt in, saved with them (the ``aside``
entry's ``epoch`` field, :class:`data.stream.SourceCursor`), and so are the reads of
them owed to later epochs (``owed``: the slot was dealt the shard again before the retry
was done; one short entry each, rare, at most :data:`data.stream.MAX_OWED` per set-aside
unit): a slot whose draws of epoch ``e``
ran out before the retry was due goes on into ``e + 1`` with the unit still owed to
``e``. Filed under the slot's epoch instead (as states saved before the field still are),
the unit's rest was read as one of ``e + 1``: after every unit of ``e``, in an epoch
``e + 1`` shuffle block, and not by the counting epoch (its damage never counted when
``e`` counts losses), or not at all when an old slot had dropped its shard. Cost: one
integer per set-aside unit (3-4 bytes of JSON, none without such units; the 4,096-slot
benchmark's states are byte for byte what they were), plus at most ``MAX_OWED`` owed
entries of ~10-15 bytes per set-aside unit: nothing that grows with the run (before the
cap, a shard breaking on every read of a slot whose epochs were shorter than the retry
cooldown owed one more read per epoch, without limit).

**One-pass sources** (not resampled: evaluation, a finite pass per loader iteration). A
slot's stream ends with its share of the pass, and the loader deals the next pass afresh
when it is iterated again. So only what the old slots left of the pass in progress ``P`` is
re-dealt (never units of ``P + 1``: they would be read inside pass ``P``, then again in
pass ``P + 1``), and the new slots go on with pass ``P``. ``P`` is the oldest pass of any
old rank: a rank that finished its pass saved the next one's start (its ``epoch`` one
more, no positions) while others were still in it; its slots have nothing left of ``P``.
A slot with no saved position starts at its own rank's pass (before, every such slot took
rank 0's: a finished rank's share was dealt and read again, a rank not yet started lost
its share when rank 0 had finished). A rank that had gone on into pass ``P + 1`` (its
loader iterated again before the others ended ``P``) is not carried: after pass ``P`` the
new slots deal ``P + 1`` afresh, so what it had handed out of it is read again (added to
the repeated count and logged). Losses are counted by the reads of pass ``P`` (a one-pass
stream counts those of its own pass).

**Fault state.** New cursors start with no dropped or damaged keys (a slot's record of
the shards it found missing, unreadable or gave up, and of those whose damage it met). A
cursor consults them only for a unit it draws: to skip it, and to not count its loss again.

- Units of epochs after the counting one (``count_epoch``, at most ``E``: every slot starts
  in it) whose shard any old slot dropped are not re-dealt; no read of them would count.
- Units of the counting epoch are re-dealt whatever the old slots found: each is dealt to
  one slot in that epoch, and that read is the one that counts what its shard loses. An
  old slot that met the shard in a later epoch counted nothing (its keys, carried to the
  new slot, used to keep the loss from ever being counted); one that counted it in the
  counting epoch finished that unit, so it is not left to re-deal.
- In the epochs after the change each slot meets a missing or broken shard by itself, as
  in a run that never changed its slot count: one failed open (or, for a shard given up,
  the retries that tell a dead shard from a dead store), counting nothing.

Every old slot's keys used to be given to every new slot: ``new slots x bad shards`` of
state. At 512 x 8 slots with 500 of 41k shards missing that was 150 MB in every checkpoint
and every batch's cursor (334 KB per rank), and 21 s of every new rank's resume.

**Cost** (the H preset: 41,408 + 1,500 + 1,243 shards, 4,096 old slots -> 3,584): every
new rank runs :func:`redeal` over every old slot's cursors (one permutation per source and
epoch concerned, shared by all old slots) and builds the positions of its own slots only
(:func:`resized_state`): measured 0.6-0.8 s and 12 MB per rank (11-21 s and 26-110 MB
when each old slot recomputed its permutation and every rank built all 3,584 positions),
each rank's state ~11 KB with or without missing shards.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.epochs import deal as deal_units
from data.epochs import extra_offsets, first_slot, parts_per_shard
from data.state import (
    PipelineState,
    check_permutations,
    check_seed,
    derive_seed,
    unit_key,
    url_list_digest,
)
from data.stats import DataStats
from data.stream import SourceCursor

log = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    """How a source is dealt: its name, shard URLs, and whether it runs epochs forever
    (``resampled``) in a seeded order (``shuffle``)."""

    name: str
    urls: list[str]
    resampled: bool = True
    shuffle: bool = True


@dataclass
class Redeal:
    """The outcome for the new slots asked for: ``positions[slot]`` (a :class:`MixedStream`
    state), and what the change costs over all new slots: ``units[source]`` re-dealt,
    ``resumed[source]`` of them at a byte offset, ``repeated`` samples (already handed out,
    read again), ``recounted``: ``[source, reason, n]`` skips (and unread bytes) the old
    workers counted in their current blocks, which the re-read counts again (states saved
    before ``MixState.end`` was kept); ``adopted``: old shuffle blocks handed on whole to
    new slots (:mod:`data.adopted`), ``kept`` the samples already handed out of them (not
    repeated); ``epoch``:
    the loader epoch (pass) the new slots go on with; ``ahead``: old ranks that had begun
    a later pass than it (see the module docstring on one-pass sources)."""

    positions: dict[int, dict[str, Any]]
    epoch: int = 0
    ahead: list[int] = field(default_factory=list)
    units: dict[str, int] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)
    repeated: int = 0
    recounted: list[list] = field(default_factory=list)
    adopted: int = 0
    kept: int = 0


def _key(urls: list[str], unit_id: int, parts: int) -> str:
    shard, part = divmod(int(unit_id), parts)
    return unit_key(urls, shard, part, parts)


class _OldDeal:
    """The deal of one source under the old slot count (what each old slot was given)."""

    def __init__(self, spec: SourceSpec, nslots: int, seed: int, offset: int, stride: int):
        self.spec, self.nslots, self.seed = spec, nslots, seed
        self.offset, self.stride = offset, stride
        self.parts = parts_per_shard(len(spec.urls), nslots) if spec.resampled else 1
        self._dealt: dict[int, list[np.ndarray]] = {}

    def share(self, slot: int, epoch: int) -> list[str]:
        """Keys old ``slot`` was dealt in ``epoch``, in reading order."""
        # One permutation per epoch for all old slots: computed per slot, as a stream
        # does for itself, it cost 4,096 permutations of 41k units per epoch (~6 s of
        # every new rank's resume at the H preset's scale).
        dealt = self._dealt.get(epoch)
        if dealt is None:
            start = first_slot(self.nslots, epoch, self.offset, self.stride)
            dealt = self._dealt[epoch] = deal_units(
                len(self.spec.urls) * self.parts, self.nslots, self.seed, self.spec.name,
                epoch, self.spec.shuffle, start)
        return [_key(self.spec.urls, u, self.parts) for u in dealt[slot]]


def _entries(c: SourceCursor, deal: _OldDeal, slot: int) -> tuple[list[list], int]:
    """``[epoch, key, *start]`` of this slot's share from its current epoch on, and the
    epoch after it: the entries before ``position`` are started, the rest not."""
    if c.share is not None:
        return [list(e) for e in c.share], c.share_last + 1
    return [[c.epoch, k] for k in deal.share(slot, c.epoch)], c.epoch + 1


def _aside_epoch(entry: list, default: int) -> int:
    """The epoch a set-aside unit was dealt in (its ``aside`` entry's last field), or
    ``default`` for states saved before it was kept."""
    return entry[5] if len(entry) > 5 and entry[5] is not None else default


def _in_progress(c: SourceCursor, unit_epoch: int, aside_epoch: int) -> list[list]:
    """The unit ``c`` is inside and the units it set aside, each an entry of the epoch it
    was dealt in (saved with a set-aside unit; else ``unit_epoch`` for the unit inside,
    ``aside_epoch`` for the units set aside) with ``offset, samples, compressed, version``
    appended (no version in states saved before it); then the reads of set-aside units
    the slot was dealt again meanwhile (the ``aside`` entry's ``owed``: entries of their
    own epochs, whole or at an old slot's offset)."""
    out = []
    if c.unit is not None:  # it goes on at its byte offset (a retry: of its own epoch)
        epoch = _aside_epoch(c.aside[c.unit], unit_epoch) if c.unit in c.aside else unit_epoch
        out.append([epoch, c.unit, c.offset, c.samples, c.compressed, c.version])
    for key, entry in c.aside.items():
        if key == c.unit:  # being retried: the unit entry above has the newer offset
            continue
        offset, samples, compressed, _failures, *version = entry
        out.append([_aside_epoch(entry, aside_epoch), key, offset, samples, compressed,
                    *version[:1]])
    for key, entry in c.aside.items():
        out.extend([epoch, key, *start] for epoch, *start in (entry[6] if len(entry) > 6
                                                               else []))
    return out


def _left_of_pass(cursors: list[SourceCursor], deal: _OldDeal, epoch: int) -> list[list]:
    """A one-pass source: the entries of pass ``epoch`` that no old slot finished, as
    :func:`_left` gives them. A slot whose cursor is in a later pass (its rank ended pass
    ``epoch``) has none left; nothing of a later pass is taken (the loader deals it afresh
    when it gets there)."""
    left: list[list] = []
    for slot, c in enumerate(cursors):
        if c.epoch != epoch:
            continue
        entries, _ = _entries(c, deal, slot)
        # a one-pass stream's set-aside units are of its one pass, even once its draws
        # ran out (where _left would take the slot as in the next epoch)
        left.extend([epoch, *e[1:]] for e in _in_progress(c, epoch, epoch))
        # (a share re-dealt before this rule may hold units of the next pass: not taken)
        left.extend(e for e in entries[c.position:] if e[0] == epoch)
    return left


def _left(cursors: list[SourceCursor], deal: _OldDeal
          ) -> tuple[dict[int, list[list]], int, int]:
    """Per epoch, the entries ``[epoch, key]`` no old slot finished (in slot order, each
    slot's in its reading order), with ``offset, samples, compressed, version`` appended
    for units an old slot was inside or set aside (no version in states saved before it);
    the first and last epoch concerned.

    A set-aside unit is an entry of the epoch it was dealt in (saved with it), which may
    be before the epoch its slot is in: its retry was still due when the slot's draws of
    that epoch ran out. Filed under the slot's epoch instead (states saved before the
    epoch was kept), its rest was read as a unit of the next epoch: after every unit of
    its own, not counting its losses in the counting epoch, and left out when an old slot
    had dropped its shard."""
    current, tails, progress = [], [], []
    for slot, c in enumerate(cursors):
        entries, after = _entries(c, deal, slot)
        started = entries[:c.position]
        now = started[-1][0] if started else (entries[0][0] if entries else after)
        if c.position >= len(entries) and c.unit is None:
            now = after
        current.append(now)
        tails.append((entries, after))
        progress.append(_in_progress(c, started[-1][0] if started else now, now))
    own = [entry[0] for entries in progress for entry in entries]
    # a re-dealt share's entries not yet read reach its last epoch: before, with every slot
    # still in its share's earlier epochs, those were left out and their epoch dealt
    # afresh after the change, its units the old slots had read (or begun) read again
    own += [entries[-1][0] for (entries, _), c in zip(tails, cursors, strict=True)
            if c.share is not None and c.position < len(entries)]
    first, last = min(current + own), max(current + own)
    left: dict[int, list[list]] = {e: [] for e in range(first, last + 1)}
    for slot, c in enumerate(cursors):
        entries, after = tails[slot]
        for entry in progress[slot]:
            left[entry[0]].append(entry)
        for entry in entries[c.position:]:
            left.setdefault(entry[0], []).append(entry)
        for epoch in range(after, last + 1):  # epochs this slot had not reached
            left.setdefault(epoch, []).extend([epoch, k] for k in deal.share(slot, epoch))
    return left, first, last


def redeal_source(cursors: list[SourceCursor], spec: SourceSpec, old_nslots: int,
                  new_nslots: int, seed: int, offset: int = 0, stride: int = 0,
                  pass_epoch: int | None = None) -> tuple[list[SourceCursor], int, int]:
    """New cursors (one per new slot) for one source from the old slots' ``cursors``
    (``offset``/``stride``: the old deal's, :func:`data.epochs.extra_offsets`); also the
    number of units re-dealt and of units resumed at a byte offset. ``pass_epoch``: for a
    one-pass source, the pass in progress (default: the oldest epoch of the cursors)."""
    if len(cursors) != old_nslots:
        raise ValueError(f"source {spec.name!r}: {len(cursors)} saved cursors for "
                         f"{old_nslots} old slots")
    deal = _OldDeal(spec, old_nslots, seed, offset, stride)
    if spec.resampled:
        left, first, last = _left(cursors, deal)
        # the epoch whose reads count losses stays the run's (every old slot has the same)
        counting = min((c.count_epoch for c in cursors if c.count_epoch is not None),
                       default=None)
    else:  # one pass: its own reads count its losses (the stream's first_epoch)
        first = last = counting = (min(c.epoch for c in cursors) if pass_epoch is None
                                   else pass_epoch)
        left = {first: _left_of_pass(cursors, deal, first)}
    dropped = {k for c in cursors for k in c.dropped}  # a set: tested for every entry
    shares: list[list[list]] = [[] for _ in range(new_nslots)]
    turn = 0  # extra units go round the new slots epoch after epoch
    for epoch in range(first, last + 1):
        # a unit of the counting epoch left unread is read even if an old slot dropped its
        # shard meanwhile (in a later epoch, counting nothing): its read counts the loss
        entries = [e for e in left.get(epoch, []) if epoch == counting or e[1] not in dropped]
        for i, entry in enumerate(entries):
            shares[(turn + i) % new_nslots].append(entry)
        turn = (turn + len(entries)) % new_nslots
    total = sum(len(s) for s in shares)
    resumed = sum(len(e) > 2 for share in shares for e in share)
    # no fault state: see the module docstring (it made the state new slots x bad shards)
    out = [SourceCursor(epoch=first, share=share, share_last=last, share_total=total,
                        count_epoch=counting)
           for share in shares]
    return out, total, resumed


def merge_stats(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ranks' stats totals (:meth:`data.stats.DataStats.to_dict`) summed."""
    out: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = merge_stats([out.get(key, {}), value]) if isinstance(value, dict) \
                else out.get(key, 0) + value
    return out


def redeal(saved: list[dict[str, Any]], specs: list[SourceSpec], world_size: int,
           workers: int, seed: int, slots: range | None = None) -> Redeal:
    """The positions of new ``slots`` (default: all ``world_size`` x ``workers``) from
    every old rank's saved :meth:`PipelineState.to_dict` (``saved[rank]``). The deal is
    computed over all slots either way; ``slots`` only saves building the positions of
    other ranks' slots. Raises ValueError naming what differs if the streams themselves
    changed."""
    states = [PipelineState.from_dict(s) for s in saved]
    old = states[0]
    names = [s.name for s in specs]
    lists = [url_list_digest(sp.urls) for sp in specs]
    for st in states:
        check_seed(st.seed, seed)
        check_permutations(st.permutations)
        if st.sources != names:
            raise ValueError(f"data state: saved sources={st.sources} but this run has "
                             f"sources={names}; the sample streams differ")
        # the old deal is rebuilt from the lists: it must be the one the cursors index
        PipelineState(seed, 0, 1, 1, names, shard_lists=lists).check_shard_lists(st)
    if len(states) != old.world_size:
        raise ValueError(f"data state: {len(states)} ranks saved, expected {old.world_size}")
    old_nslots, new_nslots = old.world_size * old.workers, world_size * workers
    # Ranks differ in epoch only when every stream is one pass (an endless loader never
    # ends its iteration): a rank that ended the pass saved the next one's start. The
    # new slots go on with the oldest; see the module docstring.
    result = Redeal(positions={}, epoch=min(st.epoch for st in states))
    result.ahead = [st.rank for st in states if st.epoch > result.epoch and st.positions]
    mixes = [st.positions.get(w, {}) for st in states for w in range(old.workers)]
    # a slot with no position yet is at its own rank's epoch start (not rank 0's)
    epochs = [st.epoch for st in states for _ in range(old.workers)]
    if any(m and m.get("sources") is None for m in mixes):
        raise ValueError("data state: a worker's saved position has no source cursors")
    # Each old worker inside a shuffle block of the pass going on hands the block to one
    # new slot (data.adopted), which finishes it; the re-deal goes on from the block's end.
    # States saved before the block's end was kept: from its start (its shards read again,
    # the part handed out repeated, its skips taken out of the totals).
    adopted: list[dict[str, Any]] = []
    starts: list[list[dict[str, Any]] | None] = []
    legacy: list[dict[str, Any]] = []
    withdrawn: list[list] = []
    for slot, (m, e) in enumerate(zip(mixes, epochs, strict=True)):
        adopted += m.get("adopted", [])  # blocks an earlier re-deal handed to this slot
        end = _block_end(m) if e == result.epoch else None
        if end is not None:
            # (the block's end is of no more use to the slot that finishes it)
            adopted.append({"slot": slot, "nslots": old_nslots, "epoch": e,
                            "state": {k: v for k, v in m.items() if k != "adopted"}
                            | {"end": None, "end_skips": []}})
        elif m and m.get("emitted") and e == result.epoch:
            legacy.append(m)
        # what was met and counted before the position the re-deal goes on from, which a
        # new slot reads again unmuted: a lead's unit read from its start (the block's end,
        # or a position at a block's start), or a legacy block's whole read
        withdrawn.extend(_met_again(m, end is not None))
        starts.append(end if end is not None else (m["sources"] if m else None))
    per_source: list[list[SourceCursor]] = []
    units = [len(sp.urls) * (parts_per_shard(len(sp.urls), old_nslots) if sp.resampled else 1)
             for sp in specs]
    offsets, stride = extra_offsets(units, old_nslots)
    for i, spec in enumerate(specs):
        cursors = [SourceCursor.from_dict(c[i]) if c is not None else SourceCursor(epoch=e)
                   for c, e in zip(starts, epochs, strict=True)]
        new, n, resumed = redeal_source(cursors, spec, old_nslots, new_nslots, seed,
                                        offsets[i], stride, pass_epoch=result.epoch)
        per_source.append(new)
        result.units[spec.name], result.resumed[spec.name] = n, resumed
    # a rank in a later pass: all it handed out of it (``index``) is read again
    result.repeated = sum(m.get("index", 0) for m, e in zip(mixes, epochs, strict=True)
                          if m and e > result.epoch)
    result.repeated += sum(m["emitted"] for m in legacy)
    result.adopted = len(adopted)
    result.kept = sum(entry["state"]["emitted"] for entry in adopted)
    recounted: Counter[tuple[str, str]] = Counter()
    for source, reason, n in withdrawn:
        recounted[source, reason] += n
    result.recounted = [[source, reason, n] for (source, reason), n in sorted(recounted.items())]
    draws = max((m.get("draws", 0) for m in mixes if m), default=0)
    index = max((m.get("index", 0) for m in mixes if m), default=0)
    for slot in range(new_nslots) if slots is None else slots:
        # a fresh block numbering and mix draws past any old slot's (new seeds, no reuse)
        result.positions[slot] = {"block": derive_seed(seed, "redeal", new_nslots, slot) % 2**31,
                                  "emitted": 0, "draws": draws, "index": index, "lead": None,
                                  "sources": [per_source[i][slot].to_dict()
                                              for i in range(len(specs))]}
        mine = adopted[slot::new_nslots]  # round the new slots, in old slot order
        if mine:
            result.positions[slot]["adopted"] = mine
    return result


def _met_again(m: dict[str, Any], adopted: bool) -> list[list]:
    """``[source, reason, n]`` a saved position counted that the new slots meet again: an
    adopted block's re-read is muted by the slot that adopts it, but not the read of the
    next block's lead (its unit is re-dealt from its start: ``end_skips``, or the cut's);
    any other position, its ``skips`` (a block start's lead; a block of a state saved
    before its end was kept)."""
    if not m:
        return []
    if adopted:
        return m["cut"].get("skips", []) if m.get("cut") else m.get("end_skips", [])
    return m.get("skips", [])


def _block_end(m: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The source cursors where the shuffle block a saved position is inside ended (the
    next block's start), None outside a block or in states saved before it was kept."""
    if not m or not m.get("emitted"):
        return None
    return m["cut"]["sources"] if m.get("cut") else m.get("end")


def resized_state(saved: list[dict[str, Any]], specs: list[SourceSpec], rank: int,
                  world_size: int, workers: int, seed: int) -> PipelineState:
    """This rank's :class:`PipelineState` after :func:`redeal`, logging (on rank 0) what
    the change re-deals, resumes at a byte offset and repeats. Stats totals of every old
    rank go to rank 0 (so their sum over ranks stays the run's total), less the skips of
    the old workers' current blocks (:attr:`Redeal.recounted`: the new slots count them
    again)."""
    old = PipelineState.from_dict(saved[0])
    out = redeal(saved, specs, world_size, workers, seed,
                 slots=range(rank * workers, (rank + 1) * workers))
    if rank == 0:
        for name in out.units:
            log.warning("data: resuming %d ranks x %d workers on %d x %d: source %r: %d "
                        "unfinished units of the current epoch(s) re-dealt over the new slots "
                        "(%d continue at their saved byte offset), none skipped",
                        old.world_size, old.workers, world_size, workers, name,
                        out.units[name], out.resumed[name])
        if out.ahead:
            log.warning("data: old rank(s) %s had begun pass %d while others were still in "
                        "pass %d: the new ranks finish pass %d, then deal pass %d afresh, so "
                        "what those ranks read of it is read (and its losses counted) again",
                        out.ahead, out.epoch + 1, out.epoch, out.epoch, out.epoch + 1)
        # what those blocks counted, named only when there is any (it printed "[]")
        counts = ", ".join(f"{source} {reason}: {n}" for source, reason, n in out.recounted)
        withdrawn = (f"; what they counted there ({counts}) is taken out of the totals, to "
                     "be counted again" if counts else "")
        if out.adopted:
            log.warning("data: %d shuffle blocks the old workers were inside are finished by "
                        "new slots (the %d samples handed out of them are not repeated)",
                        out.adopted, out.kept)
        log.warning("data: %d samples repeated across the change (handed out from the old "
                    "workers' current shuffle blocks, which are read again%s)", out.repeated,
                    withdrawn)
    positions = {w: out.positions[rank * workers + w] for w in range(workers)}
    stats: dict[str, Any] = {}
    if rank == 0:
        totals = DataStats.from_dict(merge_stats([PipelineState.from_dict(s).stats
                                                  for s in saved]))
        totals.withdraw(out.recounted)
        stats = totals.to_dict()
    return PipelineState(seed, rank, world_size, workers, [s.name for s in specs],
                         epoch=out.epoch, next_worker=0, positions=positions, stats=stats,
                         shard_lists=[url_list_digest(s.urls) for s in specs])
