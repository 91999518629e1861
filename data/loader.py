"""The resumable loader of one rank: per-worker sample streams (:mod:`data.stream`), decoded
and batched by a task's :class:`SampleCodec`, delivered in the DataLoader's strict
round-robin worker order, with a constant-size state that resumes exactly.

Pre-training (``pretrain/data/loader.py``: image, caption and tags of several mixed
sources) and streamed classification (``finetune/cls_stream.py``: image and label of one
source) both run on it; they differ only in their codec.

**Slots.** Each (rank, logical worker) pair is a slot (``slot = rank * workers + worker``)
with its own :class:`~data.stream.MixedStream`: every source's epochs dealt over all slots
without replacement (:mod:`data.epochs`), mixed by weight and shuffled in blocks. Physical
DataLoader worker ``j`` plays logical worker ``(j + rotation) % workers``, so that after a
resume the DataLoader's fixed round-robin (worker 0 first) goes on with the logical worker
whose batch was next.

**State.** Every batch carries its worker's stream state after its last raw sample and the
skip counts since its previous batch; the consumer (:meth:`ResumableLoader.__iter__`, in
the main process) records the state of each worker and which worker is next, and folds
the counts into :attr:`ResumableLoader.stats`. So :meth:`ResumableLoader.state_dict` is
the position after the last batch *handed to the caller*, whatever the workers prefetched,
and a loader built with it continues with exactly the batches an uninterrupted one would
have delivered (``state`` of every old rank: on another slot count, at shard granularity,
:mod:`data.redeal`). Per-sample augmentation draws from an RNG seeded by (seed, slot,
epoch, sample index), never from a worker's RNG, so resumed batches match bit for bit.

**Cost.** The state is a few hundred bytes per worker; a resume re-reads at most one
shuffle block per worker (:mod:`data.stream`), whatever the length of the run.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.adopted import AdoptingStream
from data.config import S3Config
from data.epochs import extra_offsets, parts_per_shard
from data.sources import RawSample
from data.state import (
    PipelineState,
    derive_seed,
    legacy_naming,
    upgrade_state,
    url_list_digest,
)
from data.stats import DataStats, SkipCounter
from data.storage import StorageAccessError
from data.stream import MixedStream, SourceCursor, SourceStream
from runtime.preemption import loader_worker_init

log = logging.getLogger(__name__)

# Samples of one source skipped in a row (no usable one between) that end the run, by
# default (``LoaderOptions.max_skipped_in_a_row``; pre-training: data.max_skipped_in_a_row,
# 0: never). A
# source whose every sample is skipped (a wrong ``image_key``/``text_key``, shards of
# another layout) otherwise re-reads its shards for ever with nothing logged: a
# resampled stream never ends, skipped samples never make a batch, and skip counts reach
# the records only with one. 10,000 is a whole shard of LAION-style data: damage that
# skips a few samples here and there never comes near it.
MAX_SKIPPED_IN_A_ROW = 10_000


class UnusableSourceError(RuntimeError):
    """Every sample a source delivered for :data:`MAX_SKIPPED_IN_A_ROW` samples was
    skipped: its keys do not match its shards, or its data is unusable. Raised in the
    main process (one line, the reasons counted), not in a data worker."""


class _SkippedInARow:
    """Per source of one worker: the reasons of the samples skipped since its last usable
    one (the codec counts each skip's reason in the counter, which keeps the latest:
    O(1) a sample)."""

    def __init__(self, names: list[str], counter: SkipCounter, limit: int):
        self.names, self.counter, self.limit = names, counter, limit
        self.runs: list[Counter[str]] = [Counter() for _ in names]

    def usable(self, source_id: int) -> None:
        if self.runs[source_id]:
            self.runs[source_id].clear()

    def skipped(self, source_id: int) -> str | None:
        """Count one skipped sample; the error message once the run reaches the limit
        (none with a limit of 0)."""
        run = self.runs[source_id]
        run[self.counter.last_skip or "unknown"] += 1
        if not self.limit or run.total() < self.limit:
            return None
        name = self.names[source_id]
        why = ", ".join(f"{reason}: {n}" for reason, n in run.most_common())
        return (f"data: source {name!r}: the last {run.total()} samples it delivered "
                f"were all skipped ({why}); check the keys configured for it (image_key, "
                f"text_key; pre-training: sources.{name}.*) against those its shards hold "
                f"(`internimage shards verify` counts what is missing)")


@dataclass
class StreamSource:
    """One source of a loader: its name, expanded shard URLs, mix weight, and whether its
    training stream runs epochs forever (``resampled``; else one pass)."""

    name: str
    urls: list[str]
    weight: float = 1.0
    resampled: bool = True


@dataclass
class LoaderOptions:
    """How a loader reads: seed, samples per batch, DataLoader workers per rank (0: in
    the main process), the shuffle block, object storage, the DataLoader's prefetching
    and what a resume does when a source's shard list changed (``error`` | ``restart``,
    :mod:`data.state`)."""

    seed: int
    batch_size: int
    workers: int
    shuffle_buffer: int
    s3: S3Config
    prefetch_factor: int = 2
    persistent_workers: bool = False
    pin_memory: bool = False
    on_shard_list_change: str = "error"
    max_skipped_in_a_row: int = MAX_SKIPPED_IN_A_ROW  # 0: never end a source for skips


class SampleCodec(Protocol):
    """A task's part of the loader: what a raw sample becomes, and how samples batch."""

    def decode(self, source_id: int, raw: RawSample, rng: random.Random,
               counter: SkipCounter) -> Any | None:
        """The decoded, augmented sample (drawing only from ``rng``), or None after
        counting why it is unusable in ``counter``."""

    def collate(self, samples: list[tuple[int, Any]], worker: int,
                counter: SkipCounter) -> Any:
        """One batch of ``(source id, sample)`` pairs (at least one)."""


