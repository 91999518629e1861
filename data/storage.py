"""Opening shards: local paths, ``s3://`` through s3fs, everything else through webdataset's
``gopen`` (``pipe:``, ``http(s)://``...), with retries, resumable reads and redacted logs.

A missing object (S3 ``NoSuchKey``/``NoSuchBucket``/404, which s3fs raises as
``FileNotFoundError``; a missing local file) fails at once: waiting will not create it. Every
other error is retried in place. Where the object size is known (s3fs asks for it when it
opens an object; local files), a stream that ends before that size is a broken read, retried
like any other, never a silent end of the shard.

A retry goes on at a byte offset, which only means something in the object the read began
on. So a reader remembers that object's version (:func:`object_version`: S3's ETag, a local
file's size and mtime) and refuses to go on in another one (:class:`ShardChangedError`):
s3fs itself sends ``If-Match: <ETag>`` with every ranged GET of an open file and raises
``FileExpired`` when the object was replaced (S3 answers 412), and a reopen compares the
versions. Splicing the new object's bytes onto the old one's would deliver samples of both,
or misread the rest as damage.

An ``s3://`` read the store refuses (:func:`refusal_code`: 403 ``AccessDenied``,
``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``ExpiredToken``..., 401, or no
credentials found) is retried in place like other errors, each attempt with a new s3fs
filesystem, so credentials rotated in the shared credentials file are read again
(:func:`forget_filesystem`); after the last attempt it raises :class:`StoreRefusedError`
naming the store's code. Whether that ends the run (credentials rejected) or only sets one
shard aside (a per-object permission) is the stream's decision: ``data.shard_schedule``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import sys
import threading
import time
from typing import IO, Any
from urllib.parse import urlsplit

from data.config import S3Config
from runtime.redact import redact_url

log = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    """True for URLs whose failures may be transient (network, object store, commands)."""
    scheme = urlsplit(url).scheme
    return scheme not in ("", "file") and not re.match(r"^[a-zA-Z]:[\\/]", url)


def local_path(url: str) -> str:
    """The file a local shard URL (a path, or ``file:``) names."""
    return urlsplit(url).path if url.startswith("file:") else url


_FS_CACHE: dict[tuple[int, str], Any] = {}
_FS_BUILT_AT: dict[tuple[int, str], float] = {}  # time.monotonic() of each cached one's build
FS_REBUILD_MIN_S = 15.0
"""The least time between two rebuilds of a process's filesystem after refusals (each new
botocore session may ask STS or the metadata service for credentials again)."""


def endpoint(cfg: S3Config) -> str | None:
    """The S3 endpoint a read goes to: the config's, else the AWS environment's; None for
    the AWS default."""
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")


def _fs_cache_key(cfg: S3Config) -> tuple[int, str]:
    return (os.getpid(), repr((endpoint(cfg), cfg.key, cfg.secret, cfg.token, cfg.region,
                               cfg.anon, cfg.connect_timeout, cfg.read_timeout)))


def forget_filesystem(cfg: S3Config) -> None:
    """Drop this process's cached filesystem for ``cfg``: the next :func:`s3_filesystem`
    builds a new one, whose botocore session looks for credentials again.

    Why: a botocore session resolves credentials once, and the static kinds are never read
    again by it (botocore/credentials.py: ``EnvProvider`` without
    ``AWS_CREDENTIAL_EXPIRATION`` and ``SharedCredentialProvider`` return plain
    ``Credentials``; only assume-role, SSO, ``credential_process``, container and instance
    metadata credentials refresh themselves). A new session reads the shared credentials file
    (``AWS_SHARED_CREDENTIALS_FILE``, ``~/.aws/credentials``) again, so a refresher that
    rewrites it is picked up. Credentials in the config (``s3.key``/``secret``/``token``) or
    in the process's environment cannot be changed from outside the process: rotating those
    takes a restart. Called only after a refused read: reads that work pay nothing. At most
    one rebuild per :data:`FS_REBUILD_MIN_S` per process: a refused read makes up to
    ``s3.retries + 1`` attempts, from every stream of every worker of every rank, and the
    filesystem is shared by the process's streams that still read.
    """
    key = _fs_cache_key(cfg)
    if time.monotonic() - _FS_BUILT_AT.get(key, -math.inf) >= FS_REBUILD_MIN_S:
        _FS_CACHE.pop(key, None)


def s3_filesystem(cfg: S3Config) -> Any:
    """An s3fs filesystem for ``cfg``, one per process (s3fs clients do not survive fork)."""
    url = endpoint(cfg)
    cache_key = _fs_cache_key(cfg)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if cfg.region or os.environ.get("AWS_DEFAULT_REGION"):
            client_kwargs["region_name"] = cfg.region or os.environ["AWS_DEFAULT_REGION"]
        fs = s3fs.S3FileSystem(
            anon=cfg.anon,
            endpoint_url=url,
            key=cfg.key or None,  # None: botocore reads AWS_ACCESS_KEY_ID & co. itself
            secret=cfg.secret or None,
            token=cfg.token or None,
            client_kwargs=client_kwargs,
            # Our own loop (RetryingReader) owns the retry policy, with backoff long enough
            # to ride out an endpoint restart; botocore and s3fs only retry briefly.
            config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"},
                           "connect_timeout": cfg.connect_timeout,
                           "read_timeout": cfg.read_timeout},
            skip_instance_cache=True,
            default_block_size=cfg.block_size,
        )
        fs.retries = 2
        _FS_CACHE[cache_key] = fs
        _FS_BUILT_AT[cache_key] = time.monotonic()
    return fs


def _open_once(url: str, cfg: S3Config, offset: int) -> IO[bytes]:
    """``url`` opened for reading at byte ``offset``, one attempt."""
    if url.startswith("s3://"):
        f = s3_filesystem(cfg).open(url, "rb", block_size=cfg.block_size,
                                    cache_type="readahead")
        if offset:
            f.seek(offset)
        return f
    if not is_remote(url):
        f = open(local_path(url), "rb")  # noqa: SIM115 - handed to the caller, closed by RetryingReader
        if offset:
            f.seek(offset)
        return f
    import webdataset as wds

    f = wds.gopen(url, "rb")
    if offset:  # pipes and HTTP streams cannot seek: skip forward by reading
        remaining = offset
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                raise OSError(f"stream ended before offset {offset}")
            remaining -= len(chunk)
    return f


def object_size(f: IO[bytes]) -> int | None:
    """Size in bytes of the object behind an open stream, if the stream knows it: s3fs files
    carry it (from the HEAD request s3fs makes when opening), local files have fstat;
    pipes and HTTP streams do not."""
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None  # a pipe's st_size means nothing


def object_version(f: IO[bytes]) -> str | None:
    """What identifies the content behind an open stream, if the stream knows: an s3fs
    file's ETag (from the HEAD request s3fs makes when opening), a local file's size and
    mtime; None for pipes and HTTP streams."""
    details = getattr(f, "details", None)
    if isinstance(details, dict) and details.get("ETag"):
        return f"etag:{details['ETag']}"
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return f"file:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None


class ShardChangedError(OSError):
    """The object behind a shard URL is no longer the one a read began on (or a saved
    position was taken in): its byte offsets mean nothing in the new one."""


def _expired(err: BaseException) -> bool:
    """s3fs's ``FileExpired``: the object changed under an open file (412 on If-Match)."""
    utils = sys.modules.get("s3fs.utils")
    expired = getattr(utils, "FileExpired", None)
    return expired is not None and isinstance(err, expired)


