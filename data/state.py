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
and resume unchecked. A source added or removed since the save is refused likewise (the
position is one cursor per saved source), naming it; the loader's
``on_shard_list_change=restart`` starts afresh in both cases (:meth:`changed_sources`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from runtime.redact import has_credential, redact_url

STATE_VERSION = 2


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, identical in every process and Python run (unlike
    ``hash()`` of strings, which is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=1024)  # a decoded sample names its shard: one look a shard
def shard_name(url: str) -> str:
    """How a saved state names shard ``url``: the URL itself, or, when it holds a
    credential (which a ``.txt`` shard list may: the config refuses them), a name without
    it: a URL without its user info and its signing parameters (SigV4's ``X-Amz-*``, an
    Azure SAS's ``sig``/``se``/``sp``..., V2's ``Expires``/``Signature``: all change when
    the list is signed again; the rest of the query, which may name the object, stays), a
    ``pipe:`` command redacted
    (:func:`runtime.redact.redact_url`). A checkpoint is copied, shared and archived, and
    a SigV4 signature lasts up to 7 days, an Azure SAS token years."""
    if not has_credential(url):
        return url
    if url.startswith("pipe:"):
        return redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL urllib can split ("http://[::1" ...): redacted then
        return redact_url(url)
    # what names the object stays (``?file=a.tar``): only signing parameters go
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in _SIGNING and not k.lower().startswith(("x-amz-", "x-goog-"))
            and not has_credential(f"?{k}={v}")]
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path,
                       urlencode(kept), ""))


# Query parameters of signed URLs that change when a URL is signed again (besides the
# X-Amz-*/X-Goog-* families and what redact_url names): Azure SAS (Azure Storage docs,
# "Create a service SAS": sv, ss, srt, sp, se, st, spr, sig, sr, si, skoid, ...), S3/GCS
# V2 query-string auth (AWSAccessKeyId/GoogleAccessId, Expires, Signature), CloudFront
# (Policy, Key-Pair-Id)
_SIGNING = {"sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "sdd", "skoid",
            "sktid", "skt", "ske", "sks", "skv", "awsaccesskeyid", "googleaccessid",
            "expires", "signature", "policy", "key-pair-id"}


def unit_key(urls: list[str], shard: int, part: int = 0, parts: int = 1) -> str:
    """The key of part ``part`` of ``parts`` of shard ``urls[shard]`` in cursors, logs and
    the fault policy: its URL (``url#part/parts`` when split); a URL that holds a credential
    by its :func:`shard_name` and its index in the list (``name#@index``), which the list's
    digest pins (:func:`url_list_digest`; :func:`key_url` reads it back)."""
    url = urls[shard]
    name = url if not has_credential(url) else f"{shard_name(url)}{INDEXED}{shard}"
    return name if parts == 1 else f"{name}#{part}/{parts}"


INDEXED = "#@"  # a key's name part ends with it and the shard's index: see unit_key


def key_url(urls: list[str], name: str) -> str:
    """The URL the name part of a unit key (before any ``#part/parts``) reads: the key's
    own for a URL without a credential, else ``urls`` at the index it ends with (only
    where that URL's name is the key's: a URL that itself ends in ``#@<digits>`` is its
    own key)."""
    head, sep, index = name.rpartition(INDEXED)
    if sep and index.isdigit() and int(index) < len(urls):
        url = urls[int(index)]
        if has_credential(url) and shard_name(url) == head:
            return url
    return name


def url_list_digest(urls: list[str]) -> list:
    """``[count, hash]`` of a source's shard names (:func:`shard_name`) in their order (16
    hex digits of their SHA-256): what a saved state keeps to tell that a resume deals the
    same shards. A list signed again with fresh credentials (presigned URLs expire in days,
    a run lasts weeks) is the same list. (44k URLs: ~0.3 s, once per loader.)"""
    names = "\n".join(shard_name(u) for u in urls)
    return [len(urls), hashlib.sha256(names.encode()).hexdigest()[:16]]


def raw_list_digest(urls: list[str]) -> list:
    """:func:`url_list_digest` as states saved before shards were named without their
    credentials computed it: over the URLs themselves."""
    return [len(urls), hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]]