class SlotStreams(IterableDataset):
    """What each DataLoader worker runs: its logical worker's stream, decoded and batched.
    Items are dicts: ``data`` (the codec's batch, None when only counts are left to
    report), ``worker``, ``state``, ``counts`` and ``sources`` (samples per source id)."""

    def __init__(self, sources: list[StreamSource], opts: LoaderOptions, codec: SampleCodec,
                 rank: int, world_size: int, train: bool, epoch: int,
                 positions: dict[int, dict[str, Any]], rotation: int):
        super().__init__()
        self.sources, self.opts, self.codec = sources, opts, codec
        self.rank, self.world_size, self.train = rank, world_size, train
        self.workers = max(opts.workers, 1)
        self.epoch, self.positions, self.rotation = epoch, dict(positions), rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        yield from self.batches((physical + self.rotation) % self.workers)

    def mixed_stream(self, worker: int, counter: SkipCounter) -> MixedStream | AdoptingStream:
        """The raw samples of logical ``worker``: every source's epochs dealt over all
        (rank, worker) slots (:mod:`data.epochs`), mixed by weight and shuffled in blocks
        (:mod:`data.stream`), resumed from the worker's saved state if there is one (after
        a resume on another slot count, first the old blocks it adopted:
        :mod:`data.adopted`)."""
        position = self.positions.get(worker)
        adopted = position.get("adopted") if position is not None else None
        if position is not None:
            position = {k: v for k, v in position.items() if k != "adopted"}
        own = self._slot_stream(self.rank * self.workers + worker,
                                self.world_size * self.workers, self.epoch, counter, position)
        if not adopted:
            return own

        def open_block(entry: dict[str, Any]) -> MixedStream:
            return self._slot_stream(entry["slot"], entry["nslots"], entry["epoch"], counter,
                                     entry["state"], one_block=True)

        return AdoptingStream(own, adopted, open_block)

    def _slot_stream(self, slot: int, nslots: int, epoch: int, counter: SkipCounter,
                     state: dict[str, Any] | None, one_block: bool = False) -> MixedStream:
        """The stream of ``slot`` of ``nslots`` in loader epoch ``epoch`` (an adopted
        block's: the old slot's, on the old deal)."""
        opts = self.opts
        resampled = [s.resampled and self.train for s in self.sources]
        units = [len(s.urls) * (parts_per_shard(len(s.urls), nslots) if r else 1)
                 for s, r in zip(self.sources, resampled, strict=True)]
        offsets, stride = extra_offsets(units, nslots)

        def make_sources(cursors: list[SourceCursor] | None) -> list[SourceStream]:
            return [SourceStream(s.name, s.urls, slot, nslots, opts.seed, opts.s3, counter,
                                 resampled=resampled[i], shuffle=self.train,
                                 first_epoch=epoch,
                                 cursor=cursors[i] if cursors is not None else None,
                                 deal_offset=offsets[i], deal_stride=stride)
                    for i, s in enumerate(self.sources)]

        return MixedStream(make_sources, [s.weight for s in self.sources],
                           derive_seed(opts.seed, epoch), slot,
                           opts.shuffle_buffer if self.train else 0, counter,
                           state=state, one_block=one_block)

    def batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """Batches of logical ``worker``, continuing from its saved state. A final one may
        hold only counts (``data`` None); outside training it may be short."""
        opts, counter = self.opts, SkipCounter()
        slot = (self.rank * self.workers + worker, self.world_size * self.workers)
        pending: list[tuple[int, Any]] = []
        mixed = self.mixed_stream(worker, counter)
        in_a_row = _SkippedInARow([s.name for s in self.sources], counter,
                                  opts.max_skipped_in_a_row)
        for source_id, raw in mixed:
            index = mixed.index - 1  # the raw sample's number in this worker's stream
            rng = random.Random(derive_seed(opts.seed, "aug", *slot, self.epoch, index))
            sample = self.codec.decode(source_id, raw, rng, counter)
            if sample is not None:
                pending.append((source_id, sample))
                in_a_row.usable(source_id)
            elif (error := in_a_row.skipped(source_id)) is not None:
                # handed to the main process with the batch items: raised there in one
                # line (a worker's exception arrives wrapped in its traceback)
                yield self._item(pending, worker, mixed, counter) | {"error": error}
                return
            if len(pending) == opts.batch_size:
                yield self._item(pending, worker, mixed, counter)
                pending = []
        if self.train and all(s.resampled for s in self.sources):
            # Resampled streams are endless: ending means every source gave up (all its
            # shards missing or unreadable, see the errors above). Say so here, instead of
            # letting the trainer die on a bare StopIteration.
            raise RuntimeError(
                f"data: every source stream of rank {self.rank} worker {worker} ended (all "
                f"their shards are missing or unreadable: see the errors logged above); "
                f"training cannot go on")
        if self.train and pending:
            # A training batch is always full (a DataLoader's drop_last): ranks exchange
            # their batches' features in collectives of one size (the contrastive loss's
            # gathers), so one rank's short last batch of a pass aborts gloo ("Received
            # data size doesn't match") or hangs NCCL, and timm's Mixup takes only even
            # batches. The rest (< data.batch_size samples per slot and pass, 0.06% of a
            # 427M-sample pass over 4096 slots of 64) sits out this pass, counted; the next
            # pass deals another order.
            for source_id, _ in pending:
                counter.event(self.sources[source_id].name, "pass_remainder")
            pending = []
        yield self._item(pending, worker, mixed, counter)

    def _item(self, pending: list[tuple[int, Any]], worker: int,
              mixed: MixedStream | AdoptingStream, counter: SkipCounter) -> dict[str, Any]:
        data = self.codec.collate(pending, worker, counter) if pending else None
        return {"data": data, "worker": worker, "state": mixed.state(),
                "counts": counter.drain(), "sources": dict(Counter(i for i, _ in pending))}