def is_missing(err: BaseException) -> bool:
    """True when ``err`` says the shard does not exist: a missing local path, or an object
    store's 404 / ``NoSuchKey`` / ``NoSuchBucket`` (s3fs raises those as FileNotFoundError;
    a botocore ``ClientError`` carries the code in its response)."""
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    response = getattr(err, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in ("NoSuchKey", "NoSuchBucket", "404")


def store_error_code(err: BaseException) -> str | None:
    """The error code an object store answered with (botocore ``ClientError.response``),
    found on ``err`` or what it was raised from: s3fs raises its translation of a
    ``ClientError`` (s3fs/errors.py ``translate_boto_error``) with the original as
    ``__cause__``. A HEAD's answer has no body, so its code is the bare HTTP status."""
    for _ in range(4):  # s3fs wraps once; a few more links cost nothing and stop any cycle
        if err is None:
            return None
        response = getattr(err, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code:
            return str(code)
        err = err.__cause__ or err.__context__
    return None


def _no_credentials(err: BaseException) -> bool:
    """botocore's ``NoCredentialsError``: nothing to sign with (it is never a store's answer,
    so s3fs passes it through untranslated)."""
    exceptions = sys.modules.get("botocore.exceptions")
    missing = getattr(exceptions, "NoCredentialsError", None)
    return missing is not None and isinstance(err, missing)


def refusal_code(url: str, err: BaseException) -> str | None:
    """The store's code when ``err`` says the object store refused an ``s3://`` request, else
    None.

    Refused: what s3fs raises as ``PermissionError`` (s3fs/errors.py maps HTTP 403 and the
    codes ``AccessDenied``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``,
    ``ExpiredToken``, ``AccountProblem``, ``InvalidObjectState``... to it), a 401 (not in
    s3fs's map: a plain ``OSError`` whose cause carries the code), and botocore's
    ``NoCredentialsError`` (code ``NoCredentials``). Only ``s3://`` URLs: a local
    ``PermissionError`` is the file's mode and keeps its handling (:func:`_retry_in_place`),
    and ``pipe:``/``http(s)://`` failures carry no code to tell.
    """
    if not url.startswith("s3://"):
        return None
    if _no_credentials(err):
        return "NoCredentials"
    code = store_error_code(err)
    if isinstance(err, PermissionError) or code in ("401", "Unauthorized"):
        return code or type(err).__name__
    return None


class StorageAccessError(RuntimeError):
    """The object store kept refusing a stream's reads for ``s3.auth_grace_s`` with no read
    succeeding: its credentials are rejected. Raised in the data worker, it ends the run (a
    DataLoader re-raises a worker's exception in the trainer with its type and message)."""


class StorageSetupError(StorageAccessError):
    """A read failed in a way no wait mends (:func:`setup_fault`): ends the run at once,
    where a storage outage is retried, and waited for by a resumed run (a requeued job
    with a mistyped endpoint sat idle until its time limit, then did so again)."""


# botocore's errors of the client's own configuration (botocore/exceptions.py), told by
# name: botocore is imported only where s3:// is read. (Not NoCredentialsError: the
# instance metadata service throttling many workers at once raises it too, botocore
# #2117, #1791: it is retried as any other failure.)
_CONFIG_ERRORS = {"NoRegionError", "InvalidRegionError", "ParamValidationError",
                  "UnknownServiceError", "InvalidEndpointConfigurationError",
                  "PartialCredentialsError"}  # a key without its secret, say
# What code that does not fit the installed libraries raises at every read, but a dropped
# connection inside s3fs/aiohttp/botocore sometimes too (s3fs #598, aiohttp #11761)
_CODE_ERRORS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError,
                MemoryError, RecursionError)
# the process (pid) in which a read of a remote shard delivered bytes: opens, local files
# and lists do not count, and a forked DataLoader worker starts without
_reads: dict[str, int | None] = {"pid": None}


def config_fault(err: BaseException) -> bool:
    """True when ``err`` fails every read whatever happens: a package missing on this node
    (s3fs is imported at the first open), a botocore client configuration error (an invalid
    region, parameters), an endpoint that does not parse (botocore/endpoint.py raises
    ``ValueError("Invalid endpoint: ...")``)."""
    if isinstance(err, ImportError):
        return True
    if any(cls.__name__ in _CONFIG_ERRORS for cls in type(err).__mro__):
        return True
    return isinstance(err, ValueError) and str(err).startswith("Invalid endpoint")


def setup_fault(err: BaseException) -> bool:
    """True when no wait mends ``err``: a :func:`config_fault`, or an error of code (a
    TypeError, AttributeError, memory) while no read of a remote shard in this process has
    delivered bytes yet: a library that does not fit fails every read, where once reads
    have delivered such an error is taken for a dropped connection's, retried and waited
    out as before."""
    return config_fault(err) or (isinstance(err, _CODE_ERRORS)
                                 and _reads["pid"] != os.getpid())


def setup_failure(url: str, err: BaseException) -> StorageSetupError:
    """The :class:`StorageSetupError` of a read of ``url`` that failed with ``err``."""
    return StorageSetupError(
        f"reading {redact_url(url)} failed with {type(err).__name__}: "
        f"{redact_url(str(err))[:300]}: not a storage outage but this node's set-up (an "
        "installed package, data.s3.endpoint_url / AWS_ENDPOINT_URL, region or "
        "credentials configuration, memory); retrying cannot mend it")


class StoreRefusedError(PermissionError):
    """The object store refused a shard read through every in-place retry. Its text is
    ``<code>: <the store's message> (object <redacted url>)``: the read's outcome carries
    only the error's text (``data.sources``), so :func:`refused_code` reads the code back
    from there."""


def refused_code(error: str) -> str | None:
    """The store's code in a read's error text (``"<type name>: <text>"``, as
    ``data.sources`` records it) when the read was refused (:class:`StoreRefusedError`),
    else None."""
    prefix = f"{StoreRefusedError.__name__}: "
    return error[len(prefix):].split(":", 1)[0] if error.startswith(prefix) else None


def _probe_refusal(url: str, cfg: S3Config) -> tuple[str, str] | None:
    """(code, message) of the store's refusal of a GET of the object's first byte, or None
    when it does not refuse it.

    Why: s3fs opens an object with HEAD, and a HEAD's error answer has no body, so botocore
    can only report ``403 Forbidden``; a GET's error body says which refusal it is
    (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``ExpiredToken``, ``AccessDenied``),
    which is what an operator needs to know. One request, made only for a refused read.
    """
    try:
        s3_filesystem(cfg).cat_file(url, start=0, end=1)
    except Exception as err:
        code = refusal_code(url, err)
        if code is not None:
            return code, str(err)
    return None


def _refused(url: str, cfg: S3Config, code: str, err: BaseException) -> StoreRefusedError:
    message = str(err)
    if code == "403":  # a HEAD's answer: ask once what the refusal is
        code, message = _probe_refusal(url, cfg) or (code, message)
    return StoreRefusedError(f"{code}: {redact_url(message)[:200]} (object {redact_url(url)})")


def _retry_in_place(url: str, err: BaseException) -> bool:
    # A missing object will not appear by waiting, and a local permission error will not go
    # away: both fail at once, as does a changed object (no offset of the old one holds in
    # it). Anything else may be the network or the store: retry.
    if is_missing(err) or isinstance(err, ShardChangedError):
        return False
    return is_remote(url) or not isinstance(err, PermissionError)


class ShortReadError(OSError):
    """A stream ended before the object's known size: the connection broke silently."""


def read_small(url: str, cfg: S3Config, limit: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of a small object (a sidecar file), one attempt, no retries."""
    f = _open_once(url, cfg, 0)
    try:
        return f.read(limit)
    finally:
        f.close()


class RetryingReader:
    """A read-only byte stream over one shard that survives transient failures.

    On an error while opening or reading, it waits (exponential backoff), reopens the shard
    and continues at the byte offset where the read broke, up to ``cfg.retries`` times in a
    row; then the error propagates and the caller decides (see ``shard_schedule``), a
    refusal by the store as :class:`StoreRefusedError`. A missing object raises at once
    (:func:`is_missing`). ``size`` is the object's size when known; reaching end-of-stream
    before it raises :class:`ShortReadError`, retried as a broken read. ``start``: the byte
    offset to begin at. ``events`` counts the retries so the pipeline can report them.
    ``version``: the :func:`object_version` of the object the first open found (None when
    the stream does not tell); a reopen that finds another one, or s3fs's ``FileExpired``,
    raises :class:`ShardChangedError` at once. (Whether ``start`` belongs to the version a
    saved position was taken in is the caller's check: ``data.sources.read_shard``.)
    """

    def __init__(self, url: str, cfg: S3Config, events: dict[str, int] | None = None,
                 start: int = 0):
        self.url = url
        self.cfg = cfg
        self.events = events if events is not None else {}
        self.offset = start
        self.size: int | None = None
        self.version: str | None = None
        self._f: IO[bytes] | None = None
        self._call(lambda: None)  # open eagerly so an unreachable shard fails here

    def _open(self) -> None:
        f = _open_once(self.url, self.cfg, self.offset)
        seen = object_version(f)
        if self.version is not None and seen is not None and seen != self.version:
            f.close()
            raise ShardChangedError(f"{redact_url(self.url)} changed: {seen} where the read "
                                    f"began on {self.version}")
        self._f, self.version = f, self.version or seen
        if self.size is None:
            self.size = object_size(f)

    def _call(self, op):
        failures = 0
        while True:
            try:
                if self._f is None:
                    self._open()
                return op()
            except Exception as err:
                self._drop()
                if config_fault(err):
                    raise setup_failure(self.url, err) from err
                if _expired(err):
                    raise ShardChangedError(f"{redact_url(self.url)} changed while being "
                                            f"read ({type(err).__name__})") from err
                refused = refusal_code(self.url, err)
                last = not _retry_in_place(self.url, err) or failures >= self.cfg.retries
                if refused is not None:
                    refusal = _refused(self.url, self.cfg, refused, err) if last else None
                    # after _refused's probe: the next attempt, or read, reads them anew
                    forget_filesystem(self.cfg)
                    if refusal is not None:
                        raise refusal from err
                if last:
                    if setup_fault(err):  # after its retries: not a hiccup
                        raise setup_failure(self.url, err) from err
                    raise
                delay = min(self.cfg.backoff * 2**failures, self.cfg.max_backoff)
                failures += 1
                self.events["shard_retries"] = self.events.get("shard_retries", 0) + 1
                log.warning("shard %s: %s: %s; retry %d/%d in %.1fs", redact_url(self.url),
                            type(err).__name__, redact_url(str(err))[:200], failures,
                            self.cfg.retries, delay)
                time.sleep(delay)

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all remaining for -1), retrying transient failures."""
        data = self._call(lambda: self._read_checked(n))
        self.offset += len(data)
        if data and is_remote(self.url):
            _reads["pid"] = os.getpid()
        return data

    def _read_checked(self, n: int) -> bytes:
        data = self._f.read(n)
        if not data and n != 0:
            if self.size is not None and self.offset < self.size:
                raise ShortReadError(f"stream ended at byte {self.offset} of {self.size}")
            wait = getattr(self._f, "wait_for_child", None)  # webdataset's pipe: / curl
            if wait is not None:
                wait()  # a command's output is whole only if it exited 0: raises otherwise
        return data

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # a broken connection may fail to close; nothing to save
                pass
            self._f = None

    def close(self) -> None:
        """Close the underlying stream."""
        self._drop()

    def __enter__(self) -> RetryingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Prefetch:
    """One background fetch: the first bytes of a shard, or the error that stopped it."""

    def __init__(self, url: str):
        self.url = url
        self.events: dict[str, int] = {}
        self.chunks: list[bytes] = []
        self.reader: RetryingReader | None = None
        self.error: BaseException | None = None
        self.eof = False
        self.cancelled = False
        self.done = threading.Event()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


class PrefetchedReader:
    """A shard's byte stream whose first bytes were fetched ahead (:class:`ShardPrefetcher`):
    serves them, then carries on with the prefetch's own :class:`RetryingReader` (already
    at the right offset), or raises the error that stopped the prefetch at exactly the byte
    where it stopped (what the reader would have raised had it been read now)."""

    def __init__(self, job: _Prefetch):
        self._job = job
        self._buf = b"".join(job.chunks)
        job.chunks = []
        self._pos = 0
        # built only for a fetch whose reader opened (ShardPrefetcher.open raises otherwise)
        self.size, self.version = job.reader.size, job.reader.version

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all remaining for -1)."""
        if self._pos < len(self._buf):
            end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
            data = self._buf[self._pos:end]
            self._pos = end
            if n < 0:
                data += self._rest(-1)
            return data
        return self._rest(n)

    def _rest(self, n: int) -> bytes:
        job = self._job
        if job.error is not None:
            raise job.error
        if job.eof or job.reader is None:
            return b""
        return job.reader.read(n)

    def close(self) -> None:
        """Close the underlying stream."""
        self._buf = b""
        self._job.close()

    def __enter__(self) -> PrefetchedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardPrefetcher:
    """Fetches the first ``cfg.prefetch_bytes`` of the shard a stream will read next, in a
    background thread, while the stream decodes the current one.

    At most one shard ahead (a new :meth:`start` cancels an unclaimed fetch of another
    shard), so memory is bounded by ``prefetch_bytes`` per stream. :meth:`open` claims the
    fetch when it is for the same URL from byte 0, else opens the shard as usual; either
    way the caller gets the same bytes and the same errors, raised where it would have met
    them (a missing shard at open, a read that failed every retry at the byte where it
    failed) and the prefetch's retries are added to the caller's ``events``. The order of
    shards, and so the samples and resume cursors, does not depend on prefetching: a wrong
    guess only costs the wasted fetch (its retries are not counted).
    """

    def __init__(self, cfg: S3Config, chunk: int = 1 << 20):
        self.cfg = cfg
        self.chunk = chunk
        self._job: _Prefetch | None = None

    def start(self, url: str) -> None:
        """Begin fetching ``url`` in the background (no-op if already fetching it)."""
        if self.cfg.prefetch_bytes <= 0 or (self._job is not None and self._job.url == url):
            return
        self.cancel()
        job = self._job = _Prefetch(url)
        threading.Thread(target=self._fetch, args=(job,), name="shard-prefetch",
                         daemon=True).start()

    def _fetch(self, job: _Prefetch) -> None:
        got = 0
        try:
            job.reader = RetryingReader(job.url, self.cfg, job.events)
            while got < self.cfg.prefetch_bytes and not job.cancelled:
                data = job.reader.read(min(self.chunk, self.cfg.prefetch_bytes - got))
                if not data:
                    job.eof = True
                    break
                job.chunks.append(data)
                got += len(data)
        except Exception as err:  # handed to whoever claims the shard, at the same point
            job.error = err
        finally:
            if job.cancelled:
                job.close()
            job.done.set()

    def cancel(self) -> None:
        """Drop the unclaimed fetch, if any."""
        job, self._job = self._job, None
        if job is not None:
            job.cancelled = True
            if job.done.is_set():
                job.close()
            job.chunks = []

    def open(self, url: str, events: dict[str, int], start: int = 0
             ) -> RetryingReader | PrefetchedReader:
        """``url`` opened for reading at byte ``start`` (see the class docstring)."""
        job = self._job
        if job is None or job.url != url or start != 0:
            self.cancel()
            return RetryingReader(url, self.cfg, events, start=start)
        self._job = None
        job.done.wait()
        for name, n in job.events.items():
            events[name] = events.get(name, 0) + n
        if job.reader is None:  # opening failed: raise as RetryingReader would have
            raise job.error
        job.reader.events = events  # retries from here on are the caller's
        return PrefetchedReader(job)

    def close(self) -> None:
        """Drop any unclaimed fetch (call when the stream ends)."""
        self.cancel()
