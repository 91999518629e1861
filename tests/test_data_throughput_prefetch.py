"""Prefetch of the next shard: while a slot reads shard i, shard i+1's first bytes come in
the background, so slow storage costs about one shard's time for two, and the samples,
resume cursors and counts are the same as without it (faults included)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from s3_server import good_samples, jpeg_bytes, write_tar

import data.storage as storage
from data.config import S3Config
from data.stats import SkipCounter
from data.stream import SourceStream


class SlowFile:
    """A stored object behind a slow link: every read waits ``latency`` plus its bytes over
    ``bandwidth`` (an object store's per-request latency and throughput). A path listed
    in ``breaks`` fails once, at that byte, like a connection reset mid-transfer."""

    def __init__(self, path: str, offset: int, latency: float, bandwidth: float,
                 breaks: dict[str, int]):
        self.data = Path(path).read_bytes()  # a missing path raises FileNotFoundError
        self.size = len(self.data)
        self.pos, self.path = offset, path
        self.latency, self.bandwidth, self.breaks = latency, bandwidth, breaks

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else min(len(self.data), self.pos + n)
        cut = self.breaks.get(self.path)
        if cut is not None and self.pos < cut:
            end = min(end, cut)
        elif cut is not None and self.pos >= cut:
            del self.breaks[self.path]  # once: a retry reads on
            raise ConnectionResetError("connection reset by peer (test)")
        out = self.data[self.pos:end]
        self.pos = end
        time.sleep(self.latency + len(out) / self.bandwidth)
        return out

    def close(self) -> None:
        pass


@pytest.fixture
def slow_storage(monkeypatch):
    """Make every shard open through :class:`SlowFile`; returns its settings to tune."""
    settings = {"latency": 0.0, "bandwidth": 1e12, "breaks": {}}

    def open_once(url, cfg, offset):
        return SlowFile(url, offset, settings["latency"], settings["bandwidth"],
                        settings["breaks"])

    monkeypatch.setattr(storage, "_open_once", open_once)
    return settings


def _stream(urls, prefetch: bool, counter: SkipCounter) -> SourceStream:
    fake_now = [0.0]

    def sleep(seconds: float) -> None:  # the fault policy's waits, without waiting
        fake_now[0] += seconds

    s3 = S3Config(retries=0, backoff=0.0, max_backoff=0.01,
                  prefetch_bytes=(32 << 20) if prefetch else 0)
    return SourceStream("src", urls, slot=0, nslots=1, seed=0, s3=s3, counter=counter,
                        resampled=False, shuffle=False, clock=lambda: fake_now[0],
                        sleep=sleep)


def _read_all(urls, prefetch: bool) -> tuple[list, list, float]:
    counter = SkipCounter()
    stream = _stream(urls, prefetch, counter)
    t0 = time.perf_counter()
    seen = [(raw["__key__"], stream.cursor().to_dict()) for raw in stream]
    return seen, sorted(counter.drain()), time.perf_counter() - t0


def _big_samples(prefix: str, n: int) -> list[dict]:
    return [{"__key__": f"{prefix}{i:03d}", "jpg": jpeg_bytes(i, size=96), "txt": "c"}
            for i in range(n)]


def test_two_slow_shards_take_about_one_shards_time(tmp_path, slow_storage):
    urls = [str(write_tar(tmp_path / f"{i}.tar", _big_samples(f"s{i}_", 6))) for i in range(2)]
    size = Path(urls[0]).stat().st_size
    # A link that needs ~0.6 s per shard: reading shard 0 hides shard 1's transfer.
    slow_storage.update(latency=0.001, bandwidth=size / 0.6)
    plain, _, t_plain = _read_all(urls, prefetch=False)
    fetched, _, t_fetched = _read_all(urls, prefetch=True)
    assert fetched == plain and len(plain) == 12
    assert t_plain > 1.1  # the sum: two shards one after the other
    assert t_fetched < 0.75 * t_plain  # about the max: the second came in meanwhile


def test_samples_cursors_and_fault_counts_are_the_same_with_prefetch(tmp_path, slow_storage):
    good = [write_tar(tmp_path / f"g{i}.tar", good_samples(f"g{i}_", 4)) for i in range(3)]
    whole = write_tar(tmp_path / "cut.tar", good_samples("cut_", 4)).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])  # truncated: counted truncated_shard
    flaky = write_tar(tmp_path / "flaky.tar", good_samples("flaky_", 4))
    urls = [str(good[0]), str(flaky), str(cut), str(tmp_path / "missing.tar"),
            str(good[1]), str(good[2])]
    results = []
    for prefetch in (False, True):
        # the flaky shard's connection resets once, two samples in: set aside, retried
        slow_storage["breaks"] = {str(flaky): flaky.stat().st_size // 2}
        results.append(_read_all(urls, prefetch))
    (plain, plain_counts, _), (fetched, fetched_counts, _) = results
    assert fetched == plain
    assert fetched_counts == plain_counts
    counts = {(kind, name): n for kind, _, name, n in plain_counts}
    assert counts[("skip", "missing_shard")] == 1 and counts[("skip", "truncated_shard")] == 1
    assert counts[("event", "shard_failures")] == 1
    keys = [k for k, _ in plain]
    assert sorted(k for k in keys if k.startswith("flaky_")) == [f"flaky_{i:04d}"
                                                               for i in range(4)]
    assert len(keys) == len(set(keys))  # nothing repeated by the retry


def test_prefetch_bytes_is_validated():
    with pytest.raises(ValueError, match="s3.prefetch_bytes"):
        S3Config(prefetch_bytes=-1)
