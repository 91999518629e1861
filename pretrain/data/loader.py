"""The training/eval loader: per-worker streams -> decoded batches -> one iterable that
tracks its resumable state and the skip/mix statistics of all workers.

Batch format (a dict; ``B`` samples, ``S`` image size, ``L`` context length, ``V`` tags):

- ``images``: float (B, 3, S, S), normalised
- ``tokens``: long (B, L), open_clip BPE ids (image-only samples: the empty caption)
- ``has_text``: bool (B,), False for samples of sources without captions
- ``tag_targets``: float (B, V) multi-hot; zero rows where ``has_tags`` is False
- ``has_tags``: bool (B,), True when the sample has at least one tag in the vocabulary
- ``source_ids``: long (B,), index into ``cfg.sources``
- ``keys``: list of ``"<shard file>/<sample key>"`` (for debugging and tests)
- ``worker``: int, the logical DataLoader worker that made the batch
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.epochs import extra_offsets, parts_per_shard
from data.sources import expand_urls
from data.state import PipelineState, derive_seed, dist_info, url_list_digest
from data.stats import DataStats, SkipCounter
from data.stream import MixedStream, SourceCursor, SourceStream
from pretrain.data.config import DataConfig
from pretrain.data.decode import ImageTransform, Sample, TagVocab, decode_sample

log = logging.getLogger(__name__)

Batch = dict[str, Any]


def _tokenizer(name: str):
    import open_clip  # imported lazily: it takes seconds and only workers need it

    return open_clip.get_tokenizer(name)


class WorkerStreams(IterableDataset):
    """What each DataLoader worker runs: its own deterministic stream, decoded and batched.

    Physical worker ``j`` plays logical worker ``(j + rotation) % workers`` so that, after a
    resume, the DataLoader's fixed round-robin (worker 0 first) continues with the logical
    worker whose batch was next.
    """

    def __init__(self, cfg: DataConfig, shard_urls: list[list[str]], rank: int,
                 world_size: int, train: bool, workers: int, epoch: int,
                 positions: dict[int, dict[str, Any]], rotation: int, tokenizer: Any):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.shard_urls = shard_urls
        self.rank, self.world_size, self.train = rank, world_size, train
        self.workers, self.epoch = workers, epoch
        self.positions, self.rotation = dict(positions), rotation

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        yield from self.batches((physical + self.rotation) % self.workers)

    def mixed_stream(self, worker: int, counter: SkipCounter) -> MixedStream:
        """The raw samples of logical ``worker``: every source's epochs dealt over all
        (rank, worker) slots (:mod:`data.epochs`), mixed by weight and shuffled in blocks
        (:mod:`data.stream`), resumed from the worker's saved state if there is one."""
        cfg = self.cfg
        nslots = self.world_size * self.workers
        slot = self.rank * self.workers + worker

        resampled = [s.resampled and self.train for s in cfg.sources]
        units = [len(urls) * (parts_per_shard(len(urls), nslots) if r else 1)
                 for urls, r in zip(self.shard_urls, resampled, strict=True)]
        offsets, stride = extra_offsets(units, nslots)

        def make_sources(cursors: list[SourceCursor] | None) -> list[SourceStream]:
            return [SourceStream(source.name, urls, slot, nslots, cfg.seed, cfg.s3, counter,
                                 resampled=resampled[i], shuffle=self.train,
                                 first_epoch=self.epoch,
                                 cursor=cursors[i] if cursors is not None else None,
                                 deal_offset=offsets[i], deal_stride=stride)
                    for i, (source, urls) in enumerate(zip(cfg.sources, self.shard_urls,
                                                           strict=True))]

        return MixedStream(make_sources, [s.weight for s in cfg.sources],
                           derive_seed(cfg.seed, self.epoch), slot,
                           cfg.shuffle_buffer if self.train else 0, counter,
                           state=self.positions.get(worker))

    def batches(self, worker: int) -> Iterator[Batch]:
        """Decoded batches of logical ``worker``, continuing from its saved state. A final
        batch may be short, or empty when only skip counts are left to report."""
        cfg = self.cfg
        counter = SkipCounter()
        transform = ImageTransform(cfg.image_size, self.train, cfg.mean, cfg.std,
                                   cfg.crop_scale, cfg.hflip, cfg.max_image_pixels)
        vocab = TagVocab.load(cfg.tag_vocab)
        tokenizer = self.tokenizer
        slot = (self.rank * self.workers + worker, self.world_size * self.workers)
        pending: list[tuple[int, Sample]] = []
        mixed = self.mixed_stream(worker, counter)
        for source_id, raw in mixed:
            index = mixed.index - 1  # the raw sample's number in this worker's stream
            rng = random.Random(derive_seed(cfg.seed, "aug", *slot, self.epoch, index))
            sample = decode_sample(raw, cfg.sources[source_id], transform, rng, counter)
            if sample is not None:
                pending.append((source_id, sample))
            if len(pending) == cfg.batch_size:
                yield self.collate(pending, worker, mixed.state(), counter, vocab, tokenizer)
                pending = []
        if self.train and all(s.resampled for s in cfg.sources):
            # Resampled streams are endless: ending means every source gave up (all its
            # shards missing or unreadable, see the errors above). Say so here, instead of
            # letting the trainer die on a bare StopIteration.
            raise RuntimeError(
                f"data: every source stream of rank {self.rank} worker {worker} ended (all "
                f"their shards are missing or unreadable: see the errors logged above); "
                f"training cannot go on")
        yield self.collate(pending, worker, mixed.state(), counter, vocab, tokenizer)

    def collate(self, pending: list[tuple[int, Sample]], worker: int, state: dict[str, Any],
                counter: SkipCounter, vocab: TagVocab, tokenizer) -> Batch:
        """Stack samples into the batch dict plus the bookkeeping the loader strips off."""
        cfg = self.cfg
        size = cfg.image_size
        tags = torch.zeros(len(pending), len(vocab))
        for row, (source_id, sample) in enumerate(pending):
            tags[row], unknown = vocab.encode(sample.tags)
            counter.event(cfg.sources[source_id].name, "unknown_tags", unknown)
        captions = [s.caption or "" for _, s in pending]
        return {
            "images": torch.stack([s.image for _, s in pending]) if pending
            else torch.zeros(0, 3, size, size),
            "tokens": tokenizer(captions, context_length=cfg.context_length).long()
            if pending else torch.zeros(0, cfg.context_length, dtype=torch.long),
            "has_text": torch.tensor([s.caption is not None for _, s in pending],
                                     dtype=torch.bool),
            "tag_targets": tags,
            "has_tags": tags.sum(dim=1) > 0,
            "source_ids": torch.tensor([i for i, _ in pending], dtype=torch.long),
            "keys": [s.key for _, s in pending],
            "worker": worker,
            "state": state,
            "counts": counter.drain(),
        }


