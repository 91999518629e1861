"""Epochs without replacement: which shards each (rank, worker) slot reads, epoch by epoch.

Every epoch of a source deals a seeded permutation of the source's *units* over all slots
of all ranks (``slot = rank * workers + worker``, ``nslots = world_size * workers``) like
cards, starting at a slot that moves on every epoch (:func:`first_slot`); a slot reads its
units in the order dealt. Each unit is therefore read by exactly one slot per epoch,
whatever the slot count, and the permutation (a function of ``(seed, source, epoch)``
alone) changes which slot reads what from one epoch to the next.
A slot that has read its units of epoch ``e`` goes on with its units of epoch ``e + 1``;
each source keeps its own epoch count (a small source turns over faster than a large one).

Sources with fewer shards than slots (YFCC-15M's ~1,500 shards at 4,096 slots) are split,
not drawn less often: each shard becomes ``m = ceil(nslots / shards)`` units, part ``r``
of ``m`` holding the samples whose index in the shard is ``r`` modulo ``m`` (disjoint
sample ranges of one shard, interleaved). Every slot then holds at least one unit of every
source in every epoch, so every slot draws every source by its configured weight all the
time (the realised mix is the configured one, cluster-wide and per slot), and every sample
is still read exactly once per epoch. The price: a part reads the whole shard and keeps
``1/m`` of its samples, so such a source costs ``m`` times its bytes per epoch (YFCC-15M
and CC12M at 4,096 slots: 3 and 4 times; with the H preset's weights 400 : 15 : 12 and
alike bytes per sample, 0.937 + 3 x 0.035 + 4 x 0.028 = 1.154 bytes read per byte
delivered: 15% more reads from the store than without splitting, the price of an exact
mix at every slot).

One-pass streams (evaluation, ``resampled=False`` sources) read epoch ``0`` only, in the
listed order when not shuffled, with one unit per shard (a slot may then have none).

Cost: the permutation of a source is ``O(units)`` integers (44k for the three sources
above), computed once per epoch change of a stream and on resume, never by replay.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from data.state import derive_seed, seeded_permutation


class Unit(NamedTuple):
    """Part ``part`` of ``parts`` of shard number ``shard`` (its samples with index
    ``part`` modulo ``parts``); ``parts == 1``: the whole shard."""

    shard: int
    part: int
    parts: int


def parts_per_shard(shards: int, nslots: int) -> int:
    """How many units each shard of a source is split into so that every slot gets at
    least one unit per epoch: 1 with at least as many shards as slots."""
    if shards < 1 or nslots < 1:
        raise ValueError(f"need at least one shard and one slot, got {shards} shards and "
                         f"{nslots} slots")
    return max(1, math.ceil(nslots / shards))


def epoch_permutation(units: int, seed: int, source: str, epoch: int,
                      shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` of ``source`` deals its ``units`` (identity when
    not ``shuffle``); the same in every process, a function of its arguments only."""
    if not shuffle:
        return np.arange(units, dtype=np.int64)
    return seeded_permutation(derive_seed(seed, "epoch", source, epoch), units).astype(np.int64)


def first_slot(nslots: int, epoch: int, offset: int, stride: int) -> int:
    """The slot dealt position 0 of an epoch: ``offset + epoch * stride`` modulo
    ``nslots``. With ``units`` not a multiple of ``nslots``, the first ``units % nslots``
    slots from there get one unit more; the loader gives each source an ``offset`` past the
    extra units of the sources before it and a ``stride`` of all sources' extra units, so
    extra units go round the slots epoch after epoch instead of always loading the same
    slots (which would then end every epoch last)."""
    return (offset + epoch * stride) % nslots


def deal(units: int, nslots: int, seed: int, source: str, epoch: int, shuffle: bool = True,
         start: int = 0) -> list[np.ndarray]:
    """Epoch ``epoch`` of ``source`` dealt over all slots: entry ``s`` holds the unit ids
    that slot ``s`` reads, in reading order (every unit in exactly one entry); ``start``:
    the slot dealt the first unit (:func:`first_slot`)."""
    order = epoch_permutation(units, seed, source, epoch, shuffle)
    return [order[(slot - start) % nslots::nslots] for slot in range(nslots)]


def slot_units(units: int, nslots: int, slot: int, seed: int, source: str, epoch: int,
               shuffle: bool = True, start: int = 0) -> np.ndarray:
    """Unit ids that ``slot`` reads in epoch ``epoch`` of ``source``, in reading order
    (its entry of :func:`deal`)."""
    if not 0 <= slot < nslots:
        raise ValueError(f"slot {slot} is not in [0, {nslots})")
    order = epoch_permutation(units, seed, source, epoch, shuffle)
    return order[(slot - start) % nslots::nslots]


def extra_offsets(units: list[int], nslots: int) -> tuple[list[int], int]:
    """Per source, the ``offset`` of :func:`first_slot`, and the common ``stride``: the
    sources' extra units (``units % nslots``) laid end to end round the slots."""
    extras = [u % nslots for u in units]
    offsets = [sum(extras[:i]) % nslots for i in range(len(units))]
    return offsets, sum(extras) % nslots


def unit_of(unit_id: int, parts: int) -> Unit:
    """The shard and part of a unit id (``shard * parts + part``)."""
    return Unit(int(unit_id) // parts, int(unit_id) % parts, parts)
