"""The pre-training loader: image, caption and tags of several weighted sources, decoded
into the batch dict below, on the shared resumable loader (:mod:`data.loader`: per-worker
streams, strict round-robin order, exact resume, resize by re-dealing).

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

import random
from typing import Any

import torch

from data.loader import LoaderOptions, ResumableLoader, StreamSource
from data.sources import RawSample, expand_urls
from data.state import dist_info
from data.stats import SkipCounter
from pretrain.data.config import DataConfig
from pretrain.data.decode import ImageTransform, Sample, TagVocab, decode_sample

Batch = dict[str, Any]


def _tokenizer(name: str):
    import open_clip  # imported lazily: it takes seconds and only workers need it

    return open_clip.get_tokenizer(name)


class PretrainCodec:
    """Raw sample -> :class:`~pretrain.data.decode.Sample` (image augmented, caption and
    tags checked) and samples -> the batch dict of this module's docstring."""

    def __init__(self, cfg: DataConfig, train: bool, tokenizer: Any):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.transform = ImageTransform(cfg.image_size, train, cfg.mean, cfg.std,
                                        cfg.crop_scale, cfg.hflip, cfg.max_image_pixels)
        self.vocab = TagVocab.load(cfg.tag_vocab)

    def decode(self, source_id: int, raw: RawSample, rng: random.Random,
               counter: SkipCounter) -> Sample | None:
        """The sample, or None (its reason counted); tags outside the vocabulary are
        counted here, per sample, as every other per-sample count is: the counts of a
        shuffle block must be complete when its last sample is handed out, which a count
        at collate time is not for a batch that straddles two blocks (a resize withdraws
        the counts of the blocks it reads again: data/stats.py ``MET_EVENTS``)."""
        source = self.cfg.sources[source_id]
        sample = decode_sample(raw, source, self.transform, rng, counter)
        if sample is not None:
            counter.event(source.name, "unknown_tags", self.vocab.unknown(sample.tags))
        return sample

    def collate(self, samples: list[tuple[int, Sample]], worker: int,
                counter: SkipCounter) -> Batch:
        """Stack samples into the batch dict."""
        cfg, vocab = self.cfg, self.vocab
        tags = torch.zeros(len(samples), len(vocab))
        for row, (_, sample) in enumerate(samples):
            tags[row] = vocab.encode(sample.tags)  # the unknown ones: counted in decode
        captions = [s.caption or "" for _, s in samples]
        return {
            "images": torch.stack([s.image for _, s in samples]),
            "tokens": self.tokenizer(captions, context_length=cfg.context_length).long(),
            "has_text": torch.tensor([s.caption is not None for _, s in samples],
                                     dtype=torch.bool),
            "tag_targets": tags,
            "has_tags": tags.sum(dim=1) > 0,
            "source_ids": torch.tensor([i for i, _ in samples], dtype=torch.long),
            "keys": [s.key for _, s in samples],
            "worker": worker,
        }


class StreamingLoader(ResumableLoader):
    """The pre-training batches of one rank (:class:`data.loader.ResumableLoader` with
    :class:`PretrainCodec`); ``tokenizer`` is the text tower's."""

    def __init__(self, cfg: DataConfig, rank: int | None = None,
                 world_size: int | None = None, train: bool = True,
                 state: dict[str, Any] | list[dict[str, Any]] | None = None):
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        if not cfg.sources:  # ResumableLoader checks it too, after the tokenizer's import
            raise ValueError("data.sources: at least one source is required")
        self.cfg = cfg
        # Built here, before workers fork, so that they inherit it instead of each paying
        # open_clip's import (seconds); also fails early on a bad tokenizer name.
        self.tokenizer = _tokenizer(cfg.tokenizer)
        sources = [StreamSource(s.name, expand_urls(s.urls, cfg.s3), s.weight, s.resampled)
                   for s in cfg.sources]
        opts = LoaderOptions(cfg.seed, cfg.batch_size, cfg.workers, cfg.shuffle_buffer,
                             cfg.s3, cfg.prefetch_factor, cfg.persistent_workers,
                             cfg.pin_memory, cfg.on_shard_list_change,
                             cfg.max_skipped_in_a_row)
        super().__init__(sources, opts, PretrainCodec(cfg, train, self.tokenizer), rank,
                         world_size, train, state)


def build_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None,
                 train: bool = True,
                 state: dict[str, Any] | list[dict[str, Any]] | None = None
                 ) -> StreamingLoader:
    """The loader of this rank. ``rank``/``world_size`` default to torch.distributed, then
    RANK/WORLD_SIZE, then a single process. ``train=False``: eval transform, no shuffling,
    one pass over every source's shards. ``state``: from :meth:`StreamingLoader.state_dict`,
    or the list of every rank's (needed when the world size or worker count changed).
    """
    return StreamingLoader(cfg, rank, world_size, train, state)
