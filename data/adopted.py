"""A new slot's stream after a resume on another slot count: first the rest of the old
workers' shuffle blocks it was handed (:func:`data.redeal.redeal`), each finished as the old
worker would have finished it, then its own stream.

An old worker saved inside a shuffle block had handed out part of it; the rest exists only
as that worker's block (its samples drawn by the old slot's mix, permuted by the old slot's
block seed). The new slot that adopts it rebuilds the old worker's stream from the block's
start cursors, re-reads the block muted (what it meets was counted before the save, as on a
same-count resume), skips the samples handed out and hands out the rest; the re-deal takes
the old worker's cursors at the block's end (``MixState.end``), so no unit of the block is
dealt to anyone else. Across the change each sample is handed out once (before, the new
slots read the block's shards again: the part handed out was repeated, up to a shuffle
buffer per old worker, ~10M samples at the H preset's 4,096 slots and buffer 5,000).

**A block that cannot be re-read as it was** (a shard of it missing or failing for good
since the save): its rest is dropped, said in a warning (at most a shuffle buffer). Filled
on from the old slot's deal, as a same-count resume fills on, it read units the re-deal
had given other slots, whose samples were then handed out twice.

**Counts**: the adopted re-read is muted (counted before the save); what reading the next
block's lead met (``MixState.end_skips``) is taken out of the totals instead, since that
unit is re-dealt from its start and read again unmuted (:func:`data.redeal.redeal`).

**Position** (``positions[w]`` of :class:`data.state.PipelineState`): the new slot's own
:class:`data.stream.MixState` plus ``adopted``: the blocks still to finish, each ``{"slot",
"nslots", "epoch", "state"}`` (the old slot, the old slot count, its loader epoch, its
saved :class:`MixState`), the first one with its progress. A resume on the same slot count
goes on inside the adopted block; one on yet another slot count hands the adopted blocks on
as they are (:mod:`data.redeal`).

**Cost**: re-reading a block from its start, as a same-count resume does (at most
``shuffle_buffer`` raw samples per adopted block, about one per new slot); a saved position
holds the adopted blocks' states until they are done (a few hundred bytes each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from data.sources import RawSample
from data.stream import MixedStream


class AdoptingStream:
    """``(source id, raw sample)`` of a new slot: the adopted old blocks in order, then
    ``own`` (its :class:`MixedStream`), with one position (:meth:`state`) and one sample
    count (:attr:`index`) over both. ``open_block(entry)`` builds an adopted block's
    stream (a :class:`MixedStream` with ``one_block=True`` on the old slot's deal)."""

    def __init__(self, own: MixedStream, adopted: list[dict[str, Any]],
                 open_block: Callable[[dict[str, Any]], MixedStream]):
        self.own, self.open_block = own, open_block
        self._pending = [dict(entry) for entry in adopted]
        self._current: MixedStream | None = None

    @property
    def index(self) -> int:
        """Raw samples handed out by this slot (the adopted ones included)."""
        return self.own.index

    def state(self) -> dict[str, Any]:
        """The resumable position after the last sample handed out (JSON-ready)."""
        out = self.own.state()
        pending = self._pending
        if self._current is not None:
            # (its end is of no use to this slot: see data.redeal)
            now = self._current.state() | {"end": None, "end_skips": []}
            # after the block's last sample its state is the next block's start: done
            pending = ([{**pending[0], "state": now}] if now["emitted"] else []) + pending[1:]
        if pending:
            out["adopted"] = pending
        return out

    def __iter__(self) -> Iterator[tuple[int, RawSample]]:
        while self._pending:
            if self._pending[0]["state"]["emitted"]:  # (a finished block is not reopened)
                self._current = self.open_block(self._pending[0])
                for item in self._current:
                    self.own.advance_index()
                    yield item
            self._current = None
            self._pending.pop(0)
        yield from self.own
