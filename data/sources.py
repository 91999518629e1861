"""Per-source shard I/O: shard URL lists, tar members grouped into raw samples (and which
member of a sample to read), and the accounting of shards that are missing, damaged or
fail to read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import braceexpand
from webdataset.tariterators import base_plus_ext

from data.config import S3Config
from data.shard_schedule import SHARD_ATTEMPTS
from data.stats import SkipCounter
from data.storage import (
    RetryingReader,
    ShardChangedError,
    StorageSetupError,
    is_missing,
    read_small,
)
from data.tar_stream import ShardCursor, TarDamage, open_tar_stream, tar_members
from runtime.redact import redact_url

log = logging.getLogger(__name__)

RawSample = dict[str, Any]
"""Tar members of one sample by lower-case extension, plus ``__key__`` and ``__url__``."""
DUPLICATE = "__duplicate__"  # set while a sample is read: an extension it met twice

EXT_ALIASES = {"jpg": ("jpg", "jpeg"), "jpeg": ("jpeg", "jpg"), "tif": ("tif", "tiff"),
               "tiff": ("tiff", "tif")}
"""Spellings of one format: a ``.jpeg`` (or ``.JPEG``: members are keyed lower-case) image
answers ``image_key: jpg``, as in webdataset's own image decoder, which treats both alike."""


def pick_member(sample: RawSample, alternatives: str) -> bytes | None:
    """The first present member among ``a;b;c`` (each also under its :data:`EXT_ALIASES`).

    Shared by pre-training's decoder and streamed classification, so both read the same
    member of a sample."""
    for ext in alternatives.split(";"):
        for spelling in EXT_ALIASES.get(ext, (ext,)):
            if spelling and spelling in sample:
                return sample[spelling]
    return None


class ShardListError(ValueError):
    """A ``.txt`` shard list that cannot be used as one: it lists itself (directly or
    through nested lists), or it lists no shard. Its message names the list, where it was
    listed and, for a loop, the chain of lists (``data.preflight`` raises it as a
    ``StorageAccessError`` naming the source)."""


ListReader = Callable[[str, tuple[str, ...]], bytes | str]
"""``read_list(url, parents)``: the text (or UTF-8 bytes) of the ``.txt`` list ``url``;
``parents`` are the lists that led to it, outermost first (empty for a source's own)."""


def list_label(url: str, parents: tuple[str, ...] = ()) -> str:
    """A shard list in words, with the list it was listed in: ``shard list <url> (listed
    in <parent>)``."""
    return f"shard list {redact_url(url)}" + (
        f" (listed in {redact_url(parents[-1])})" if parents else "")


def expand_urls(urls: list[str] | str, s3: S3Config | None = None,
                read_list: ListReader | None = None) -> list[str]:
    """All shard URLs of a source, in order.

    Each item is a brace pattern (``{000000..041407}``; several may be joined with ``::``
    as in webdataset), or a path/URL ending in ``.txt`` listing shard URLs (one per line,
    ``#`` comments allowed; lines may use braces, ``::`` joins or other lists too).

    The one walker of shard lists: the loader, evaluation, fine-tuning's streamed sets,
    the ``shards`` CLI and the start's check (``data.preflight``, which passes its own
    ``read_list`` to read each list under its rules) all read lists through it. A list
    that lists itself, directly or through nested lists (else: a recursion until Python's
    limit), and a list that lists no shard (empty, or only comments: else the source
    silently trains without that part) raise :class:`ShardListError`. ``read_list``
    (:data:`ListReader`): how a list is read; by default through
    :class:`~data.storage.RetryingReader` with ``s3``.

    A line of a list is used as written: a relative path in it (a shard or a nested list)
    is resolved against the working directory of the process reading it, not against the
    folder of the list that names it.
    """
    read = read_list or _list_reader(s3 or S3Config())
    out: list[str] = []
    for part in url_items(urls):
        out.extend(_expand_item(part, (), read))
    return out


def _list_reader(s3: S3Config) -> ListReader:
    """The loader's way to read a list: whole, through the shard reader and its retries."""
    def read(url: str, _parents: tuple[str, ...]) -> bytes:
        with RetryingReader(url, s3) as reader:
            return reader.read()
    return read


def _expand_item(item: str, parents: tuple[str, ...], read_list: ListReader) -> list[str]:
    """The shard URLs of one item: a brace pattern's expansion, or a list's shards."""
    if not item.endswith(".txt"):
        return list(braceexpand.braceexpand(item))
    if item in parents:
        chain = " -> ".join(redact_url(u) for u in (*parents, item))
        raise ShardListError(f"{list_label(item, parents)} lists itself, through {chain}. "
                             "A shard list names shards, or other lists that do not lead "
                             "back to it")
    data = read_list(item, parents)
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    out: list[str] = []
    for line in url_items(list_lines(text)):
        out.extend(_expand_item(line, (*parents, item), read_list))
    if not out:
        raise ShardListError(f"{list_label(item, parents)} lists no shard (only blank "
                             "lines or '#' comments). Fill the list, or remove it from the "
                             "source's urls")
    return out


