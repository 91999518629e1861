"""Opening shards: local paths, ``s3://`` through s3fs, everything else through webdataset's
``gopen`` (``pipe:``, ``http(s)://``...), with retries, resumable reads and redacted logs.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import IO, Any
from urllib.parse import urlsplit

from pretrain.data.config import S3Config

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_PARAM = re.compile(
    r"(?i)(?P<name>[?&](?:x-amz-[a-z-]*|signature|sig|token|key|secret|password|"
    r"access_?key[a-z_]*|aws_[a-z_]+)=)[^&\s]*")
_SECRET_FLAG = re.compile(r"(?i)(?P<name>--?(?:password|secret|token|key)[= ])\S+")
_SECRET_ENV = re.compile(r"(?P<name>AWS_(?:SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)=)\S+")


def redact_url(url: str) -> str:
    """``url`` with credentials removed, safe to log.

    Drops user:password@ in any embedded URL (also inside ``pipe:`` commands), signed-URL
    query parameters, ``--password X`` style flags and inline AWS variables.
    """
    url = _USERINFO.sub(r"\g<scheme>***@", url)
    url = _SECRET_PARAM.sub(r"\g<name>***", url)
    url = _SECRET_FLAG.sub(r"\g<name>***", url)
    return _SECRET_ENV.sub(r"\g<name>***", url)


def is_remote(url: str) -> bool:
    """True for URLs whose failures may be transient (network, object store, commands)."""
    scheme = urlsplit(url).scheme
    return scheme not in ("", "file") and not re.match(r"^[a-zA-Z]:[\\/]", url)


_FS_CACHE: dict[tuple[int, str], Any] = {}


def s3_filesystem(cfg: S3Config) -> Any:
    """An s3fs filesystem for ``cfg``, one per process (s3fs clients do not survive fork)."""
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    cache_key = (os.getpid(), repr((endpoint, cfg.key, cfg.secret, cfg.token, cfg.region,
                                    cfg.anon, cfg.connect_timeout, cfg.read_timeout)))
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if cfg.region or os.environ.get("AWS_DEFAULT_REGION"):
            client_kwargs["region_name"] = cfg.region or os.environ["AWS_DEFAULT_REGION"]
        fs = s3fs.S3FileSystem(
            anon=cfg.anon,
            endpoint_url=endpoint,
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
    return fs


def _open_once(url: str, cfg: S3Config, offset: int) -> IO[bytes]:
    if url.startswith("s3://"):
        f = s3_filesystem(cfg).open(url, "rb", block_size=cfg.block_size,
                                    cache_type="readahead")
        if offset:
            f.seek(offset)
        return f
    if not is_remote(url):
        path = urlsplit(url).path if url.startswith("file:") else url
        f = open(path, "rb")  # noqa: SIM115 - handed to the caller, closed by RetryingReader
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


def _permanent(url: str, err: BaseException) -> bool:
    # A missing local file will not appear by waiting; on object stores a 404 can be a
    # bucket being recreated or an endpoint coming back, so remote errors are retried.
    return not is_remote(url) and isinstance(err, (FileNotFoundError, IsADirectoryError,
                                                   NotADirectoryError, PermissionError))


class RetryingReader:
    """A read-only byte stream over one shard that survives transient failures.

    On an error while opening or reading, it waits (exponential backoff), reopens the shard
    and continues at the byte offset where the read broke, up to ``cfg.retries`` times in a
    row; then the error propagates and the caller skips the shard. ``events`` counts the
    retries so the pipeline can report them.
    """

    def __init__(self, url: str, cfg: S3Config, events: dict[str, int] | None = None):
        self.url = url
        self.cfg = cfg
        self.events = events if events is not None else {}
        self.offset = 0
        self._f: IO[bytes] | None = None
        self._call(lambda: None)  # open eagerly so an unreachable shard fails here

    def _call(self, op):
        failures = 0
        while True:
            try:
                if self._f is None:
                    self._f = _open_once(self.url, self.cfg, self.offset)
                return op()
            except Exception as err:
                self._drop()
                if _permanent(self.url, err) or failures >= self.cfg.retries:
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
        data = self._call(lambda: self._f.read(n))
        self.offset += len(data)
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