def legacy_naming(urls: list[str], digest: list) -> tuple[list, dict[str, str]] | None:
    """How states saved before shards that hold a credential were named without it
    (:func:`unit_key`) recorded this list (``urls``, today's ``digest``): (its
    :func:`raw_list_digest`, old key -> today's key), computed once per list; None where
    the two namings agree (no URL of the list holds a credential: one SHA-256 of the list
    tells, no URL is scanned)."""
    raw = raw_list_digest(urls)
    if list(raw) == list(digest):
        return None
    return raw, {u: unit_key(urls, j) for j, u in enumerate(urls) if has_credential(u)}


def upgrade_state(d: dict[str, Any],
                  legacy: dict[str, tuple[list, list, dict[str, str]]]) -> dict[str, Any]:
    """A saved state (:meth:`PipelineState.to_dict`) in today's naming: where it recorded a
    source's list by its raw digest, saved before shards that hold a credential were
    named without it, its digest is replaced and every key naming such a shard by its URL
    renamed, so that a run saved by that version resumes as before. ``legacy``: source
    name -> (raw digest, today's digest, renaming), for the lists :func:`legacy_naming`
    found one for (a re-deal upgrades every old rank's state: the renaming is built once).
    ``d`` itself when nothing differs."""
    digests = list(d.get("shard_lists") or [])
    renames: dict[int, dict[str, str]] = {}  # saved source index -> its own keys' renaming
    for i, name in enumerate(d.get("sources", [])[:len(digests)]):
        if name in legacy and list(digests[i]) == list(legacy[name][0]):
            digests[i], renames[i] = legacy[name][1], legacy[name][2]
    if not renames:
        return d
    # a position holds one cursor per source, by index (data.stream.MixState: ``sources``,
    # and ``cut["sources"]`` inside a block a fault cut): each renamed by its own list
    positions = {}
    for worker, position in d["positions"].items():
        position = dict(position)
        for holder in (position, position.get("cut")):
            if holder and holder.get("sources") is not None:
                holder["sources"] = [_renamed(c, renames[i]) if i in renames else c
                                     for i, c in enumerate(holder["sources"])]
        positions[worker] = position
    return {**d, "shard_lists": digests, "positions": positions}