def url_items(urls: list[str] | str) -> list[str]:
    """The items of a source's URLs as configured: its patterns and lists, ``::`` joins
    split, before any expansion."""
    items = [urls] if isinstance(urls, str) else list(urls)
    return [part.strip() for item in items for part in item.split("::") if part.strip()]


def list_lines(text: str) -> list[str]:
    """The shard URLs a ``.txt`` shard list holds: one per line, ``#`` comments (indented
    ones too) and blank lines skipped."""
    lines = (ln.strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


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


def part_share(start: int, stop: int, part: int, parts: int) -> int:
    """How many sample indices in ``[start, stop)`` belong to part ``part`` of ``parts``
    (index ``part`` modulo ``parts``, :mod:`data.epochs`)."""
    return len(range(start + (part - start) % parts, stop, parts)) if stop > start else 0


def count_lost(url: str, source: str, s3: S3Config, counter: SkipCounter, delivered: int,
               partial: bool, part: int = 0, parts: int = 1) -> int:
    """Count and return the samples of a shard that a broken read did not deliver.

    With the shard's sample count known (:func:`shard_sample_count`): that count minus the
    ``delivered`` complete samples, exactly. Without it: only the sample cut in the middle
    (``partial``), a lower bound: samples after a break cannot be seen. A read of part
    ``part`` of ``parts`` (which reads the whole shard) counts only the lost samples of its
    part, so the parts of a shard together count each lost sample once.
    """
    total = shard_sample_count(url, s3)
    lost = part_share(delivered, total, part, parts) if total is not None else 0
    if partial and delivered % parts == part:  # the sample cut is number ``delivered``
        lost = max(lost, 1)
    counter.skip(source, "lost_samples", lost)
    return lost


def _new_outcome(cursor: ShardCursor) -> dict[str, Any]:
    return {"status": "complete", "failed": False, "samples": 0, "cursor": cursor,
            "error": ""}


def read_shard(url: str, source: str, s3: S3Config, counter: SkipCounter,
               outcome: dict[str, Any] | None = None, cursor: ShardCursor | None = None,
               count_damage: bool = True, opener: Callable[..., Any] | None = None,
               part: int = 0, parts: int = 1, reread: bool = True) -> Iterator[RawSample]:
    """Raw samples of one tar shard, in tar order, from ``cursor`` (None: the start).

    ``outcome`` is filled in for the caller: ``status`` (``complete``, ``missing``,
    ``damaged`` or ``failed``, see :mod:`data.shard_schedule`), ``failed`` (not
    complete), ``samples`` (delivered by this read), ``cursor`` (where a retry goes on) and
    ``error``. With ``count_damage``, a missing shard is counted ``missing_shard`` and a
    damaged one ``unreadable_shard`` when nothing of it could be parsed, else
    ``truncated_shard``, plus ``lost_samples`` (:func:`count_lost`) and ``unread_bytes``
    (the bytes after the break, when the object size is known). A read of part ``part`` of
    ``parts`` (:mod:`data.epochs`) counts the shard itself (and its unread bytes) only for
    part 0, and the lost samples of its own part: every part reads the whole shard and
    meets the same damage, which the parts together count once. ``opener(url, events,
    start)``: opens the byte stream instead of :class:`~data.storage.RetryingReader` (a
    :class:`~data.storage.ShardPrefetcher`'s ``open``). A failed read counts nothing
    here: the caller retries it later or counts it. The last sample before a break is
    delivered only when the break is inside a member of another sample; otherwise its
    missing members may be the ones that were cut, and it is dropped and counted lost.

    A shard whose object changed since ``cursor`` was taken or while it is read
    (:class:`~data.storage.ShardChangedError`; counted as the event ``shards_changed``) is
    read again from the start of the new object, skipping the samples already passed
    (the likely change is the same shard uploaded again): once per call (``reread``); a
    second change fails the read, to be retried later from there.
    """
    resumable = outcome is not None  # else the caller cannot know where the read broke
    outcome = outcome if outcome is not None else {}
    cursor = cursor or ShardCursor()
    outcome.update(_new_outcome(cursor))
    events: dict[str, int] = {}
    start = 0 if cursor.compressed else cursor.offset
    try:
        reader = (opener(url, events, start) if opener is not None
                  else RetryingReader(url, s3, events, start=start))
    except StorageSetupError:
        raise  # not the shard's: ends the run
    except Exception as err:
        _opening_failed(url, source, counter if count_damage and part == 0 else None,
                        outcome, err)
        counter.event(source, "shard_retries", events.get("shard_retries", 0))
        return
    current: RawSample | None = None
    last_end = start  # where the member read last ends: the next sample may start there
    done = cursor.samples if not cursor.compressed else 0  # complete samples passed
    changed: ShardChangedError | None = None
    try:
        with reader:
            counter.event(source, "shards_opened")
            version = reader.version
            if cursor.version and version and version != cursor.version and start:
                raise ShardChangedError(f"{version} where the saved position was taken in "
                                        f"{cursor.version}")
            outcome["cursor"] = ShardCursor(cursor.offset, cursor.samples, cursor.compressed,
                                            version)
            stream, compressed = open_tar_stream(reader)
            try:
                for member in tar_members(stream, 0 if compressed else start):
                    prefix, ext = base_plus_ext(member.name)
                    if prefix is None or _is_metadata(member.name):
                        continue
                    ext = ext.lower()  # members are keyed lower-case
                    if current is not None and current["__key__"] != prefix:
                        done += 1
                        if done > cursor.samples:  # else: passed before the break
                            outcome["cursor"] = ShardCursor(member.offset, done, compressed,
                                                            version)
                            if _unique(current, source, counter, done, part, parts):
                                outcome["samples"] += 1
                                yield current  # before reading on: a break must not cost it
                        current = None
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    if ext in current:
                        current[DUPLICATE] = ext
                    current[ext] = member.data
                    last_end = member.end
            except TarDamage as damage:
                # Zeros past the usual record padding: damage, unless the shard's own count
                # says every sample was read (a writer that pads to larger records). The
                # sidecar is read only here, for such shards, not for every healthy one.
                if not damage.zero_tail or shard_sample_count(url, s3) != done + int(
                        current is not None):
                    raise
            if current is not None and done + 1 > cursor.samples:
                # at the end-of-archive marker: a read from here finds no more samples
                outcome["cursor"] = ShardCursor(last_end, done + 1, compressed, version)
                if _unique(current, source, counter, done + 1, part, parts):
                    outcome["samples"] += 1
                    yield current
    except TarDamage as damage:
        outcome.update(status="damaged", failed=True, error=str(damage))
        cut_key = base_plus_ext(damage.member)[0] if damage.member else None
        if current is not None and cut_key is not None and cut_key != current["__key__"]:
            done += 1  # the break is in the next sample's member: this one is whole
            outcome["cursor"] = ShardCursor(last_end, done, compressed, version)
            if _unique(current, source, counter, done, part, parts):
                outcome["samples"] += 1
                yield current
            current = None
        if count_damage:
            _count_damage(url, source, s3, counter, damage, reader.size, done,
                          current is not None or cut_key is not None, part, parts)
    except ShardChangedError as err:
        changed = err
    except StorageSetupError:
        raise
    except Exception as err:
        outcome.update(status="failed", failed=True, error=_describe(err))
        # promise no resume: only a caller holding the outcome (its cursor) can resume
        log.warning("shard %s of source %r: read broke after %d samples (%s); %s",
                    redact_url(url), source, outcome["samples"], outcome["error"],
                    "the read can be resumed there" if resumable
                    else "the rest of the shard is not read")
    finally:
        counter.event(source, "shard_retries", events.get("shard_retries", 0))
    if changed is not None:
        yield from _reread_changed(url, source, s3, counter, outcome, done, changed,
                                   count_damage, part, parts, reread)


class ShardReadError(RuntimeError):
    """A shard a reader must read whole whose read kept failing (:func:`read_whole_shard`);
    its message names the shard, where the read stopped and the last error."""


def read_whole_shard(url: str, source: str, s3: S3Config, counter: SkipCounter,
                     attempts: int = SHARD_ATTEMPTS) -> Iterator[RawSample]:
    """Every sample of shard ``url`` once, in tar order, for a one-shot reader whose result
    is wrong without the whole shard (a tag vocabulary, a fine-tuning set in memory).

    :func:`read_shard` with an outcome; a read that ``failed`` (the store stopped
    answering after ``s3.retries`` in-place retries) is resumed at the outcome's cursor,
    as :class:`data.shard_schedule.ShardSchedule` resumes a set-aside shard, after a pause
    of ``s3.max_backoff``: no sample is lost or repeated. After ``attempts`` failed reads
    in a row that delivered nothing (the schedule's :data:`SHARD_ATTEMPTS` rule; each
    read that delivers makes progress, so the loop ends) it raises
    :class:`ShardReadError`. A missing or damaged shard is counted by the read as for
    every reader and not read again (its bytes would not change)."""
    outcome: dict[str, Any] = {}
    cursor: ShardCursor | None = None
    fruitless = 0  # failed reads in a row that delivered nothing
    while True:
        yield from read_shard(url, source, s3, counter, outcome, cursor)
        if outcome["status"] != "failed":
            return
        cursor = outcome["cursor"]
        fruitless = 0 if outcome["samples"] else fruitless + 1
        if fruitless >= attempts:
            raise ShardReadError(
                f"shard {redact_url(url)} of source {source!r} could not be read whole: "
                f"{fruitless} reads in a row failed at sample {cursor.samples} without "
                f"delivering any (each after s3.retries={s3.retries} retries in place; "
                f"last error: {outcome['error']}). A result from part of it would be "
                "wrong: check the store or the shard and run again")
        log.warning("shard %s of source %r: resuming the read at sample %d in %g s (given "
                    "up after %d failed reads in a row that deliver no sample; %d so far)",
                    redact_url(url), source, cursor.samples, s3.max_backoff, attempts,
                    fruitless)
        time.sleep(s3.max_backoff)


def _is_metadata(name: str) -> bool:
    """webdataset's rule for archive metadata (webdataset 1.0, tariterators.py: a top-level
    name that starts and ends with ``__``), skipped; any other name is a sample's member."""
    return "/" not in name and name.startswith("__") and name.endswith("__")


def _unique(sample: RawSample, source: str, counter: SkipCounter, index: int, part: int,
            parts: int) -> bool:
    """Whether ``sample`` (the ``index``-th of its shard) holds each extension once. Two
    members with one name (after lower-casing) make it ambiguous: webdataset refuses the
    shard ("duplicate file name", tariterators.py ``group_by_keys``); we drop the sample and
    count ``duplicate_member``, once, by the part that owns it."""
    if DUPLICATE not in sample:
        return True
    if (index - 1) % parts == part:
        counter.skip(source, "duplicate_member")
        log.warning("sample %s of shard %s (source %r) has two .%s members; skipped",
                    sample["__key__"], redact_url(sample["__url__"]), source,
                    sample[DUPLICATE])
    return False


def _reread_changed(url: str, source: str, s3: S3Config, counter: SkipCounter,
                    outcome: dict[str, Any], done: int, err: ShardChangedError,
                    count_damage: bool, part: int, parts: int,
                    reread: bool) -> Iterator[RawSample]:
    """:func:`read_shard`'s answer to a changed object: ``done`` samples were passed."""
    counter.event(source, "shards_changed")
    # from the start, skipping what was passed: what a compressed shard's cursor means
    restart = ShardCursor(0, done, compressed=True)
    if not reread:
        outcome.update(status="failed", failed=True, error=_describe(err), cursor=restart)
        log.warning("shard %s of source %r changed again (%s); it will be read later",
                    redact_url(url), source, outcome["error"])
        return
    log.warning("shard %s of source %r changed since its read began (%s): reading the new "
                "object from its start, skipping the %d samples already passed",
                redact_url(url), source, _describe(err), done)
    delivered = outcome["samples"]
    yield from read_shard(url, source, s3, counter, outcome, restart, count_damage,
                          part=part, parts=parts, reread=False)
    outcome["samples"] += delivered


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {redact_url(str(err))[:200]}"


def _opening_failed(url: str, source: str, counter: SkipCounter | None,
                    outcome: dict[str, Any], err: BaseException) -> None:
    """``counter``: None when another read counts this shard (see :func:`read_shard`)."""
    outcome.update(failed=True, error=_describe(err))
    if is_missing(err):
        outcome["status"] = "missing"
        if counter is not None:
            counter.skip(source, "missing_shard")
        log.warning("shard %s of source %r does not exist (%s); skipped", redact_url(url),
                    source, outcome["error"])
    else:
        outcome["status"] = "failed"
        log.warning("shard %s of source %r could not be opened (%s)", redact_url(url), source,
                    outcome["error"])


def _count_damage(url: str, source: str, s3: S3Config, counter: SkipCounter,
                  damage: TarDamage, size: int | None, delivered: int, partial: bool,
                  part: int, parts: int) -> None:
    reason = "unreadable_shard" if damage.offset == 0 else "truncated_shard"
    unread = size - damage.offset if size is not None and size > damage.offset else 0
    if part == 0:
        counter.skip(source, reason)
        counter.event(source, "unread_bytes", unread)
    lost = count_lost(url, source, s3, counter, delivered, partial, part, parts)
    counted = reason if part == 0 else f"{reason} by part 0"
    unit = f" (part {part} of {parts}: its samples only)" if parts > 1 else ""
    log.warning("shard %s of source %r is damaged: %s (counted %s; %d samples delivered, %d "
                "counted lost%s, %d bytes not read)", redact_url(url), source, damage, counted,
                delivered, lost, unit, unread)
