"""Before a run computes anything: can the object store of its ``s3://`` sources be read?

Once a run is going, a store that does not answer is waited out (data/shard_schedule.py:
an outage pauses the streams, it never ends the run). At the start, the same wait hides a
configuration mistake for ever: a mistyped ``data.s3.endpoint_url``, a bucket name or
prefix that is not there, credentials the store rejects. Every GPU of the run would sit
idle behind "storage unavailable" warnings, and a SLURM job would requeue into the same.
So each rank opens a few shards of every remote source once, before the model is built
(:func:`check_sources_readable`), and a store that cannot serve any of them ends the run
with one message naming the source, the store's answer and what to check. A resumed run
(a requeued job) has been served by its store: one that does not answer then is an outage
and is waited out as mid-run; a missing source or refused credentials still end it.

Cost: at most :data:`PROBES_PER_SOURCE` opens (a HEAD each, through the shard reader and
its ``s3.retries``) per source and rank, the first success ending a source's probes: at
512 ranks x 3 sources, ~1,500 HEADs at the start of a run, nothing afterwards. A shard
missing here and there is normal at scale and is skipped and counted by the streams; only
a source none of whose probed shards exists is refused. Only ``s3://`` URLs are probed:
``pipe:`` and ``http(s)://`` streams report nothing until read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from data.config import S3Config
from data.shard_schedule import REFUSAL_CAUSES, StorageAccessError
from data.storage import RetryingReader, StoreRefusedError, endpoint, is_missing, refused_code
from runtime.redact import redact_url

log = logging.getLogger(__name__)

PROBES_PER_SOURCE = 3
"""Shards of a source opened at most: its first, middle and last (a wrong prefix or bucket
misses all three; a few missing shards of a good list rarely do)."""


def _spread(urls: Sequence[str], k: int) -> list[str]:
    """Up to ``k`` URLs spread over ``urls``: first, last and evenly between."""
    if len(urls) <= k:
        return list(urls)
    picks = {round(i * (len(urls) - 1) / (k - 1)) for i in range(k)}
    return [urls[i] for i in sorted(picks)]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {redact_url(str(err))[:300]}"


def _probe(name: str, probes: list[str], s3: S3Config, resumed: bool
           ) -> tuple[list[tuple[str, StoreRefusedError]], list[tuple[str, BaseException]]]:
    """Open ``probes`` in turn until one opens: ([], []) then; else the refusals and the
    missing ones. A failure that is neither (the store does not answer through
    ``s3.retries``) raises :class:`StorageAccessError` at once, a store-wide matter; when
    ``resumed``, it is logged and ([], []) returned: the streams wait for the store."""
    refusals: list[tuple[str, StoreRefusedError]] = []
    missing: list[tuple[str, BaseException]] = []
    for url in probes:
        try:
            with RetryingReader(url, s3):  # opens at once, retrying as every read does
                return [], []
        except StoreRefusedError as err:  # maybe this object only: try the others
            refusals.append((url, err))
        except Exception as err:  # noqa: BLE001 - every failure is reported
            if not is_missing(err) and resumed:
                log.warning("data source %r: the object store does not answer (%s); a "
                            "resumed run waits for it", name, _describe(err))
                return [], []
            if not is_missing(err):
                raise StorageAccessError(
                    f"data source {name!r}: cannot read from the object store at "
                    f"{redact_url(endpoint(s3) or 'the default AWS endpoint')}: opening "
                    f"{redact_url(url)} failed through s3.retries = {s3.retries} retries "
                    f"({_describe(err)}). Check data.s3.endpoint_url (or AWS_ENDPOINT_URL) "
                    "and the network from this node; if the store is down, start the run "
                    "again once it is back (a run already going waits for its store)"
                ) from None
            missing.append((url, err))
    return refusals, missing


def check_source_readable(name: str, urls: Sequence[str], s3: S3Config,
                          resumed: bool = False,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise :class:`StorageAccessError` when none of a few of ``urls``' ``s3://`` shards
    can be opened: the store cannot be reached, does not hold them, or refuses them. As for
    a running stream, refusals are retried for ``s3.auth_grace_s`` (each retry reads the
    credentials again: a refresher may be about to rotate them). ``resumed``: the run
    continues a checkpoint, so its store has served it: one that does not answer is an
    outage, waited out as mid-run (a requeued job must not end for it), not a mistake."""
    remote = [u for u in urls if u.startswith("s3://")]
    if not remote:
        return
    probes = _spread(remote, PROBES_PER_SOURCE)
    deadline = clock() + s3.auth_grace_s
    while True:
        refusals, missing = _probe(name, probes, s3, resumed)
        if not refusals and not missing:
            return
        if not refusals or clock() >= deadline:
            break
        log.warning("data source %r: the object store refuses to open its shards (%s); "
                    "trying again for up to %.0f s more (s3.auth_grace_s): refresh the "
                    "credentials", name, refusals[0][1], deadline - clock())
        sleep(max(0.0, min(s3.max_backoff, deadline - clock())))
    if refusals:
        url, err = refusals[0]
        code = refused_code(f"{StoreRefusedError.__name__}: {err}") or "refused"
        cause, remedy = REFUSAL_CAUSES.get(code, REFUSAL_CAUSES["*"])
        raise StorageAccessError(
            f"data source {name!r}: the object store refuses to open its shards "
            f"({len(refusals)} of {len(probes)} tried, for s3.auth_grace_s = "
            f"{s3.auth_grace_s:g} s; e.g. {redact_url(url)}: {err}): {cause}. {remedy}")
    url, err = missing[0]
    raise StorageAccessError(
        f"data source {name!r}: none of the {len(probes)} shards tried exists (its first, "
        f"middle and last of {len(remote)}; e.g. {redact_url(url)}: {_describe(err)}). "
        f"Check the source's urls (bucket, prefix, brace range)")


def check_sources_readable(sources: Sequence[tuple[str, Sequence[str]]], s3: S3Config,
                           resumed: bool = False) -> None:
    """:func:`check_source_readable` for every ``(name, expanded urls)`` source."""
    for name, urls in sources:
        check_source_readable(name, urls, s3, resumed)
