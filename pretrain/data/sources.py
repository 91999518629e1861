"""Per-source streams: shard URL lists, their split over (rank, worker) slots, the shard
order (resampled forever, or one shuffled pass) and tar members grouped into raw samples.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Iterator
from typing import Any

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from pretrain.data.config import S3Config, SourceConfig
from pretrain.data.stats import SkipCounter
from pretrain.data.storage import RetryingReader, redact_url

log = logging.getLogger(__name__)

RawSample = dict[str, Any]
"""Tar members of one sample by lower-case extension, plus ``__key__`` and ``__url__``."""


def expand_urls(urls: list[str] | str, s3: S3Config | None = None) -> list[str]:
    """All shard URLs of a source, in order.

    Each item is a brace pattern (``{000000..041407}``; several may be joined with ``::``
    as in webdataset), or a path/URL ending in ``.txt`` listing shard URLs (one per line,
    ``#`` comments allowed; lines may use braces too).
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in item.split("::"):
            part = part.strip()
            if not part:
                continue
            if part.endswith(".txt"):
                out.extend(expand_urls(_read_list(part, s3 or S3Config()), s3))
            else:
                out.extend(braceexpand.braceexpand(part))
    return out


def _read_list(url: str, s3: S3Config) -> list[str]:
    with RetryingReader(url, s3) as reader:
        text = reader.read().decode("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def shards_for_slot(urls: list[str], slot: int, nslots: int, resampled: bool) -> list[str]:
    """The shards that (rank, worker) slot ``slot`` of ``nslots`` may read.

    With at least as many shards as slots, each slot owns a disjoint stride of the list, so
    no two slots ever read the same shard (resampling then happens within the owned part).
    With fewer shards than slots, a resampled slot draws from all shards (slots then may
    read the same shard at the same time, but with different sample order and in different
    shuffle buffers); a one-pass slot gets its stride, possibly empty, so that each shard
    is still read exactly once per pass overall.
    """
    if len(urls) >= nslots or not resampled:
        return urls[slot::nslots]
    return list(urls)


def shard_order(urls: list[str], resampled: bool, seed: int, shuffle: bool = True
                ) -> Iterator[str]:
    """Shard URLs in reading order: drawn with replacement forever (webdataset's
    ResampledShards, seeded so the order is a function of ``seed``), or one pass in a
    seeded shuffled order (``shuffle=False``: as listed)."""
    if not urls:
        return iter(())
    if resampled:
        shards = wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0,
                                     deterministic=True)
        return (item["url"] for item in shards)
    order = list(urls)
    if shuffle:
        random.Random(seed).shuffle(order)
    return iter(order)


def read_shard(url: str, source: str, s3: S3Config, counter: SkipCounter,
               outcome: dict[str, bool] | None = None) -> Iterator[RawSample]:
    """Raw samples of one tar shard, in tar order.

    A shard that cannot be opened (after the reader's retries), is not a tar, or breaks
    mid-way is counted once as ``unreadable_shard``, logged with its redacted URL, and
    ended; complete samples read before the break are kept, the partial one is dropped.
    ``outcome["failed"]`` tells the caller which happened.
    """
    outcome = outcome if outcome is not None else {}
    outcome["failed"] = False
    events: dict[str, int] = {}
    current: RawSample | None = None
    try:
        with RetryingReader(url, s3, events) as reader, \
                tarfile.open(fileobj=reader, mode="r|*") as tar:
            counter.event(source, "shards_opened")
            for member in tar:
                if not member.isreg():
                    continue
                prefix, ext = base_plus_ext(member.name)
                if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
                    continue
                if current is not None and current["__key__"] != prefix:
                    yield current  # before reading on: a break below must not cost it
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                current[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield current
    except Exception as err:
        outcome["failed"] = True
        counter.skip(source, "unreadable_shard")
        log.warning("skipping unreadable shard %s of source %r: %s: %s", redact_url(url),
                    source, type(err).__name__, redact_url(str(err))[:200])
    finally:
        counter.event(source, "shard_retries", events.get("shard_retries", 0))


def source_samples(source: SourceConfig, urls: list[str], resampled: bool, seed: int,
                   s3: S3Config, counter: SkipCounter, shuffle_buffer: int,
                   shuffle_initial: int, shuffle_shards: bool = True) -> Iterator[RawSample]:
    """The raw sample stream of one source for one slot (``urls`` already split).

    Shards that failed once are not drawn again by this slot. A resampled stream ends
    (with an error in the log) when every owned shard failed or a long run of shards gave
    no sample, instead of spinning forever.
    """
    failed: set[str] = set()
    owned = len(set(urls))
    limit = 10 * owned + 10

    def samples() -> Iterator[RawSample]:
        barren = 0
        for url in shard_order(urls, resampled, seed, shuffle_shards):
            if url in failed:
                continue
            outcome: dict[str, bool] = {}
            n = 0
            for sample in read_shard(url, source.name, s3, counter, outcome):
                n += 1
                yield sample
            if outcome["failed"]:
                failed.add(url)
            barren = 0 if n else barren + 1
            if resampled and (barren >= limit or len(failed) >= owned):
                log.error("source %r: no readable samples in the shards of this slot; "
                          "ending its stream", source.name)
                break

    stream: Iterator[RawSample] = samples()
    if shuffle_buffer > 1:
        stream = wds.filters.shuffle(shuffle_buffer, min(shuffle_initial, shuffle_buffer),
                                     rng=random.Random(seed + 1))(stream)
    return stream