def _renamed(obj: Any, rename: dict[str, str]) -> Any:
    """``obj`` (a saved position, JSON) with every string that is a key of ``rename``, or
    such a key with a ``#part/parts`` suffix, renamed; dict keys alike."""
    if isinstance(obj, str):
        if obj in rename:
            return rename[obj]
        name, sep, tail = obj.rpartition("#")
        return f"{rename[name]}#{tail}" if sep and name in rename and "/" in tail else obj
    if isinstance(obj, list):
        return [_renamed(x, rename) for x in obj]
    if isinstance(obj, dict):
        return {_renamed(k, rename): _renamed(v, rename) for k, v in obj.items()}
    return obj


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else RANK/WORLD_SIZE, else
    a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def seeded_permutation(seed: int, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` drawn from ``seed`` (numpy's PCG64 and
    ``Generator.permutation``): every shard order and shuffle block of the pipeline.

    numpy keeps the PCG64 bit stream stable, not the algorithms of ``Generator``'s
    methods (NEP 19, "Random number generator policy": they may change between releases).
    A requeue on a node image with another numpy could then deal other permutations
    under the same saved position, repeating and skipping samples without a word: a saved
    state records :func:`permutation_fingerprint`, and a resume refuses another one."""
    return np.random.Generator(np.random.PCG64(seed)).permutation(n)


@functools.cache
def permutation_fingerprint() -> list[str]:
    """``[numpy version, hash]``: 16 hex digits of a fixed permutation of 1,009 elements
    by :func:`seeded_permutation`, what this numpy deals (computed once per process)."""
    order = seeded_permutation(derive_seed("fingerprint"), 1009).astype(np.int64)
    return [np.__version__, hashlib.sha256(order.tobytes()).hexdigest()[:16]]


def check_permutations(saved: list[str] | None) -> None:
    """Raise ValueError (one line) when a state's :func:`permutation_fingerprint` is not
    this process's (None: saved before it was recorded, unchecked)."""
    mine = permutation_fingerprint()
    if saved is not None and saved[1] != mine[1]:
        raise ValueError(
            f"data state: numpy {mine[0]} permutes the shards differently from numpy "
            f"{saved[0]}, which saved the checkpoint, so the saved data position would go on "
            f"in other shard orders (samples repeated and skipped): resume with numpy "
            f"{saved[0]}, or set data.on_shard_list_change=restart to start the data "
            "pipeline afresh")


def check_seed(saved: int, mine: int) -> None:
    """Raise ValueError (one line, for the command line) when the checkpoint's data seed is
    not this run's: every shard order and shuffle is drawn from it, so a saved position
    means nothing under another seed."""
    if saved != mine:
        raise ValueError(
            f"data state: the checkpoint was saved with data.seed={saved}, this run has "
            f"data.seed={mine}; the shard order and shuffles are drawn from the seed, so the "
            f"saved data position cannot continue under another: resume with "
            f"data.seed={saved}")


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
    permutations: list[str] | None = field(default_factory=permutation_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (worker ids as strings, as JSON keys must be)."""
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "workers": self.workers,
                "sources": list(self.sources), "epoch": self.epoch,
                "next_worker": self.next_worker,
                "positions": {str(k): v for k, v in sorted(self.positions.items())},
                "stats": self.stats, "shard_lists": self.shard_lists,
                "permutations": self.permutations}

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
                   stats=d.get("stats", {}), shard_lists=d.get("shard_lists"),
                   permutations=d.get("permutations"))

    def check_compatible(self, other: PipelineState) -> None:
        """Raise ValueError naming what differs if ``other`` (the saved state) describes
        different streams than ``self`` (the new loader): exact resume is impossible then."""
        check_seed(other.seed, self.seed)
        check_permutations(other.permutations)
        for name in ("rank", "world_size", "workers"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(
                    f"data state: saved {name}={theirs!r} but this run has {mine!r}; the "
                    "sample streams differ, so this rank's data position cannot be restored "
                    "alone (another world size or worker count: pass every rank's saved "
                    "state, data.redeal; else start the data pipeline fresh with state=None)")
        self.check_shard_lists(other)  # which names a source added, removed or reordered

    def source_changes(self, other: PipelineState) -> tuple[list[str], list[str]]:
        """(added, removed): this run's sources that ``other`` (the saved state) lacks, in
        this run's order, and the saved sources this run lacks, in the saved order."""
        added = [name for name in self.sources if name not in other.sources]
        removed = [name for name in other.sources if name not in self.sources]
        return added, removed

    def check_sources(self, other: PipelineState) -> None:
        """Raise ValueError (one line) unless this run has the sources of ``other`` (the
        saved state) in its order: the saved position is one cursor per source, by index,
        so a source added or removed has no exact continuation."""
        if self.sources == other.sources:
            return
        added, removed = self.source_changes(other)
        if not added and not removed:  # the same sources in another order
            raise ValueError(
                f"data state: saved with the sources in the order {other.sources} but this "
                f"run lists them as {self.sources}; the saved position is one cursor per "
                "source in the saved order: list data.sources in that order")
        what = "; ".join(part for part in (
            f"added {added}" if added else "", f"removed {removed}" if removed else "")
            if part)
        raise ValueError(
            f"data state: the data sources changed since the checkpoint ({what}: saved "
            f"{other.sources}, now {self.sources}). The saved data position is one cursor "
            "per saved source, so it cannot continue over another set. Resume with the "
            "saved sources, or set data.on_shard_list_change=restart to start the data "
            "pipeline afresh over this run's sources (its counts kept; the samples of the "
            "current epoch read so far are read again)")

    def changed_sources(self, other: PipelineState) -> list[str]:
        """Sources whose saved position cannot go on in this run: those added or removed
        since ``other`` (the saved state) and those whose shard list differs from the saved
        one (lists compared by source name, and only when both states record them); this
        run's sources first, then the removed ones. Sources only listed in another order
        are not changed (:meth:`check_sources` refuses the order). Under a numpy that
        permutes differently (:func:`check_permutations`) every source is changed."""
        added, removed = self.source_changes(other)
        if (other.permutations is not None and self.permutations is not None
                and other.permutations[1] != self.permutations[1]):
            return [*self.sources, *removed]
        if self.shard_lists is None or other.shard_lists is None:
            return added + removed
        saved = dict(zip(other.sources, other.shard_lists, strict=True))
        return [name for name, mine in zip(self.sources, self.shard_lists, strict=True)
                if name in added or list(mine) != list(saved[name])] + removed

    def check_shard_lists(self, other: PipelineState) -> None:
        """Raise ValueError naming each source whose shard list differs from the one
        ``other`` (the saved state) was dealt from, or (:meth:`check_sources`) a source
        added, removed or listed in another order."""
        self.check_sources(other)  # first: a source added has no saved list to compare
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
