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

from pretrain.data.config import DataConfig
from pretrain.data.decode import ImageTransform, Sample, TagVocab, decode_sample
from pretrain.data.mix import mix_streams
from pretrain.data.sources import RawSample, expand_urls, shards_for_slot, source_samples
from pretrain.data.state import PipelineState, derive_seed, dist_info
from pretrain.data.stats import DataStats, SkipCounter

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
                 positions: dict[int, int], rotation: int, tokenizer: Any):
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

    def raw_stream(self, worker: int, counter: SkipCounter
                   ) -> Iterator[tuple[int, int, RawSample]]:
        """(index, source id, raw sample) of logical ``worker``: its sources' shards split
        by slot, shuffled and mixed by weight, all seeded by (seed, slot, epoch)."""
        cfg = self.cfg
        nslots = self.world_size * self.workers
        slot = self.rank * self.workers + worker
        streams = []
        for i, (source, urls) in enumerate(zip(cfg.sources, self.shard_urls, strict=True)):
            resampled = source.resampled and self.train
            owned = shards_for_slot(urls, slot, nslots, resampled)
            seed = derive_seed(cfg.seed, "source", i, slot, nslots, self.epoch)
            streams.append(source_samples(
                source, owned, resampled, seed, cfg.s3, counter,
                shuffle_buffer=cfg.shuffle_buffer if self.train else 0,
                shuffle_initial=cfg.shuffle_initial, shuffle_shards=self.train))
        rng = random.Random(derive_seed(cfg.seed, "mix", slot, nslots, self.epoch))
        mixed = mix_streams(streams, [s.weight for s in cfg.sources], rng)
        for index, (source_id, raw) in enumerate(mixed):
            yield index, source_id, raw

    def batches(self, worker: int) -> Iterator[Batch]:
        """Decoded batches of logical ``worker``, starting at its saved position (earlier
        raw samples are skipped undecoded). A final batch may be short, or empty when only
        skip counts are left to report."""
        cfg = self.cfg
        counter = SkipCounter()
        start = self.positions.get(worker, 0)
        # Counts of what happens while fast-forwarding were already reported before the
        # checkpoint (they are in the restored totals).
        counter.muted = start > 0
        transform = ImageTransform(cfg.image_size, self.train, cfg.mean, cfg.std,
                                   cfg.crop_scale, cfg.hflip)
        vocab = TagVocab.load(cfg.tag_vocab)
        tokenizer = self.tokenizer
        slot = (self.rank * self.workers + worker, self.world_size * self.workers)
        pending: list[tuple[int, Sample]] = []
        index = start - 1
        for index, source_id, raw in self.raw_stream(worker, counter):
            if index < start:
                continue
            counter.muted = False
            rng = random.Random(derive_seed(cfg.seed, "aug", *slot, self.epoch, index))
            sample = decode_sample(raw, cfg.sources[source_id], transform, rng, counter)
            if sample is not None:
                pending.append((source_id, sample))
            if len(pending) == cfg.batch_size:
                yield self.collate(pending, worker, index, counter, vocab, tokenizer)
                pending = []
        if self.train and all(s.resampled for s in cfg.sources):
            # Resampled streams are endless: ending means every source gave up (all its
            # shards missing or unreadable, see the errors above). Say so here, instead of
            # letting the trainer die on a bare StopIteration.
            raise RuntimeError(
                f"data: every source stream of rank {self.rank} worker {worker} ended (all "
                f"their shards are missing or unreadable: see the errors logged above); "
                f"training cannot go on")
        counter.muted = False
        yield self.collate(pending, worker, max(index, start - 1), counter, vocab, tokenizer)

    def collate(self, pending: list[tuple[int, Sample]], worker: int, last_index: int,
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
            "last_index": last_index,
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
        for source, urls in zip(cfg.sources, self.shard_urls, strict=True):
            if not urls:
                raise ValueError(f"sources.{source.name}.urls: no shard URLs")
            nslots = world_size * self.workers
            if train and source.resampled and len(urls) < nslots and rank == 0:
                log.warning("source %r has %d shards for %d rank x worker slots: slots "
                            "share shards (resampled independently)", source.name,
                            len(urls), nslots)
        self._state = PipelineState(cfg.seed, rank, world_size, self.workers,
                                    [s.name for s in cfg.sources])
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
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers,
                            pin_memory=self.cfg.pin_memory, **extra)
        names = [s.name for s in self.cfg.sources]
        for batch in loader:
            worker = batch["worker"]
            st.positions[worker] = batch.pop("last_index") + 1
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next iteration; ValueError if it was saved with
        a different seed, rank, world size, worker count or source list."""
        saved = PipelineState.from_dict(state)
        self._state.check_compatible(saved)
        self._state.epoch, self._state.next_worker = saved.epoch, saved.next_worker
        self._state.positions = dict(saved.positions)
        self.stats = DataStats.from_dict(saved.stats)


def build_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                 train: bool = True, state: dict[str, Any] | None = None) -> StreamingLoader:
    """The loader of this rank. ``rank``/``world_size`` default to torch.distributed, then
    RANK/WORLD_SIZE, then a single process. ``train=False``: eval transform, no shuffling,
    one pass over every source's shards. ``state``: from :meth:`StreamingLoader.state_dict`.
    """
    return StreamingLoader(cfg, rank, world_size, train, state)
