"""Credentials the object store rejects: a stream ends the run with one clear error after
``s3.auth_grace_s`` instead of waiting for ever as for an outage; credentials rotated in the
shared credentials file within the grace are picked up; a shard the store refuses while
others read (a per-object permission) is given up as ``forbidden_shard``.

Facts used: s3fs translates a botocore ``ClientError`` into a Python exception by its code
(s3fs/errors.py ``translate_boto_error``: 403, ``AccessDenied``, ``InvalidAccessKeyId``,
``SignatureDoesNotMatch``, ``ExpiredToken`` -> PermissionError; codes it does not know, 401
among them -> OSError), with the ``ClientError`` as ``__cause__``. It opens an object with
HEAD, whose error answer has no body: botocore reports code ``403`` only; the GET's error
body carries the store's code. SeaweedFS answers a request signed with an unknown key
``InvalidAccessKeyId`` and one with a wrong secret ``SignatureDoesNotMatch`` (as S3 does).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest
from s3_server import CREDENTIALS, SeaweedServer, good_samples, running_server, write_tar

from data.config import S3Config
from data.stats import SkipCounter
from data.tar_stream import ShardCursor
from pretrain.data import DataConfig, SourceConfig, build_loader

READER = {"accessKey": "reader-key", "secretKey": "reader-secret"}
"""A second identity of the test server, allowed to read bucket ``open`` only."""


# -- classification: s3fs's own translation of the store's answers -------------------------

def _translated(code: str, status: int, message: str = "refused") -> BaseException:
    """What s3fs raises for a store answering ``code`` with HTTP ``status``."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "GetObject"))


@pytest.mark.parametrize("code,status", [
    ("AccessDenied", 403), ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403),
    ("ExpiredToken", 400), ("403", 403), ("401", 401)])
def test_a_refusal_by_the_store_is_recognised_with_its_code(code, status):
    from data.storage import refusal_code

    assert refusal_code("s3://bucket/shard.tar", _translated(code, status)) == code


def test_other_errors_are_not_refusals():
    from botocore.exceptions import NoCredentialsError

    from data.storage import refusal_code

    url = "s3://bucket/shard.tar"
    assert refusal_code(url, _translated("NoSuchKey", 404)) is None  # missing: fails at once
    assert refusal_code(url, _translated("SlowDown", 503)) is None  # the store is busy
    assert refusal_code(url, ConnectionRefusedError("connection refused")) is None  # outage
    assert refusal_code(url, NoCredentialsError()) == "NoCredentials"
    # a local file's mode, or a command's failure, keeps its own handling
    assert refusal_code("/data/shard.tar", PermissionError(13, "Permission denied")) is None
    assert refusal_code("pipe:cat /data/shard.tar", PermissionError("denied")) is None


# -- the stream's policy, on a fake clock ----------------------------------------------------

def _run_schedule(error: str, grace: float, limit_s: float) -> tuple[float, BaseException | None]:
    """Every read of a resampled 2-shard stream fails with ``error``; (fake seconds passed,
    the exception that ended the stream or None when it was still waiting at ``limit_s``)."""
    from data.shard_schedule import ShardSchedule

    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    urls = ["s3://bucket/a.tar", "s3://bucket/b.tar"]
    schedule = ShardSchedule(itertools.cycle(urls), 2, True, "s",
                             S3Config(auth_grace_s=grace, max_backoff=1.0), SkipCounter(),
                             lambda *_: None, clock=lambda: now[0], sleep=sleep)
    try:
        for url, _ in schedule:
            now[0] += 0.5  # the read and its in-place retries
            schedule.report(url, {"status": "failed", "samples": 0, "cursor": ShardCursor(),
                                  "error": error})
            if now[0] > limit_s:
                return now[0], None
    except Exception as err:  # noqa: BLE001 - the test looks at what ended the stream
        return now[0], err
    raise AssertionError("the stream ended without an error")


def test_refused_reads_end_the_stream_after_the_grace_with_one_clear_error():
    error = ("StoreRefusedError: ExpiredToken: The provided token has expired. "
             "(object s3://bucket/a.tar)")
    elapsed, err = _run_schedule(error, grace=100.0, limit_s=10_000)
    assert type(err).__name__ == "StorageAccessError"
    assert 100 <= elapsed <= 100 + 60 + 1  # the grace, at most one cooldown (60 s) more
    text = str(err)
    assert "source 's'" in text and "ExpiredToken" in text and "s3://bucket/" in text
    assert "resume: the last checkpoint holds the data position" in text