class ResumableLoader:
    """Iterable over the batches of one rank, with ``stats`` and ``state_dict``.

    Iterating builds a DataLoader whose workers run :class:`SlotStreams`; batches arrive
    in its strict round-robin worker order, which makes the batch sequence a function of
    the sources, options and state alone. Resampled (training) streams never end; one-pass
    streams end after each shard was read once, and the next iteration is the next epoch
    (a differently seeded order).
    """

    def __init__(self, sources: list[StreamSource], opts: LoaderOptions, codec: SampleCodec,
                 rank: int, world_size: int, train: bool = True,
                 state: dict[str, Any] | list[dict[str, Any]] | None = None):
        if not sources:
            raise ValueError("data.sources: at least one source is required")
        for s in sources:
            if not s.urls:
                raise ValueError(f"sources.{s.name}.urls: no shard URLs")
        self.sources, self.opts, self.codec, self.train = sources, opts, codec, train
        self.rank, self.world_size = rank, world_size
        self.workers = max(opts.workers, 1)
        nslots = world_size * self.workers
        for s in sources:
            parts = parts_per_shard(len(s.urls), nslots)
            if train and s.resampled and parts > 1 and rank == 0:
                log.info("source %r has %d shards for %d rank x worker slots: each shard is "
                         "read as %d parts (disjoint samples), its bytes %d times per epoch",
                         s.name, len(s.urls), nslots, parts, parts)
        self._state = PipelineState(opts.seed, rank, world_size, self.workers,
                                    [s.name for s in sources],
                                    shard_lists=[url_list_digest(s.urls) for s in sources])
        self.stats = DataStats()
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        st, opts = self._state, self.opts
        dataset = SlotStreams(self.sources, opts, self.codec, self.rank, self.world_size,
                              self.train, st.epoch, st.positions, st.next_worker)
        extra: dict[str, Any] = {}
        if opts.workers > 0:
            extra = {"prefetch_factor": opts.prefetch_factor,
                     "persistent_workers": opts.persistent_workers}
        # Its own generator: without one, starting the DataLoader's iterator draws the
        # workers' base seed from torch's global RNG (torch.utils.data docs, `generator`),
        # which the training step draws from too (augmentation views, masks, drop path). A
        # resumed run restores that RNG and starts a new iterator, so the draw would shift
        # every later random number. The workers seed their samples themselves.
        loader = DataLoader(dataset, batch_size=None, num_workers=opts.workers,
                            pin_memory=opts.pin_memory, worker_init_fn=loader_worker_init,
                            generator=torch.Generator().manual_seed(opts.seed), **extra)
        names = [s.name for s in self.sources]
        for item in loader:
            if "error" in item:
                raise UnusableSourceError(item["error"])
            worker = item["worker"]
            st.positions[worker] = item["state"]
            st.next_worker = (worker + 1) % self.workers
            self.stats.add_counts(item["counts"])
            for source_id, n in item["sources"].items():
                self.stats.samples[names[int(source_id)]] += n
            if item["data"] is not None:
                yield item["data"]
        st.epoch += 1
        st.positions = {}
        st.next_worker = 0

    def endless(self) -> Iterator[Any]:
        """Batches pass after pass, for ever: what a run counted in steps draws from.
        Resampled sources never end a pass; when only one-pass sources (``resampled:
        false``) are left and they end, the next pass begins (the next epoch's order),
        where a plain ``next()`` on one iterator ended the run with a bare StopIteration.
        A pass that yields no batch at all raises (the sources hold nothing usable)."""
        while True:
            # a pass resumed after its last full batch (a checkpoint at that step) holds
            # only the rest that sits it out: no batch, and nothing wrong
            fresh, batches = not self._state.positions, 0
            delivered = sum(self.stats.samples.values())
            rest = self.stats.events["pass_remainder"]
            for batch in self:
                batches += 1
                yield batch
            names = ", ".join(s.name for s in self.sources)
            delivered = sum(self.stats.samples.values()) - delivered
            rest = self.stats.events["pass_remainder"] - rest
            if fresh and not batches:
                if rest:
                    raise UnusableSourceError(
                        f"a whole pass over the data sources ({names}) gave no full batch: "
                        f"each of the {self.world_size} ranks x {self.workers} workers' "
                        f"share of a pass holds fewer than data.batch_size="
                        f"{self.opts.batch_size} samples ({rest} in all on this rank); "
                        "lower data.batch_size or data.workers, or use more shards")
                raise UnusableSourceError(f"a whole pass over the data sources ({names}) "
                                          "gave no batch: nothing readable in them")
            if fresh and rest > 0.1 * (delivered + rest):
                log.warning("%d of this pass's %d samples on rank %d (%.0f%%) sat it out: "
                            "each rank x worker slot's share ends in fewer than "
                            "data.batch_size=%d samples, left out of the pass; lower "
                            "data.batch_size or data.workers to train on more of it", rest,
                            delivered + rest, self.rank, 100 * rest / (delivered + rest),
                            self.opts.batch_size)
            log.info("a pass over the data sources (%s) ended, one-pass sources read to "
                     "their end: the next pass begins (data epoch %d)", names,
                     self._state.epoch)

    def check_same_lists(self, gather: Callable[[Any], list]) -> None:
        """Collective: refuse, on every rank alike (:class:`StorageAccessError`, naming the
        source and the ranks that differ), unless every rank expanded the same shard lists
        (their :func:`~data.state.url_list_digest`) and permutes them alike (numpy's
        :func:`~data.state.permutation_fingerprint`). ``gather``: every rank's object in rank
        order (``runtime.dist.all_gather_objects``; a lone process: ``lambda x: [x]``).

        Each rank expands its ``.txt`` lists itself: a list rewritten while the job's ranks
        start, or nodes that see different copies of it (a node-local copy, a stale NFS
        attribute cache), would deal the epochs differently on different ranks, some
        shards read by two slots and others by none, silently, until a resume refused the
        changed list. Cost: one all-gather of ~40 bytes a source per rank, once per start.
        """
        gathered = gather((self._state.shard_lists, self._state.permutations))
        # nodes on another numpy may permute differently (data.state.check_permutations):
        # their slots would deal other orders of the same list
        numpy = [r for r, (_, perm) in enumerate(gathered) if perm[1] != gathered[0][1][1]]
        if numpy:
            r = numpy[0]
            raise StorageAccessError(
                f"data: the ranks' numpy permutes the shards differently: rank 0 has numpy "
                f"{gathered[0][1][0]}, rank {r} numpy {gathered[r][1][0]} ({len(numpy)} of "
                f"{len(gathered)} ranks differ), so their slots would deal other orders of "
                "the same lists: run every node on one numpy")
        lists = [digests for digests, _ in gathered]
        for i, name in enumerate(self._state.sources):
            main = lists[0][i]
            other = [r for r, digests in enumerate(lists) if digests[i] != main]
            if other:
                r = other[0]
                raise StorageAccessError(
                    f"data source {name!r}: the ranks read different shard lists: rank 0 "
                    f"lists {main[0]} shards ({main[1]}), rank {r} {lists[r][i][0]} "
                    f"({lists[r][i][1]}); {len(other)} of {len(lists)} ranks differ from "
                    "rank 0. A list rewritten while the job started, or nodes that see "
                    "different copies of it: make every node see the same lists, then "
                    "start again")

    def start_at(self, epoch: int) -> None:
        """Fresh positions at the start of data epoch ``epoch`` (a resume from a checkpoint
        that holds no stream position: the nearest exact point it knows)."""
        self._state.epoch, self._state.next_worker, self._state.positions = epoch, 0, {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position of this rank's stream (plus stats totals); pass it back as
        ``state=`` or to :meth:`load_state_dict` to resume exactly."""
        self._state.stats = self.stats.to_dict()
        return self._state.to_dict()

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from ``state`` at the next iteration; ValueError if it was saved with
        a different seed, rank, world size, worker count or source list.

        ``state`` may also be every old rank's state (``[rank 0's, rank 1's, ...]``): then
        a run with another world size or worker count resumes at shard granularity
        (:mod:`data.redeal`: what the old slots left of the current epochs is re-dealt over
        the new slots; what is repeated is logged).

        A source whose shard list changed since the save is refused (ValueError naming
        it), or with ``on_shard_list_change=restart`` the pipeline starts afresh with the
        saved counts (the old positions index permutations of the old lists)."""
        legacy = {}  # lists a state of the version before named otherwise
        for source, digest in zip(self.sources, self._state.shard_lists, strict=True):
            found = legacy_naming(source.urls, digest)
            if found is not None:
                legacy[source.name] = (found[0], digest, found[1])
        if legacy:
            state = ([upgrade_state(s, legacy) for s in state] if isinstance(state, list)
                     else upgrade_state(state, legacy))
        if self._restart_on_changed_lists(state):
            return
        if isinstance(state, list):
            first = PipelineState.from_dict(state[0])
            if (first.world_size, first.workers) == (self.world_size, self.workers):
                state = state[self.rank]
            else:
                self._load_resized(state)
                return
        saved = PipelineState.from_dict(state)
        self._state.check_compatible(saved)
        self._state.epoch, self._state.next_worker = saved.epoch, saved.next_worker
        self._state.positions = dict(saved.positions)
        self.stats = DataStats.from_dict(saved.stats)

    def _restart_on_changed_lists(self, state: dict[str, Any] | list[dict[str, Any]]
                                  ) -> bool:
        """With ``on_shard_list_change=restart`` and a changed list: fresh positions, the
        saved counts kept (summed on rank 0 after a resize, as a re-deal does)."""
        states = state if isinstance(state, list) else [state]
        saved = [PipelineState.from_dict(s) for s in states]
        changed = self._state.changed_sources(saved[0])
        if not changed or self.opts.on_shard_list_change != "restart":
            return False
        if self.rank == 0:
            log.warning("data: the sources or shard lists (or numpy's permutations) changed "
                        "since the checkpoint "
                        "(%s); data.on_shard_list_change=restart: the data pipeline starts "
                        "afresh over this run's sources and lists (samples of the current "
                        "epoch read again)", ", ".join(changed))
        if isinstance(state, list) and (saved[0].world_size, saved[0].workers) != (
                self.world_size, self.workers):
            from data.redeal import merge_stats

            self.stats = DataStats.from_dict(merge_stats([s.stats for s in saved])
                                             if self.rank == 0 else {})
        else:
            self.stats = DataStats.from_dict(saved[self.rank if isinstance(state, list)
                                                   else 0].stats)
        return True

    def _load_resized(self, states: list[dict[str, Any]]) -> None:
        from data.redeal import SourceSpec, resized_state

        specs = [SourceSpec(s.name, s.urls, s.resampled and self.train, self.train)
                 for s in self.sources]
        new = resized_state(states, specs, self.rank, self.world_size, self.workers,
                            self.opts.seed)
        self._state.epoch, self._state.next_worker = new.epoch, new.next_worker
        self._state.positions = dict(new.positions)
        self.stats = DataStats.from_dict(new.stats) if new.stats else DataStats()
