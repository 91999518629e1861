"""Typed configuration of the streaming data pipeline.

Plain dataclasses: ``launch.config.build`` turns YAML/overrides into them and checks types;
``__post_init__`` checks value ranges and raises ``ValueError`` naming the key (pretrain/
must not import launch/, so it cannot raise ``launch.config.ConfigError`` itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from data.config import (
    S3Config,
    check,
    check_no_credentials,
    check_positive_finite,
    check_shard_list_policy,
)
from data.sources import url_items

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SourceConfig:
    """One data source: its shards, sampling weight and which tar members hold what.

    ``urls``: a brace pattern (``s3://laion/{000000..041407}.tar``), a list of them, or a
    path/URL ending in ``.txt`` that lists one shard URL per line.
    ``image_key``: alternatives separated by ``;`` (the first present member is used).
    ``text_key``: caption member, or None for image-only sources (then no caption needed).
    ``tags_key``: ``ext`` (comma separated text) or ``ext:field`` (a JSON member's list
    field), or None.
    ``resampled``: epoch after epoch without replacement for ever (training: each epoch
    deals a seeded permutation of the shards over all rank x worker slots, see
    :mod:`data.epochs`); else one pass over the shards in a seeded shuffled order.
    """

    name: str
    urls: list[str] | str
    weight: float = 1.0
    image_key: str = "jpg;png;webp"
    text_key: str | None = "txt"
    tags_key: str | None = "json:tags"
    resampled: bool = True

    def __post_init__(self) -> None:
        key = f"sources.{self.name}"
        check(bool(self.name), "sources.name", "must not be empty")
        check(bool(self.urls), f"{key}.urls", "must name at least one shard")
        # an entry that names no shard (blank, or only '::' joins) would be dropped when
        # the URLs are expanded, or leave the source none after the run has started
        entries = [self.urls] if isinstance(self.urls, str) else list(self.urls)
        # credentials first: the refusal below quotes the URLs
        check_no_credentials(self.urls, f"{key}.urls")
        check(all(url_items(entry) for entry in entries), f"{key}.urls",
              f"every entry must name a shard pattern or list, got {self.urls!r}")
        # the mix draws u x sum(weights) (data/stream.py): with an infinite weight that is
        # inf, and every draw falls on the last source, whatever the weights
        check_positive_finite(self.weight, f"{key}.weight")
        check(bool(self.image_key.strip(";")), f"{key}.image_key", "must not be empty")
        if self.tags_key is not None:
            ext, _, fld = self.tags_key.partition(":")
            check(bool(ext) and (":" not in self.tags_key or bool(fld)), f"{key}.tags_key",
                   f"must be 'ext' or 'ext:field', got {self.tags_key!r}")


@dataclass
class DataConfig:
    """The whole input pipeline of one run (identical on every rank).

    ``sources`` may be empty in a config (the CPU demo fills in the built-in digits data,
    see :func:`pretrain.data.demo.demo_source`); :func:`build_loader` requires at least one.
    ``shuffle_buffer``: raw samples of a worker are shuffled in blocks of this many (0 or
    1: no shuffle); a resume re-reads at most one block per worker (:mod:`data.stream`).
    ``shuffle_initial`` is no longer used (blocks need no warm-up); it is still accepted
    so that existing configs load.
    ``max_image_pixels``: images whose header declares more pixels are skipped undecoded
    and counted ``oversized_image``; the default is PIL's own decompression-bomb limit.
    ``mean``/``std``: CLIP's normalisation by default (OpenAI CLIP's preprocessing); for
    ImageNet's, use the values of :mod:`models.constants` (defined there once).
    ``on_shard_list_change``: a resume whose source's shard list differs from the saved
    one, or with a source added or removed, is refused (``error``), or (``restart``) starts
    the data pipeline afresh over the new lists, keeping its counts (:mod:`data.state`).
    Sources listed in another order are refused either way (list them as saved).
    ``max_skipped_in_a_row``: a source that delivers this many samples in a row without a
    usable one ends the run, naming the reasons (keys that match nothing made the run
    re-read its shards for ever at step 0); 0: never (a source known to hold long runs of
    unusable samples).
    """

    sources: list[SourceConfig] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 32
    workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False
    persistent_workers: bool = False
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    context_length: int = 77
    tokenizer: str = "ViT-B-32"
    tag_vocab: str | None = None
    seed: int = 0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.5
    max_image_pixels: int = 1024 * 1024 * 1024 // 4 // 3  # PIL's Image.MAX_IMAGE_PIXELS
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    s3: S3Config = field(default_factory=S3Config)
    on_shard_list_change: str = "error"
    max_skipped_in_a_row: int = 10_000  # data.loader.MAX_SKIPPED_IN_A_ROW; 0: never

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        check(len(set(names)) == len(names), "data.sources", f"duplicate names in {names}")
        # each weight is finite (SourceConfig), but their sum can still overflow
        total = sum(s.weight for s in self.sources)  # as data/stream.py sums them
        check(math.isfinite(total), "data.sources",
              f"the sum of the source weights must be finite, got {total} (scale them down: "
              "only their ratios matter)")
        check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        check(self.workers >= 0, "data.workers", "must be >= 0")
        check(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        check(self.shuffle_initial >= 0, "data.shuffle_initial", "must be >= 0")
        check(self.context_length >= 2, "data.context_length", "must be >= 2")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, "data.crop_scale", f"need 0 < lo <= hi <= 1, got {lo, hi}")
        check(0 <= self.hflip <= 1, "data.hflip", "must be a probability in [0, 1]")
        check(self.max_image_pixels >= 1, "data.max_image_pixels",
              f"must be >= 1, got {self.max_image_pixels}")
        check(all(s > 0 for s in self.std), "data.std", "must be > 0")
        check_shard_list_policy(self.on_shard_list_change)
        check(self.max_skipped_in_a_row >= 0, "data.max_skipped_in_a_row",
              f"must be >= 0 (0: never end a source for its skipped samples), got "
              f"{self.max_skipped_in_a_row}")