@pytest.mark.parametrize(("code", "says"), [
    ("RequestTimeTooSkewed", "Synchronise the clock"), ("InvalidObjectState", "Restore the"),
    ("InvalidAccessKeyId", "Refresh the credentials")])
def test_the_error_says_what_to_do_for_the_refusal_met(code, says):
    """s3fs raises PermissionError for a skewed clock and for archived objects as for bad
    credentials (s3fs/errors.py); refreshing credentials would not help those two."""
    error = f"StoreRefusedError: {code}: refused (object s3://bucket/a.tar)"
    _, err = _run_schedule(error, grace=10.0, limit_s=10_000)
    assert type(err).__name__ == "StorageAccessError" and says in str(err)
    assert ("Refresh the credentials" in str(err)) == (code == "InvalidAccessKeyId")


@pytest.mark.parametrize("error", [
    "OSError: [Errno 111] Connect call failed ('127.0.0.1', 9000)",  # an outage
    "PermissionError: [Errno 13] Permission denied: '/data/a.tar'"])  # a local file's mode
def test_failures_that_are_not_refusals_still_wait_for_ever(error):
    elapsed, err = _run_schedule(error, grace=100.0, limit_s=10_000)
    assert err is None and elapsed > 10_000


# -- a real object store ---------------------------------------------------------------------

