"""Per-source streams: shard URL lists, their split over (rank, worker) slots, the shard
order (resampled forever, or one shuffled pass), tar members grouped into raw samples, and
the accounting of shards that are missing, damaged or fail to read.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from pretrain.data.config import S3Config, SourceConfig
from pretrain.data.shard_schedule import ShardSchedule
from pretrain.data.stats import SkipCounter
from pretrain.data.storage import RetryingReader, is_missing, read_small, redact_url
from pretrain.data.tar_stream import ShardCursor, TarDamage, open_tar_stream, tar_members

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


def stats_sidecar(url: str) -> str | None:
    """URL of img2dataset's per-shard statistics file (``00042.tar`` -> ``00042_stats.json``,
    written next to each shard; its ``successes`` field is the shard's sample count), or
    None for URLs that are not plain shard files."""
    if url.startswith("pipe:"):
        return None
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if url.endswith(suffix):
            return url[: -len(suffix)] + "_stats.json"
    return None


def shard_sample_count(url: str, s3: S3Config) -> int | None:
    """How many samples the shard holds, when its img2dataset ``_stats.json`` says so (one
    small read, only made for a shard that broke); None when unknown."""
    sidecar = stats_sidecar(url)
    if sidecar is None:
        return None
    try:
        count = json.loads(read_small(sidecar, s3)).get("successes")
    except Exception:  # absent or unreadable: the count is simply unknown
        return None
    return count if isinstance(count, int) and count >= 0 else None


def count_lost(url: str, source: str, s3: S3Config, counter: SkipCounter, delivered: int,
               partial: bool) -> int:
    """Count and return the samples of a shard that a broken read did not deliver.

    With the shard's sample count known (:func:`shard_sample_count`): that count minus the
    ``delivered`` complete samples, exactly. Without it: only the sample cut in the middle
    (``partial``), a lower bound: samples after a break cannot be seen.
    """
    total = shard_sample_count(url, s3)
    lost = max(total - delivered, int(partial)) if total is not None else int(partial)
    counter.skip(source, "lost_samples", lost)
    return lost


def _new_outcome(cursor: ShardCursor) -> dict[str, Any]:
    return {"status": "complete", "failed": False, "samples": 0, "cursor": cursor,
            "error": ""}


def read_shard(url: str, source: str, s3: S3Config, counter: SkipCounter,
               outcome: dict[str, Any] | None = None, cursor: ShardCursor | None = None,
               count_damage: bool = True) -> Iterator[RawSample]:
    """Raw samples of one tar shard, in tar order, from ``cursor`` (None: the start).

    ``outcome`` is filled in for the caller: ``status`` (``complete``, ``missing``,
    ``damaged`` or ``failed``, see :mod:`pretrain.data.shard_schedule`), ``failed`` (not
    complete), ``samples`` (delivered by this read), ``cursor`` (where a retry goes on) and
    ``error``. A missing shard is counted ``missing_shard``. A damaged one (``count_damage``)
    is counted ``unreadable_shard`` when nothing of it could be parsed, else
    ``truncated_shard``, plus ``lost_samples`` (:func:`count_lost`) and ``unread_bytes``
    (the bytes after the break, when the object size is known). A failed read counts nothing
    here: the caller retries it later or counts it. The last sample before a break is
    delivered only when the break is inside a member of another sample; otherwise its
    missing members may be the ones that were cut, and it is dropped and counted lost.
    """
    outcome = outcome if outcome is not None else {}
    cursor = cursor or ShardCursor()
    outcome.update(_new_outcome(cursor))
    events: dict[str, int] = {}
    start = 0 if cursor.compressed else cursor.offset
    try:
        reader = RetryingReader(url, s3, events, start=start)
    except Exception as err:
        _opening_failed(url, source, counter, outcome, err)
        counter.event(source, "shard_retries", events.get("shard_retries", 0))
        return
    current: RawSample | None = None
    done = cursor.samples if not cursor.compressed else 0  # complete samples passed
    try:
        with reader:
            counter.event(source, "shards_opened")
            stream, compressed = open_tar_stream(reader)
            for member in tar_members(stream, 0 if compressed else start):
                prefix, ext = base_plus_ext(member.name)
                if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
                    continue
                if current is not None and current["__key__"] != prefix:
                    done += 1
                    if done > cursor.samples:  # else: passed before the break (compressed)
                        outcome["samples"] += 1
                        outcome["cursor"] = ShardCursor(member.offset, done, compressed)
                        yield current  # before reading on: a break below must not cost it
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                current[ext.lower()] = member.data
            if current is not None and done + 1 > cursor.samples:
                outcome["samples"] += 1
                outcome["cursor"] = ShardCursor(0, done + 1, compressed)
                yield current
    except TarDamage as damage:
        outcome.update(status="damaged", failed=True, error=str(damage))
        cut_key = base_plus_ext(damage.member)[0] if damage.member else None
        if current is not None and cut_key is not None and cut_key != current["__key__"]:
            done += 1  # the break is in the next sample's member: this one is whole
            outcome["samples"] += 1
            outcome["cursor"] = ShardCursor(outcome["cursor"].offset, done, compressed)
            yield current
            current = None
        if count_damage:
            _count_damage(url, source, s3, counter, damage, reader.size, done,
                          partial=current is not None or cut_key is not None)
    except Exception as err:
        outcome.update(status="failed", failed=True, error=_describe(err))
        log.warning("shard %s of source %r: read broke after %d samples (%s); it will be "
                    "resumed there", redact_url(url), source, outcome["samples"],
                    outcome["error"])
    finally:
        counter.event(source, "shard_retries", events.get("shard_retries", 0))


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {redact_url(str(err))[:200]}"


def _opening_failed(url: str, source: str, counter: SkipCounter, outcome: dict[str, Any],
                    err: BaseException) -> None:
    outcome.update(failed=True, error=_describe(err))
    if is_missing(err):
        outcome["status"] = "missing"
        counter.skip(source, "missing_shard")
        log.warning("shard %s of source %r does not exist (%s); skipped", redact_url(url),
                    source, outcome["error"])
    else:
        outcome["status"] = "failed"
        log.warning("shard %s of source %r could not be opened (%s)", redact_url(url), source,
                    outcome["error"])


def _count_damage(url: str, source: str, s3: S3Config, counter: SkipCounter,
                  damage: TarDamage, size: int | None, delivered: int, partial: bool) -> None:
    reason = "unreadable_shard" if damage.offset == 0 else "truncated_shard"
    counter.skip(source, reason)
    lost = count_lost(url, source, s3, counter, delivered, partial)
    unread = size - damage.offset if size is not None and size > damage.offset else 0
    counter.event(source, "unread_bytes", unread)
    log.warning("shard %s of source %r is damaged: %s (counted %s; %d samples delivered, %d "
                "counted lost, %d bytes not read)", redact_url(url), source, damage, reason,
                delivered, lost, unread)


def source_samples(source: SourceConfig, urls: list[str], resampled: bool, seed: int,
                   s3: S3Config, counter: SkipCounter, shuffle_buffer: int,
                   shuffle_initial: int, shuffle_shards: bool = True) -> Iterator[RawSample]:
    """The raw sample stream of one source for one slot (``urls`` already split), with the
    fault policy of :class:`~pretrain.data.shard_schedule.ShardSchedule`: failed shards are
    retried later from where they broke and an outage waits; a resampled stream ends only
    when every owned shard is missing or unreadable, or when a long run of complete reads
    gave no sample (empty shards), instead of spinning forever.
    """
    owned = len(set(urls))
    limit = 10 * owned + 10

    def give_up(url: str, cursor: ShardCursor) -> None:
        counter.skip(source.name, "unreadable_shard")
        count_lost(url, source.name, s3, counter, cursor.samples, partial=False)

    def samples() -> Iterator[RawSample]:
        schedule = ShardSchedule(shard_order(urls, resampled, seed, shuffle_shards), owned,
                                 resampled, source.name, s3, counter, give_up)
        barren = 0
        for url, cursor in schedule:
            outcome: dict[str, Any] = {}
            yield from read_shard(url, source.name, s3, counter, outcome, cursor,
                                  count_damage=url not in schedule.damaged)
            schedule.report(url, outcome)
            if outcome["status"] == "complete":
                barren = 0 if outcome["samples"] else barren + 1
            if resampled and barren >= limit:
                log.error("source %r: %d shard reads in a row gave no sample; ending its "
                          "stream", source.name, barren)
                counter.event(source.name, "sources_ended")
                break

    stream: Iterator[RawSample] = samples()
    if shuffle_buffer > 1:
        stream = wds.filters.shuffle(shuffle_buffer, min(shuffle_initial, shuffle_buffer),
                                     rng=random.Random(seed + 1))(stream)
    return stream
