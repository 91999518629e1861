"""The fault policy of a source stream: which shard it reads next, and what becomes of a
shard whose read did not complete.

Each read of a shard ends one of four ways (``read_shard``'s ``outcome["status"]``):

- ``complete``: nothing to do; a resampled stream may draw the shard again.
- ``missing`` (404 / ``NoSuchKey``, no such file): counted ``missing_shard`` by the read, at
  once and without retry delay; this process never reads it again.
- ``damaged`` (not a tar, cut short, a corrupt header: bytes that will not change when read
  again): counted once per run (``unreadable_shard`` or ``truncated_shard``, plus
  ``lost_samples``; which read counts it: :class:`data.stream.SourceStream`). A shard that
  gave no sample is never read again; one with a readable start stays in a resampled
  stream's draw (its start is good data) and is not counted again.
- ``failed`` (the store did not answer after the reader's in-place retries: connection
  refused or reset, timeouts, 5xx; or it refused the read, see below): the shard is set
  aside with a cursor at its first undelivered sample and retried after a cooldown that
  doubles from ``s3.max_backoff`` up to :data:`COOLDOWN_CAP_S`; the retry continues at the
  cursor, so no sample is lost or repeated. A set-aside shard drawn again (its slot is
  dealt it in the next epoch too) is not skipped: that read is owed to the drawing
  epoch, and ``redrawn`` has it read once the set-aside one is done (see
  :class:`ShardSchedule`; at most :data:`data.stream.MAX_OWED` such reads per shard wait,
  any further one is skipped, logged and counted lost). After two failed reads in a row,
  or with
  nothing left but set-aside shards, the stream waits for its storage (a warning at once
  and every :data:`WAIT_LOG_EVERY_S`; it retries set-aside shards, and starts a fresh one
  only once each of those failed :data:`SHARD_ATTEMPTS` times): an outage pauses the
  stream, it never ends a source. A shard is given up (counted ``unreadable_shard``) only
  after :data:`SHARD_ATTEMPTS` reads in a row that delivered nothing, and only if other
  reads of the stream delivered samples since its first failure: when the store answers
  but that shard does not. Alone, or while nothing else is readable, it is retried for
  ever.

A refused read (:class:`~data.storage.StoreRefusedError`: 403 ``AccessDenied``,
``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``ExpiredToken``, 401, no credentials)
is the store answering, not an outage: waiting for ever would hold every GPU of the run
idle. It is set aside and retried like any failed read (each retry reads the credentials
again, so a refresher that rotates them has ``s3.auth_grace_s`` to do it), but it does
not make the stream wait for storage, and the next read is a fresh shard when one is
left: the reads in between reach readable objects if there are any. Once the stream has
had reads refused in a row (no other failure between them) for ``s3.auth_grace_s`` with
no read delivering since the first, the next refused read raises
:class:`StorageAccessError`, which ends the run with the shard, the store's code and what
to do. A shard refused while other reads of the
stream deliver (a per-object permission) is not the credentials: it is given up like an
unreadable shard after :data:`SHARD_ATTEMPTS` reads, but counted ``forbidden_shard`` (its
undelivered samples ``lost_samples`` as for any given-up shard: exact when its sample-count
sidecar can be read, which a refusing store most likely refuses too).

A resampled stream ends only when every shard it owns is missing, unreadable or given up
(an error is logged and ``sources_ended`` counted).

Which shard comes next after a failed read, and when a set-aside one is retried, depend on
the clock and on faults that a later read of the same shards may not meet. ``faults``
counts those turns (failed reads, reads of set-aside shards) so that
:class:`data.stream.MixedStream` ends a shuffle block at each: a block is then a run of
reads that a resume re-reads alike, with :meth:`ShardSchedule.replay` on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from data.config import S3Config
from data.stats import SkipCounter
from data.storage import StorageAccessError, refused_code
from data.tar_stream import ShardCursor
from runtime.redact import redact_url

log = logging.getLogger(__name__)

SHARD_ATTEMPTS = 4
"""Failed reads in a row (delivering nothing) before a shard may be given up."""
COOLDOWN_CAP_S = 60.0
"""Longest wait before a failed shard is tried again (also: how late, at most, a stream
notices that its storage is back)."""
WAIT_LOG_EVERY_S = 60.0
"""How often a waiting stream repeats its warning."""


_REFRESH = ("Refresh the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_SESSION_TOKEN, the shared credentials file, or data.s3.key/secret/token)")
REFUSAL_CAUSES = {
    "*": ("the credentials are rejected (wrong, expired, or without read permission on "
          "these objects)", _REFRESH),
    # s3fs maps these to PermissionError too (s3fs/errors.py), but new credentials would
    # not help: the signing clock is off, or the objects are archived
    "RequestTimeTooSkewed": ("this machine's clock differs from the store's by more than "
                             "S3 allows (15 minutes), so every signed request is refused",
                             "Synchronise the clock (NTP) of the nodes"),
    "InvalidObjectState": ("the objects are archived (e.g. S3 Glacier) and must be restored "
                           "before they can be read", "Restore the objects"),
}
"""Per refusal code: (what it means, what to do) for :class:`StorageAccessError`'s message;
``"*"``: every other code."""


@dataclass
class SetAside:
    """A shard set aside after a transient failure: where to resume it, failures so far,
    when the first one happened."""
    cursor: ShardCursor
    failures: int
    first_failure: float
    due: float = 0.0
    error: str = ""


class GrowingSet(set):
    """A set of unit keys that only grows (``add``/``update``), keeping the order of the
    additions in :attr:`added`: a reader of it keeps a sorted copy up to date from the
    new keys instead of sorting the whole set again (data/stream.py, once per unit)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        super().__init__()
        self.added: list[str] = []
        self.update(keys)

    def add(self, key: str) -> None:
        if key not in self:
            super().add(key)
            self.added.append(key)

    def update(self, *keys: Iterable[str]) -> None:
        for group in keys:
            for key in group:
                self.add(key)