class _TwoIdentityServer(SeaweedServer):
    """The test server with a second identity, :data:`READER`, that may read bucket
    ``open`` only (SeaweedFS's ``Action:bucket`` scoping): every other object answers it
    403 ``AccessDenied``."""

    def __init__(self, data_dir: Path):
        super().__init__(data_dir)
        config = json.loads(self.identities.read_text())
        config["identities"].append({"name": "reader", "actions": ["Read:open", "List:open"],
                                     "credentials": [READER]})
        self.identities.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("seaweedfs-auth"), _TwoIdentityServer)


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("authshards")
    return [write_tar(d / f"shard-{i:02d}.tar", good_samples(f"s{i}-", 10, size=16))
            for i in range(3)]


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No credentials anywhere but where a test puts them (no stray ~/.aws, no metadata
    service lookups)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CREDENTIAL_EXPIRATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", CREDENTIALS["AWS_DEFAULT_REGION"])
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in the test (the main thread) after ``seconds``: what a stream
    that waits for ever does to these tests."""
    def expire(*_):
        raise TimeoutError(f"still reading after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cfg(urls: list[str], s3: S3Config, workers: int = 0, resampled: bool = False
         ) -> DataConfig:
    return DataConfig(sources=[SourceConfig("s", urls, resampled=resampled)], image_size=16,
                      batch_size=5, workers=workers, shuffle_buffer=0, context_length=12,
                      s3=s3)


def _fast(server: SeaweedServer, **kw) -> S3Config:
    return S3Config(endpoint_url=server.endpoint, retries=1, backoff=0.05, max_backoff=0.2,
                    connect_timeout=2, read_timeout=10, **kw)


def test_rejected_credentials_end_the_run_with_one_clear_error(server, shard_files, aws_env):
    # Before: every read failed, the streams waited "storage unavailable" for ever.
    urls = server.upload("rejected", shard_files[:2])
    wrong_secret = "not-the-secret-" + "x" * 24
    s3 = _fast(server, key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=wrong_secret,
               auth_grace_s=2.0)
    loader = build_loader(_cfg(urls, s3, workers=2), 0, 1, train=False)
    start = time.monotonic()
    with _deadline(120), pytest.raises(Exception) as caught:  # noqa: PT011 - checked below
        for _ in loader:
            pass
    elapsed = time.monotonic() - start
    # A DataLoader re-raises a worker's exception in the trainer's process, same type.
    assert type(caught.value).__name__ == "StorageAccessError", caught.value
    text = str(caught.value)
    assert "Caught StorageAccessError in DataLoader worker process" in text
    # the store's code (from the GET probe: a HEAD's 403 has none), the shard, the remedy
    assert "SignatureDoesNotMatch" in text
    assert any(f"shard {url}" in text for url in urls)
    assert "refresh the credentials" in text.lower() and "resume" in text
    assert wrong_secret not in text
    assert 2.0 <= elapsed < 90, f"{elapsed:.1f}s"  # the grace was given, and not much more


def _write_credentials(path: Path, key: str, secret: str) -> None:
    tmp = path.with_suffix(".tmp")  # a refresher replaces the file whole
    tmp.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    tmp.replace(path)


class _Seen(logging.Handler):
    """Sets ``event`` when a log record's message contains ``text``."""

    def __init__(self, text: str):
        super().__init__(logging.WARNING)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_credentials_rotated_in_the_credentials_file_within_the_grace_are_picked_up(
        server, shard_files, aws_env, tmp_path, monkeypatch):
    # A credential refresher rewrites the shared credentials file; the process's environment
    # and config cannot be changed from outside. Before: the cached s3fs filesystem kept the
    # credentials its session first found, and the stream waited for ever.
    import data.storage

    # rebuilds after refusals are at most one per FS_REBUILD_MIN_S (15 s) per process; the
    # loader reads in this process (workers=0), so a shorter bound keeps the test short
    monkeypatch.setattr(data.storage, "FS_REBUILD_MIN_S", 1.0)
    urls = server.upload("rotated", shard_files[:2])
    credentials = tmp_path / "credentials"
    _write_credentials(credentials, "expired-key", "expired-secret")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    seen = _Seen("InvalidAccessKeyId")  # a read refused with the old key
    logging.getLogger("data").addHandler(seen)

    def rotate() -> None:
        if seen.event.wait(timeout=60):
            _write_credentials(credentials, CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    rotator = threading.Thread(target=rotate, daemon=True)
    rotator.start()
    loader = build_loader(_cfg(urls, _fast(server, auth_grace_s=60.0)), 0, 1, train=False)
    keys = []
    try:
        with _deadline(90):
            for batch in loader:
                keys += batch["keys"]
    finally:
        logging.getLogger("data").removeHandler(seen)
    rotator.join(timeout=5)
    assert seen.event.is_set(), "no read was refused: the test did not test a rotation"
    assert sorted(k.split("/")[1] for k in keys) == sorted(
        f"s{i}-{j:04d}" for i in range(2) for j in range(10))
    assert not loader.stats.skipped
    assert loader.stats.events["shard_failures"] >= 1


def test_a_shard_refused_while_others_read_is_given_up_as_forbidden(server, shard_files,
                                                                    aws_env):
    # A per-object permission: the credentials work (bucket ``open``), one shard is refused.
    # That is not the credentials: the run goes on, the shard is counted forbidden_shard,
    # even with a grace far shorter than the time it takes to give the shard up.
    readable = server.upload("open", shard_files[:2])
    refused = server.upload("closed", shard_files[2:])
    s3 = _fast(server, key=READER["accessKey"], secret=READER["secretKey"], auth_grace_s=0.1,
               prefetch_bytes=0)
    loader = build_loader(_cfg(refused + readable, s3, resampled=True), 0, 1, train=True)
    keys = []
    with _deadline(90):
        for batch in loader:
            keys += batch["keys"]
            if loader.stats.skipped and len(keys) >= 40:
                break
    assert dict(loader.stats.skipped) == {"forbidden_shard": 1}
    assert {k.split("/")[0] for k in keys} == {"shard-00.tar", "shard-01.tar"}


def _refused(url: str) -> dict:
    return {"status": "failed", "samples": 0, "cursor": ShardCursor(),
            "error": f"StoreRefusedError: AccessDenied: Access Denied (object {url})"}


def test_an_outage_between_two_refusals_does_not_count_toward_the_grace():
    """A 403 at each end of a 10-minute outage (a gateway refusing while its backend comes
    and goes) is no proof of rejected credentials: the grace counts refusals in a row."""
    from data.shard_schedule import ShardSchedule

    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    urls = ["s3://bucket/a.tar", "s3://bucket/b.tar"]
    schedule = ShardSchedule(itertools.cycle(urls), 2, True, "s",
                             S3Config(auth_grace_s=300.0), SkipCounter(), lambda *_: None,
                             clock=lambda: now[0], sleep=sleep)
    reads = iter(schedule)
    url, _ = next(reads)
    schedule.report(url, _refused(url))
    while now[0] < 600:  # the outage
        url, _ = next(reads)
        now[0] += 15.5  # the read's in-place retries
        schedule.report(url, {"status": "failed", "samples": 0, "cursor": ShardCursor(),
                              "error": "OSError: [Errno 111] Connect call failed"})
    url, _ = next(reads)
    schedule.report(url, _refused(url))  # raised StorageAccessError here before


@pytest.mark.parametrize("forbidden", [3, 6, 10])
def test_forbidden_shards_in_a_row_are_given_up_and_the_run_goes_on(forbidden):
    """One pass over ``forbidden`` shards the store refuses, then 20 readable ones, at the
    default retry timings (a refused read spends ~15.5 s on its in-place retries): the
    forbidden ones are given up as forbidden_shard and every readable one is read. Before,
    two refusals in a row made the stream wait for storage, cycling through the refused
    shards' retries until the grace ran out (from 3 in a row)."""
    from data.shard_schedule import ShardSchedule, StorageAccessError

    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    urls = ([f"s3://b/private/{i}.tar" for i in range(forbidden)]
            + [f"s3://b/open/{i}.tar" for i in range(20)])
    given_up, read = [], []
    schedule = ShardSchedule(iter(urls), len(urls), False, "s", S3Config(), SkipCounter(),
                             lambda url, cursor, reason: given_up.append((url, reason)),
                             clock=lambda: now[0], sleep=sleep)
    try:
        for url, _ in schedule:
            if "private" in url:
                now[0] += 15.5
                schedule.report(url, _refused(url))
            else:
                now[0] += 30
                read.append(url)
                schedule.report(url, {"status": "complete", "samples": 100,
                                      "cursor": ShardCursor(), "error": ""})
    except StorageAccessError as err:
        raise AssertionError(f"a healthy run ended: {err}") from None
    assert sorted(given_up) == sorted((u, "forbidden_shard") for u in urls[:forbidden])
    assert sorted(read) == sorted(urls[forbidden:])


def test_refusals_rebuild_the_filesystem_at_most_once_per_bound(monkeypatch):
    """Every refused attempt asks for a new filesystem (to read rotated credentials), from
    every stream of the process; each new botocore session may ask STS again, and the
    process's healthy streams share the filesystem: at most one rebuild per
    FS_REBUILD_MIN_S."""
    import data.storage as storage

    clock = [1000.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    cfg = S3Config(endpoint_url="http://127.0.0.1:1", key="k", secret="s")
    first = storage.s3_filesystem(cfg)
    clock[0] += storage.FS_REBUILD_MIN_S - 1
    storage.forget_filesystem(cfg)
    assert storage.s3_filesystem(cfg) is first  # too soon after its build: kept
    clock[0] += 1
    storage.forget_filesystem(cfg)
    second = storage.s3_filesystem(cfg)
    assert second is not first  # rebuilt: a new session reads the credentials again
    storage.forget_filesystem(cfg)
    assert storage.s3_filesystem(cfg) is second


# -- before the run starts: a store that serves no shard of a source (data/preflight.py) --

def test_a_store_that_cannot_be_reached_is_named_before_the_run_starts(aws_env, monkeypatch):
    # Before: the streams waited "storage unavailable" for ever, the model built and every
    # GPU idle (a mistyped endpoint on a fresh start is no outage to wait out).
    from s3_server import free_port

    from data.preflight import check_source_readable
    from data.shard_schedule import StorageAccessError

    monkeypatch.delenv("INTERNIMAGE_REQUEUED", raising=False)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3 = S3Config(endpoint_url=endpoint, key="k", secret="s", retries=0)
    with _deadline(60), pytest.raises(StorageAccessError) as err:
        check_source_readable("laion", [f"s3://b/s-{i}.tar" for i in range(9)], s3)
    text = str(err.value)
    assert f"data source 'laion': cannot read from the object store at {endpoint}" in text
    assert "s3://b/s-0.tar" in text and "EndpointConnectionError" in text
    assert "data.s3.endpoint_url" in text
    # a source given as a shard list on that store: the list's read is the probe (before,
    # the loader read it first, outside any check: a traceback)
    with _deadline(60), pytest.raises(StorageAccessError, match="cannot read from the "
                                      r"object store .* opening s3://b/train\.txt"):
        check_source_readable("laion", "s3://b/train.txt", s3)
    # a resumed run, or a requeued job, was served by this store: an outage, waited for
    # as the streams would, not a reason to end the job
    class Waited(Exception):
        pass

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:
            raise Waited

    for resumed, env in ((True, None), (False, "1")):
        slept: list[float] = []
        if env:
            monkeypatch.setenv("INTERNIMAGE_REQUEUED", env)
        with _deadline(60), pytest.raises(Waited):
            check_source_readable("laion", ["s3://b/s-{0..8}.tar"], s3, resumed=resumed,
                                  sleep=sleep)
        assert slept == [s3.max_backoff] * 2


def test_a_source_none_of_whose_shards_exists_is_refused_and_a_few_missing_are_not(
        server, shard_files, aws_env):
    from data.preflight import check_source_readable
    from data.shard_schedule import StorageAccessError

    s3 = _fast(server, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
               secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], auth_grace_s=0.0)
    present = server.upload("preflight", shard_files[:1])
    wrong = [f"s3://preflight/wrong-prefix/shard-{i:02d}.tar" for i in range(20)]
    with pytest.raises(StorageAccessError) as err:
        check_source_readable("cc12m", wrong, s3)
    text = str(err.value)
    assert ("data source 'cc12m': its first, middle and last shard (of 20) not found"
            in text)
    assert "wrong-prefix/shard-00.tar" in text and "urls (bucket, prefix" in text
    # a good list with its first and last shard missing: the middle one opens
    check_source_readable("cc12m", [wrong[0], *present, wrong[1]], s3)
    # a shard list the store does not hold is named as such, before any expansion reads it
    with pytest.raises(StorageAccessError) as err:
        check_source_readable("cc12m", ["s3://preflight/lists/train.txt"], s3)
    assert ("data source 'cc12m': its shard list s3://preflight/lists/train.txt not found"
            in str(err.value))


def test_refused_credentials_before_the_run_are_named_after_the_grace_and_rotation_counts(
        server, shard_files, aws_env, tmp_path, monkeypatch):
    import data.storage
    from data.preflight import check_source_readable
    from data.shard_schedule import StorageAccessError

    urls = server.upload("preflight-auth", shard_files[:1])
    wrong_secret = "not-the-secret-" + "y" * 24
    s3 = _fast(server, key=CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=wrong_secret,
               auth_grace_s=0.5)
    start = time.monotonic()
    with _deadline(60), pytest.raises(StorageAccessError) as err:
        check_source_readable("yfcc", urls, s3)
    text = str(err.value)
    assert time.monotonic() - start >= 0.5  # the grace was given
    assert "data source 'yfcc': the object store refuses to open its shards (1 of 1" in text
    assert "SignatureDoesNotMatch" in text and "Refresh the credentials" in text
    assert wrong_secret not in text
    # a refresher rotating the shared credentials file within the grace: the run starts
    monkeypatch.setattr(data.storage, "FS_REBUILD_MIN_S", 0.2)
    credentials = tmp_path / "credentials"
    _write_credentials(credentials, "expired-key", "expired-secret")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    seen = _Seen("InvalidAccessKeyId")
    logging.getLogger("data").addHandler(seen)

    def rotate() -> None:
        if seen.event.wait(timeout=30):
            _write_credentials(credentials, CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    rotating = S3Config(endpoint_url=server.endpoint, retries=0, backoff=0.05,
                        max_backoff=0.3, connect_timeout=2, read_timeout=10, auth_grace_s=30.0)
    # this process may hold a filesystem for these settings from another test, with the
    # credentials its session found then: start from the expired ones
    monkeypatch.setattr(data.storage, "_FS_CACHE", {})
    rotator = threading.Thread(target=rotate, daemon=True)
    rotator.start()
    try:
        with _deadline(60):
            check_source_readable("yfcc", urls, rotating)
    finally:
        logging.getLogger("data").removeHandler(seen)
    assert seen.event.is_set(), "no probe was refused: the test did not test a rotation"


def test_pretraining_over_an_unreachable_store_ends_in_one_line_before_the_model(
        tmp_path, cache, monkeypatch):
    """The trainer's path: `internimage pretrain` refuses before building the model (its
    log never reaches DeepSpeed's engine), exit 2, one line naming the source."""
    from s3_server import free_port

    from tests.pretrain_utils import pretrain_cmd, run_forked

    out = tmp_path / "run"
    source = '[{name: laion, urls: "s3://bucket/shard-{000..099}.tar", weight: 1}]'
    # the rank forked from the forkserver (run_forked: the command's argv, this process's
    # environment as a launched one inherits it), not a fresh interpreter importing torch
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    proc = run_forked(pretrain_cmd(1, out, "--max-steps", "2", f"data.sources={source}",
                                   f"data.s3.endpoint_url=http://127.0.0.1:{free_port()}",
                                   "data.s3.retries=0"), cache, timeout=180, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("internimage pretrain: data source 'laion': cannot read from the "
                           "object store at http://127.0.0.1:"), last
    assert "Traceback" not in proc.stderr
    assert "DeepSpeed info" not in proc.stderr and not (out / "checkpoints").exists()
