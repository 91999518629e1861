"""Seeds, rank information and the saved position of one rank's loader.

Each (rank, logical worker) stream keeps a constant-size state (:mod:`data.stream`: per
source a cursor into its epoch's shard permutation with the byte offset of the next tar
header, plus the mix draw counter and the shuffle block); batches carry their worker's
state after their last raw sample. The loader records it per worker, with which worker's
batch comes next; a restored pipeline opens each source at its cursor: nothing is replayed.

The cursors index each source's epoch permutations, which are functions of its shard URL
list: the state records every list's length and a short hash (:func:`url_list_digest`),
and a resume whose list changed (a regenerated ``.txt`` list with a shard added or removed)
is refused (:meth:`PipelineState.check_compatible`), since it would silently go on in other
permutations, repeating and skipping samples. States saved before the record existed load
and resume unchecked.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

STATE_VERSION = 2


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, identical in every process and Python run (unlike
    ``hash()`` of strings, which is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def url_list_digest(urls: list[str]) -> list:
    """``[count, hash]`` of a source's shard URLs in their order (16 hex digits of their
    SHA-256): what a saved state keeps to tell that a resume deals the same shards. (44k
    URLs: a few milliseconds, once per loader.)"""
    return [len(urls), hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]]


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else RANK/WORLD_SIZE, else
    a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class PipelineState:
    """The resumable position of one rank's loader (store one per rank).

    ``positions[w]``: the stream state of logical worker ``w`` after its last delivered
    batch (:meth:`data.stream.MixedStream.state`);
    ``next_worker``: the logical worker whose batch comes next; ``epoch``: passes completed
    (one-pass sources; resampled streams never finish a pass); ``stats``: totals so far;
    ``shard_lists``: :func:`url_list_digest` of each source's URLs (None in states saved
    before it was recorded).
    """

    seed: int
    rank: int
    world_size: int
    workers: int
    sources: list[str]
    epoch: int = 0
    next_worker: int = 0
    positions: dict[int, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    shard_lists: list[list] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (worker ids as strings, as JSON keys must be)."""
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "workers": self.workers,
                "sources": list(self.sources), "epoch": self.epoch,
                "next_worker": self.next_worker,
                "positions": {str(k): v for k, v in sorted(self.positions.items())},
                "stats": self.stats, "shard_lists": self.shard_lists}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineState:
        """Inverse of :meth:`to_dict`; rejects states written by another format version."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {d.get('version')!r} is not "
                             f"{STATE_VERSION}; cannot resume the data pipeline from it")
        return cls(seed=d["seed"], rank=d["rank"], world_size=d["world_size"],
                   workers=d["workers"], sources=list(d["sources"]), epoch=d["epoch"],
                   next_worker=d["next_worker"],
                   positions={int(k): v for k, v in d["positions"].items()},
                   stats=d.get("stats", {}), shard_lists=d.get("shard_lists"))

    def check_compatible(self, other: PipelineState) -> None:
        """Raise ValueError naming what differs if ``other`` (the saved state) describes
        different streams than ``self`` (the new loader): exact resume is impossible then."""
        for name in ("seed", "rank", "world_size", "workers", "sources"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(
                    f"data state: saved {name}={theirs!r} but this run has {mine!r}; the "
                    "sample streams differ, so this rank's data position cannot be restored "
                    "alone (another world size or worker count: pass every rank's saved "
                    "state, data.redeal; else start the data pipeline fresh with state=None)")
        self.check_shard_lists(other)

    def changed_sources(self, other: PipelineState) -> list[str]:
        """Sources whose shard list differs between ``self`` and ``other`` (none when
        either state does not record its lists)."""
        if self.shard_lists is None or other.shard_lists is None:
            return []
        return [name for name, mine, theirs in zip(self.sources, self.shard_lists,
                                                   other.shard_lists, strict=True)
                if list(mine) != list(theirs)]

    def check_shard_lists(self, other: PipelineState) -> None:
        """Raise ValueError naming each source whose shard list differs from the one
        ``other`` (the saved state) was dealt from."""
        changed = self.changed_sources(other)
        if not changed:
            return
        lists = dict(zip(self.sources, self.shard_lists, strict=True))
        saved = dict(zip(other.sources, other.shard_lists, strict=True))
        what = "; ".join(f"source {name!r}: saved with {saved[name][0]} shards (list "
                         f"{saved[name][1]}), now {lists[name][0]} (list {lists[name][1]})"
                         for name in changed)
        raise ValueError(
            f"data state: the shard list changed since it was saved ({what}). Each epoch's "
            "order is a permutation of the list, so the saved positions would go on in "
            "another order, repeating and skipping samples. Resume with the list the run "
            "was saved with, or set data.on_shard_list_change=restart to start the data "
            "pipeline afresh over the new lists (its counts kept; the epoch's samples read "
            "so far are read again)")
