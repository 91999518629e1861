"""Before a run computes anything: can the object store of its ``s3://`` sources be read?

Once a run is going, a store that does not answer is waited out (data/shard_schedule.py:
an outage pauses the streams, it never ends the run). At the start, the same wait hides a
configuration mistake for ever: a mistyped ``data.s3.endpoint_url``, a bucket name or
prefix that is not there, credentials the store rejects. Every GPU of the run would sit
idle behind "storage unavailable" warnings, and a SLURM job would requeue into the same.
So each rank opens its sources' ``.txt`` shard lists and a few shards of every remote
source once, before the model is built (:func:`check_sources_readable`), and a store that
cannot serve them ends the run with one message naming the source, the store's answer and
what to check. A run that continues a checkpoint, or a requeued job (:data:`REQUEUED_ENV`),
has been served by its store: one that does not answer then is an outage and is waited
for here, as the streams would; a missing source or refused credentials still end it.

Cost: each shard list once (the loader reads it again), and at most
:data:`PROBES_PER_SOURCE` shard opens (a HEAD each, plus a LIST for a missing key; through
the shard reader and its ``s3.retries``) per source and rank, the first success ending a
source's probes: at 512 ranks x 3 sources, ~1,500 HEADs at the start of a run, nothing
afterwards. A shard missing here and there is normal at scale and is skipped and counted
by the streams; only a source none of whose probed shards exists is refused. Only
``s3://`` URLs are probed: ``pipe:`` and ``http(s)://`` streams report nothing until read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from data.config import S3Config
from data.shard_schedule import COOLDOWN_CAP_S, REFUSAL_CAUSES, StorageAccessError
from data.sources import expand_urls, url_items
from data.storage import RetryingReader, StoreRefusedError, endpoint, is_missing, refused_code
from runtime.redact import redact_url

log = logging.getLogger(__name__)

PROBES_PER_SOURCE = 3
"""Shards of a source opened at most: its first, middle and last (a wrong prefix or bucket
misses all three; a few missing shards of a good list rarely do)."""
REQUEUED_ENV = "INTERNIMAGE_REQUEUED"
"""Set to ``1`` by the SLURM job wrapper (launch/slurm/job.py) in a requeued job: its run
may have no checkpoint yet, but its store has served it."""


def _spread(urls: Sequence[str], k: int) -> list[str]:
    """Up to ``k`` URLs spread over ``urls``: first, last and evenly between."""
    if len(urls) <= k:
        return list(urls)
    picks = {round(i * (len(urls) - 1) / (k - 1)) for i in range(k)}
    return [urls[i] for i in sorted(picks)]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {redact_url(str(err))[:300]}"


class _Probe:
    """Opens objects of one source with the start's rules (see the module docstring)."""

    def __init__(self, name: str, s3: S3Config, resumed: bool,
                 clock: Callable[[], float], sleep: Callable[[float], None]):
        self.name, self.s3, self.resumed = name, s3, resumed
        self.clock, self.sleep = clock, sleep

    def open(self, url: str) -> BaseException | None:
        """None when ``url`` opens; the refusal or the missing error when it does not. A
        store that does not answer through ``s3.retries`` ends the run (a fresh start) or
        is waited for (a resumed run)."""
        waiting_since = last_warning = None
        while True:
            try:
                with RetryingReader(url, self.s3):  # opens at once, retrying as reads do
                    return None
            except StoreRefusedError as err:
                return err
            except Exception as err:  # noqa: BLE001 - every failure is sorted here
                if is_missing(err):
                    return err
                if not self.resumed:
                    raise StorageAccessError(
                        f"data source {self.name!r}: cannot read from the object store at "
                        f"{redact_url(endpoint(self.s3) or 'the default AWS endpoint')}: "
                        f"opening {redact_url(url)} failed through s3.retries = "
                        f"{self.s3.retries} retries ({_describe(err)}). Check "
                        "data.s3.endpoint_url (or AWS_ENDPOINT_URL) and the network from "
                        "this node; if the store is down, start the run again once it is "
                        "back (a resumed run waits for its store)") from None
                now = self.clock()
                waiting_since = waiting_since if waiting_since is not None else now
                if last_warning is None or now - last_warning >= COOLDOWN_CAP_S:
                    last_warning = now
                    log.warning("data source %r: the object store does not answer (%s) for "
                                "%.0f s so far; a resumed run waits for it", self.name,
                                _describe(err), now - waiting_since)
                self.sleep(self.s3.max_backoff)

    def first_open(self, urls: Sequence[str]) -> tuple[list[tuple[str, BaseException]],
                                                       list[tuple[str, BaseException]]]:
        """Open ``urls`` in turn until one opens: ([], []) then; else (refusals, missing)."""
        refusals: list[tuple[str, BaseException]] = []
        missing: list[tuple[str, BaseException]] = []
        for url in urls:
            err = self.open(url)
            if err is None:
                return [], []
            (refusals if isinstance(err, StoreRefusedError) else missing).append((url, err))
        return refusals, missing

    def require_one(self, urls: Sequence[str], what: str) -> None:
        """Raise :class:`StorageAccessError` unless one of ``urls`` opens; refusals are
        retried for ``s3.auth_grace_s`` (each retry reads the credentials again: a
        refresher may be about to rotate them), as a running stream's."""
        deadline = self.clock() + self.s3.auth_grace_s
        while True:
            refusals, missing = self.first_open(urls)
            if not refusals and not missing:
                return
            if not refusals or self.clock() >= deadline:
                break
            log.warning("data source %r: the object store refuses to open %s (%s); trying "
                        "again for up to %.0f s more (s3.auth_grace_s): refresh the "
                        "credentials", self.name, what, refusals[0][1],
                        deadline - self.clock())
            self.sleep(max(0.0, min(self.s3.max_backoff, deadline - self.clock())))
        if refusals:
            url, err = refusals[0]
            code = refused_code(f"{StoreRefusedError.__name__}: {err}") or "refused"
            cause, remedy = REFUSAL_CAUSES.get(code, REFUSAL_CAUSES["*"])
            raise StorageAccessError(
                f"data source {self.name!r}: the object store refuses to open {what} "
                f"({len(refusals)} of {len(urls)} tried, for s3.auth_grace_s = "
                f"{self.s3.auth_grace_s:g} s; e.g. {redact_url(url)}: {err}): {cause}. "
                f"{remedy}")
        url, err = missing[0]
        raise StorageAccessError(
            f"data source {self.name!r}: {what} not found ({redact_url(url)}: "
            f"{_describe(err)}). Check the source's urls (bucket, prefix, brace range)")