class ShardSchedule:
    """Shards to read, in order, for one source stream, with the policy above.

    Iterate to get ``(url, cursor)``: cursor None for a fresh read from the start, else the
    place where the shard's earlier read broke. After each read, call :meth:`report` with
    its outcome. ``draws``: the shard order (endless when ``resampled``); ``owned``: how
    many distinct shards it holds. ``give_up(url, cursor, reason)`` counts a shard given up
    (``unreadable_shard`` or ``forbidden_shard``) and its lost samples.
    ``redrawn(url)``: told of a unit drawn while its earlier read is set aside (the same
    shard dealt to the slot again, in the next epoch): a unit has one place in the fault
    state, so the owner keeps the new read owed and sets it aside once the earlier one is
    done (:class:`data.stream.SourceStream`); the draw goes on with the next unit (without
    ``redrawn``, it is skipped). ``clock`` and ``sleep`` are injectable for tests.
    ``faults``: failed reads and reads of set-aside shards yielded so far (see the module
    docstring); ``replaying``: see :meth:`replay`.

    The stream is *waiting for storage* from two failed reads in a row (or from having
    nothing but set-aside shards left) until a read delivers again. Meanwhile it retries
    the set-aside shard due first and starts no fresh shard, which would most likely fail
    too after its own ~15 s of in-place retries (see :meth:`_may_start_fresh`); it warns on
    entering and every :data:`WAIT_LOG_EVERY_S`.
    """

    def __init__(self, draws: Iterator[str], owned: int, resampled: bool, source: str,
                 s3: S3Config, counter: SkipCounter,
                 give_up: Callable[[str, ShardCursor, str], None],
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 redrawn: Callable[[str], None] | None = None):
        self.draws, self.owned, self.resampled = draws, owned, resampled
        self.source, self.s3, self.counter, self.give_up = source, s3, counter, give_up
        self.redrawn = redrawn
        self.clock, self.sleep = clock, sleep
        self.dropped = GrowingSet()  # missing, unreadable or given up: never read again
        self.damaged = GrowingSet()  # damage already counted by this process
        self.aside: dict[str, SetAside] = {}
        self.last_progress = -math.inf  # when a read last delivered samples or completed
        self.failures_in_row = 0
        self.waiting_since: float | None = None
        self.refused_since: float | None = None  # first refused read since the last progress
        self._fresh_next = False  # the last read was refused: draw a fresh shard first
        self._last_warning = -math.inf
        self._last_error = ""
        self.faults = 0
        self.replaying = False
        self._again: str | None = None  # failed while replaying: retried in place
        # why the last replay ended before its end (a shard failing for good), else None
        self.replay_broken: str | None = None
        self.replay_missing: str | None = None  # the last shard found missing in a replay

    def replay(self, on: bool) -> None:
        """Re-read reads made before (a resumed shuffle block, from its start: see
        :class:`data.stream.MixedStream`), or stop. That block was read without a failure
        or a retry (each ends a block), so meanwhile no set-aside shard is retried (their
        retry times were not saved: restored, they are all due, and one retried first would
        change the block) and a read that fails is retried in place, after its cooldown,
        before any other (a fresh shard in its place would change the block too). Off
        again, the set-aside shards are due, as after any resume.

        Best effort: a shard that fails for good since the save cannot be re-read, and
        waiting for it would stop the run (retried in place for ever, a refused shard
        used up ``s3.auth_grace_s`` and ended it, a 5xx for ever made it wait for ever).
        So a read refused, or failing :data:`SHARD_ATTEMPTS` times in a row without
        delivering, ends the replay at once (:meth:`_break_replay`: one warning,
        ``replay_broken`` set): the normal policy takes over from that read on (set
        aside, given up and counted as in a fresh run), and the block is filled on from
        other shards, not as it was."""
        self.replaying, self._again = on, None
        if on:
            self.replay_broken = self.replay_missing = None

    def _break_replay(self, url: str, why: str) -> None:
        """End the replay before its end: ``url`` cannot be re-read (``why``)."""
        self.replaying, self._again, self.replay_broken = False, None, why
        log.warning("source %r: shard %s, read in the resumed shuffle block, %s since the "
                    "save: the block is filled on from other shards, so its samples may "
                    "differ from the uninterrupted run's (the shard is retried, given up and "
                    "counted as in a fresh run; nothing else changes)", self.source,
                    redact_url(url), why)

    def __iter__(self) -> Iterator[tuple[str, ShardCursor | None]]:
        while True:
            if self.replaying:
                again, self._again = self._again, None
                if again is not None and again in self.aside:
                    self._wait(self.aside[again].due)
                    self.faults += 1
                    yield again, self.aside[again].cursor
                    continue
                url = self._draw()  # what the read replayed did: nothing else was due
                if url is not None:
                    yield url, None
                    continue
            # after a refused read, a fresh shard before any retry: while some objects are
            # forbidden, the reads in between reach readable ones (whose progress restarts
            # the grace) instead of cycling through the refused ones' retries
            fresh = self._draw() if self._fresh_next and self._may_start_fresh() else None
            self._fresh_next = False
            if fresh is not None:
                yield fresh, None
                continue
            url = self._due()
            if url is not None:
                self.faults += 1
                yield url, self.aside[url].cursor
                continue
            if self.resampled and len(self.dropped) >= self.owned:
                log.error("source %r: all %d shards of this stream are missing or unreadable; "
                          "ending its stream", self.source, self.owned)
                self.counter.event(self.source, "sources_ended")
                return
            url = self._draw() if self._may_start_fresh() else None
            if url is not None:
                yield url, None
            elif self.aside:
                self._wait()
            else:
                return  # one pass done

    def _due(self) -> str | None:
        now = self.clock()
        due = [(entry.due, url) for url, entry in self.aside.items() if entry.due <= now]
        return min(due)[1] if due else None

    def _may_start_fresh(self) -> bool:
        # While waiting for storage, a fresh shard would most likely fail as well; but if
        # only shards that keep failing are left, one fresh read tells a dead store from
        # a few dead shards (and lets those be given up).
        return self.waiting_since is None or all(
            entry.failures >= SHARD_ATTEMPTS for entry in self.aside.values())

    def _draw(self) -> str | None:
        if self.resampled and len(self.dropped) + len(self.aside) >= self.owned:
            return None  # nothing readable until a set-aside shard is due
        for url in self.draws:
            if url in self.dropped:
                continue
            if url in self.aside:
                # dealt again while its read of an earlier epoch waits for its retry:
                # owed too (skipped, that epoch lost the whole shard; holding the deal
                # until the retry is done would stall it on one shard: a refused one
                # would end the run, its retries the only reads of its stream)
                if self.redrawn is not None:
                    self.redrawn(url)
                continue
            return url
        return None

    def _wait(self, until: float | None = None) -> None:
        """Wait for storage until ``until``, or until the first set-aside shard is due."""
        now = self.clock()
        self._start_waiting(now)
        if until is None:
            until = min(entry.due for entry in self.aside.values())
        delay = max(0.0, until - now)
        self._warn(now, delay)
        self.sleep(delay)

    def _start_waiting(self, now: float) -> None:
        if self.waiting_since is None:
            self.waiting_since = now
            self.counter.event(self.source, "storage_waits")

    def _warn(self, now: float, next_try: float) -> None:
        if now - self._last_warning < WAIT_LOG_EVERY_S:
            return
        self._last_warning = now
        if self.refused_since is not None:
            log.warning("source %r: the object store refuses this stream's reads (last error: "
                        "%s) for %.0f s so far; the run ends when this lasts s3.auth_grace_s "
                        "= %g s without a successful read: refresh the credentials",
                        self.source, self._last_error, now - self.refused_since,
                        self.s3.auth_grace_s)
            return
        log.warning("source %r: storage unavailable: %d shard(s) of this stream failed to "
                    "read and wait for a retry (last error: %s); waiting for %.0f s so far, "
                    "next try in %.1f s", self.source, len(self.aside), self._last_error,
                    now - self.waiting_since, next_try)

    def report(self, url: str, outcome: dict[str, Any]) -> None:
        """Apply the policy to the outcome of the read of ``url`` just finished."""
        status = outcome["status"]
        now = self.clock()
        if status == "complete" or outcome["samples"] > 0:
            self._progress(now)
        if status == "failed":
            self.faults += 1
            code = refused_code(outcome["error"])
            if self.replaying:
                entry = self.aside.get(url)
                failures = 1 + (entry.failures if entry is not None
                                and outcome["samples"] == 0 else 0)
                if code is not None:  # a refusal is no outage: waiting will not end it
                    self._break_replay(url, f"is refused ({code})")
                elif failures >= SHARD_ATTEMPTS:
                    self._break_replay(url, f"failed {failures} reads in a row (last "
                                            f"error: {outcome['error']})")
                else:
                    self._again = url
            if code is None:
                # the grace measures refusals in a row: an outage between two refusals (a
                # 403 from a gateway at each end of it) is no proof of bad credentials
                self.refused_since = None
            else:
                self._fresh_next = True
                self._refused(url, code, outcome["error"], now)
            self._set_aside(url, outcome, now, forbidden=code is not None)
            return
        self.aside.pop(url, None)
        if status == "missing":
            self.dropped.add(url)
            if self.replaying:  # missing since the save, or then too: the owner tells
                self.replay_missing = url
        elif status == "damaged":
            self.damaged.add(url)
            if outcome["cursor"].samples == 0:
                self.dropped.add(url)

    def _refused(self, url: str, code: str, error: str, now: float) -> None:
        """Raise :class:`StorageAccessError` once reads have been refused for
        ``s3.auth_grace_s`` with none delivering since (see the module docstring)."""
        if self.refused_since is None:
            self.refused_since = now
        refused_for = now - self.refused_since
        if refused_for < self.s3.auth_grace_s:
            return
        cause, remedy = REFUSAL_CAUSES.get(code, REFUSAL_CAUSES["*"])
        raise StorageAccessError(
            f"data source {self.source!r}: the object store refused access to shard "
            f"{redact_url(url)} ({code}), and has refused this stream's reads for "
            f"{refused_for:.0f} s (s3.auth_grace_s = {self.s3.auth_grace_s:g}) with none "
            f"succeeding since: {cause}. Last answer: {error}. {remedy} and resume: the "
            f"last checkpoint holds the data position.")

    def _progress(self, now: float) -> None:
        self.last_progress = now
        self.refused_since = None
        self.failures_in_row = 0
        if self.waiting_since is not None:
            waited = now - self.waiting_since
            log.warning("source %r: storage answers again after %.0f s; going on",
                        self.source, waited)
            self.counter.event(self.source, "storage_wait_seconds", round(waited))
            self.waiting_since, self._last_warning = None, -math.inf

    def _set_aside(self, url: str, outcome: dict[str, Any], now: float,
                   forbidden: bool = False) -> None:
        entry = self.aside.get(url)
        if entry is None or outcome["samples"] > 0:
            entry = SetAside(outcome["cursor"], 0, now)
        entry.failures += 1
        entry.cursor, entry.error = outcome["cursor"], outcome["error"]
        self._last_error = f"{redact_url(url)}: {entry.error}"
        if not forbidden:  # after report()'s reset, if this read delivered first
            # A refusal is the store answering, not an outage: it does not make the stream
            # wait for storage. Fresh shards keep being read, which tells a few forbidden
            # objects (given up below) from rejected credentials (the grace ends the run);
            # waiting instead, a few forbidden shards in a row used up the grace on their
            # own retries and ended a healthy run.
            self.failures_in_row += 1
        if entry.failures >= SHARD_ATTEMPTS and self.last_progress > entry.first_failure:
            log.warning("source %r: giving up shard %s after %d failed reads while other "
                        "shards could be read (last error: %s)%s", self.source,
                        redact_url(url), entry.failures, entry.error,
                        "; the store refuses this object: counted forbidden_shard"
                        if forbidden else "")
            self.aside.pop(url, None)
            self.dropped.add(url)
            # a per-object permission is not damage: a reason of its own, same lost count
            self.give_up(url, entry.cursor, "forbidden_shard" if forbidden
                         else "unreadable_shard")
            return
        cooldown = min(max(self.s3.max_backoff, 0.01) * 2 ** (entry.failures - 1),
                       COOLDOWN_CAP_S)
        entry.due = now + cooldown
        self.aside[url] = entry
        self.counter.event(self.source, "shard_failures")
        if self.failures_in_row >= 2:
            self._start_waiting(now)
            self._warn(now, max(0.0, min(e.due for e in self.aside.values()) - now))
