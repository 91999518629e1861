"""Seeds, rank information and the saved position of one rank's loader.

Each (rank, logical worker) stream keeps a constant-size state (:mod:`data.stream`: per
source a cursor into its epoch's shard permutation with the byte offset of the next tar
header, plus the mix draw counter and the shuffle block); batches carry their worker's
state after their last raw sample. The loader records it per worker, with which worker's
batch comes next; a restored pipeline opens each source at its cursor: nothing is replayed.
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
    (one-pass sources; resampled streams never finish a pass); ``stats``: totals so far.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (worker ids as strings, as JSON keys must be)."""
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "workers": self.workers,
                "sources": list(self.sources), "epoch": self.epoch,
                "next_worker": self.next_worker,
                "positions": {str(k): v for k, v in sorted(self.positions.items())},
                "stats": self.stats}

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
                   stats=d.get("stats", {}))

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