def check_source_readable(name: str, urls: list[str] | str, s3: S3Config,
                          resumed: bool = False,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise :class:`StorageAccessError` when a source's ``s3://`` objects cannot be read:
    one of its ``.txt`` shard lists, or all of a few of its shards (first, middle, last),
    because the store cannot be reached, does not hold them, or refuses them. ``urls``:
    the source's URL items as configured (brace patterns, ``::`` joins, ``.txt`` lists).
    ``resumed``: the run continues a checkpoint (a requeued job counts too): a store that
    does not answer is waited for instead."""
    probe = _Probe(name, s3, resumed or os.environ.get(REQUEUED_ENV) == "1", clock, sleep)
    for item in url_items(urls):  # the lists first: expanding the source reads them
        if item.startswith("s3://") and item.endswith(".txt"):
            probe.require_one([item], f"its shard list {redact_url(item)}")
    remote = [u for u in expand_urls(urls, s3) if u.startswith("s3://")]
    if remote:
        probes = _spread(remote, PROBES_PER_SOURCE)
        where = ("its shards" if len(remote) <= len(probes) else
                 f"its first, middle and last shard (of {len(remote)})")
        probe.require_one(probes, where)


def check_sources_readable(sources: Sequence[tuple[str, list[str] | str]], s3: S3Config,
                           resumed: bool = False) -> None:
    """:func:`check_source_readable` for every ``(name, urls as configured)`` source."""
    for name, urls in sources:
        check_source_readable(name, urls, s3, resumed)
