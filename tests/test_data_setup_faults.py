"""A read that fails in a way no wait mends ends the run at once, resumed or not.

The readers retry what may be the network or the store, and a resumed run waits for its
store for as long as it takes (data/preflight.py, data/shard_schedule.py): a requeued job
must not die of an outage. Errors of this node's own set-up were taken for an outage too:
a requeued job with a mistyped endpoint (botocore/endpoint.py raises ``ValueError("Invalid
endpoint: ...")``), or started on a node image without s3fs, sat idle on every GPU until
its time limit, then did the same after its requeue. Now they raise
``StorageSetupError`` (a ``StorageAccessError``: one line from the command): a client
configuration error at once; an error of code (TypeError, AttributeError: a library that
does not fit) after its in-place retries, and only while no read of the process has worked
(a dropped connection inside s3fs/aiohttp raises those too: retried and waited out as
before). A connection that is refused (an outage) is still retried.
"""

from __future__ import annotations

import os

import pytest

import data.storage as storage
from data.config import S3Config
from data.preflight import check_source_readable
from data.sources import read_shard
from data.stats import SkipCounter
from data.storage import RetryingReader, StorageAccessError, StorageSetupError

BAD_ENDPOINT = S3Config(endpoint_url="htp//bad host", key="k", secret="s", retries=3,
                        backoff=0.0, max_backoff=0.0)


def _no_wait(seconds: float) -> None:
    raise AssertionError(f"waited {seconds} s for an error no wait mends")


def test_a_resumed_start_with_an_endpoint_that_does_not_parse_is_refused_at_once():
    """Before: "the object store does not answer (ValueError: Invalid endpoint: ...) ...
    a resumed run waits for it", for ever."""
    with pytest.raises(StorageSetupError) as err:
        check_source_readable("laion", ["s3://bucket/shard-{000..003}.tar"], BAD_ENDPOINT,
                              resumed=True, sleep=_no_wait)
    message = str(err.value)
    assert message.startswith("data source 'laion': reading s3://bucket/shard-")
    assert "ValueError: Invalid endpoint: htp//bad host" in message
    assert "not a storage outage" in message and "\n" not in message
    assert isinstance(err.value, StorageAccessError)  # the command's one-line refusal


def test_a_shard_read_with_a_setup_fault_ends_the_stream_without_retrying(monkeypatch):
    """A stream's shard read raises instead of failing the shard (set aside, and waited
    for while no read delivers): a node image without s3fs (imported at the first open)."""
    monkeypatch.setattr(storage.time, "sleep", _no_wait)

    def no_s3fs(cfg):
        raise ModuleNotFoundError("No module named 's3fs'")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "s3_filesystem", no_s3fs)
        outcome: dict = {}
        with pytest.raises(StorageSetupError,
                           match="ModuleNotFoundError: No module named 's3fs'"):
            list(read_shard("s3://bucket/shard-000.tar", "laion", BAD_ENDPOINT, SkipCounter(),
                            outcome))
    with pytest.raises(StorageSetupError, match="Invalid endpoint"):
        RetryingReader("s3://bucket/shard-000.tar", BAD_ENDPOINT)


def test_an_outage_is_still_retried_then_the_shard_fails_for_later():
    """A refused connection (nothing listens on the port) is the store being down: retried
    ``s3.retries`` times in place, then the read fails (the schedule retries it later)."""
    s3 = S3Config(endpoint_url="http://127.0.0.1:9", key="k", secret="s", retries=1,
                  backoff=0.0, max_backoff=0.0, connect_timeout=2.0)
    counter, outcome = SkipCounter(), {}
    assert list(read_shard("s3://bucket/shard-000.tar", "laion", s3, counter, outcome)) == []
    assert outcome["status"] == "failed", outcome
    assert ("event", "laion", "shard_retries", 1) in counter.drain()


def test_an_error_of_code_ends_the_run_only_before_any_read_worked(monkeypatch):
    """A TypeError at every read (a library that does not fit) ends the run after the
    in-place retries; once a read of the process has worked, it is a dropped connection's
    (s3fs #598: a TypeError from aiohttp on a closed connection) and the shard's read fails
    for a later retry, as before."""
    calls = []

    def broken(url, cfg, offset):
        calls.append(offset)
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(storage, "_open_once", broken)
    s3 = S3Config(retries=2, backoff=0.0, max_backoff=0.0)
    monkeypatch.setitem(storage._reads, "pid", None)
    with pytest.raises(StorageSetupError, match="TypeError: 'NoneType'"):
        list(read_shard("s3://bucket/shard-000.tar", "laion", s3, SkipCounter(), {}))
    assert len(calls) == 3  # the first try and its 2 retries
    # a remote read of this process has delivered bytes (another process's does not count)
    monkeypatch.setitem(storage._reads, "pid", os.getpid())
    outcome: dict = {}
    assert list(read_shard("s3://bucket/shard-000.tar", "laion", s3, SkipCounter(),
                           outcome)) == []
    assert outcome["status"] == "failed" and "TypeError" in outcome["error"]


def test_only_a_remote_read_that_delivers_bytes_opens_the_gate(tmp_path, monkeypatch):
    """Opens, local files and shard lists (the start reads those before any shard) do not
    count, nor does another process's read (a forked DataLoader worker starts without)."""
    monkeypatch.setitem(storage._reads, "pid", None)
    listed = tmp_path / "list.txt"
    listed.write_text("s3://bucket/a.tar\n")
    with RetryingReader(str(listed), S3Config()) as reader:
        assert reader.read()
    assert storage.setup_fault(AttributeError("'NoneType' object has no attribute 'read'"))
    monkeypatch.setitem(storage._reads, "pid", os.getpid() + 1)  # the parent's, say
    assert storage.setup_fault(TypeError("x"))
    monkeypatch.setitem(storage._reads, "pid", os.getpid())
    assert not storage.setup_fault(TypeError("x"))
    assert storage.setup_fault(ValueError("Invalid endpoint: htp//x"))  # config: always