class StreamingLoader:
    """Iterable over batches of one rank, with ``stats`` and ``state_dict``.

    Iterating builds a DataLoader whose workers run :class:`WorkerStreams`; batches arrive
    in the DataLoader's strict round-robin worker order, which makes the batch sequence a
    function of the config and the state alone. Resampled (training) streams never end;
    one-pass streams end after each shard was read once, and the next iteration is the
    next epoch (a differently seeded order).
    """

    def __init__(self, cfg: DataConfig, rank: int | None = None,
                 world_size: int | None = None, train: bool = True,
                 state: dict[str, Any] | None = None):
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        if not cfg.sources:
            raise ValueError("data.sources: at least one source is required")
        self.cfg, self.train = cfg, train
        self.rank, self.world_size = rank, world_size
        self.workers = max(cfg.workers, 1)
        # Built here, before workers fork, so that they inherit it instead of each paying
        # open_clip's import (seconds); also fails early on a bad tokenizer name.
        self.tokenizer = _tokenizer(cfg.tokenizer)
        self.shard_urls = [expand_urls(s.urls, cfg.s3) for s in cfg.sources]
        nslots = world_size * self.workers
        for source, urls in zip(cfg.sources, self.shard_urls, strict=True):
            if not urls:
                raise ValueError(f"sources.{source.name}.urls: no shard URLs")
            parts = parts_per_shard(len(urls), nslots)
            if train and source.resampled and parts > 1 and rank == 0:
                log.info("source %r has %d shards for %d rank x worker slots: each shard is "
                         "read as %d parts (disjoint samples), its bytes %d times per epoch",
                         source.name, len(urls), nslots, parts, parts)
        self._state = PipelineState(cfg.seed, rank, world_size, self.workers,
                                    [s.name for s in cfg.sources],
                                    shard_lists=[url_list_digest(u) for u in self.shard_urls])
        self.stats = DataStats()
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        st = self._state
        dataset = WorkerStreams(self.cfg, self.shard_urls, self.rank, self.world_size,
                                self.train, self.workers, st.epoch, st.positions,
                                st.next_worker, self.tokenizer)
        extra: dict[str, Any] = {}
        if self.cfg.workers > 0:
            extra = {"prefetch_factor": self.cfg.prefetch_factor,
                     "persistent_workers": self.cfg.persistent_workers}
        # Its own generator: without one, starting the DataLoader's iterator draws the
        # workers' base seed from torch's global RNG (torch.utils.data docs, `generator`),
        # which the training step draws from too (M3I views and masks, drop path). A resumed
        # run restores that RNG and starts a new iterator, so the draw would shift every
        # later random number. The workers seed themselves (derive_seed), not from it.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers,
                            pin_memory=self.cfg.pin_memory,
                            generator=torch.Generator().manual_seed(self.cfg.seed), **extra)
        names = [s.name for s in self.cfg.sources]
        for batch in loader:
            worker = batch["worker"]
            st.positions[worker] = batch.pop("state")
            st.next_worker = (worker + 1) % self.workers
            self.stats.add_counts(batch.pop("counts"))
            if len(batch["keys"]) == 0:
                continue
            for source_id, n in zip(*torch.unique(batch["source_ids"], return_counts=True),
                                    strict=True):
                self.stats.samples[names[int(source_id)]] += int(n)
            yield batch
        st.epoch += 1
        st.positions = {}
        st.next_worker = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position of this rank's stream (plus stats totals); pass it back as
        ``build_loader(..., state=...)`` or :meth:`load_state_dict` to resume exactly."""
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
        it), or with ``data.on_shard_list_change=restart`` the pipeline starts afresh with
        the saved counts (the old positions index permutations of the old lists)."""
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
        if not changed or self.cfg.on_shard_list_change != "restart":
            return False
        if self.rank == 0:
            log.warning("data: the shard list of source(s) %s changed since the checkpoint; "
                        "data.on_shard_list_change=restart: the data pipeline starts afresh "
                        "over the new lists (samples of the current epoch read again)",
                        changed)
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

        specs = [SourceSpec(s.name, urls, s.resampled and self.train, self.train)
                 for s, urls in zip(self.cfg.sources, self.shard_urls, strict=True)]
        new = resized_state(states, specs, self.rank, self.world_size, self.workers,
                            self.cfg.seed)
        self._state.epoch, self._state.next_worker = new.epoch, new.next_worker
        self._state.positions = dict(new.positions)
        self.stats = DataStats.from_dict(new.stats) if new.stats else DataStats()


def build_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                 train: bool = True, state: dict[str, Any] | None = None) -> StreamingLoader:
    """The loader of this rank. ``rank``/``world_size`` default to torch.distributed, then
    RANK/WORLD_SIZE, then a single process. ``train=False``: eval transform, no shuffling,
    one pass over every source's shards. ``state``: from :meth:`StreamingLoader.state_dict`,
    or the list of every rank's (needed when the world size or worker count changed).
    """
    return StreamingLoader(cfg, rank, world_size, train, state)
