"""A unit set aside after a failed read (waiting for its retry) that its slot is dealt
again in the next epoch: both reads are owed, the retry of the rest to the epoch the unit
was dealt in, the whole shard to the next one (:class:`data.shard_schedule.ShardSchedule`
``redrawn``), also across a resume and a resize; at most ``MAX_OWED`` such reads wait."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from s3_server import good_samples, write_tar

import data.stream as stream_module
from data.config import S3Config
from data.epochs import slot_units
from data.redeal import SourceSpec, redeal_source
from data.stats import SkipCounter
from data.stream import SourceCursor, SourceStream

SEED = 4  # slot 0 of 2 is dealt shard 2 last in epoch 0 and again in epoch 1
S3 = S3Config(retries=0, backoff=0.01, max_backoff=1.0, prefetch_bytes=0)
SAMPLES, SHARDS = 6, 4
STEP_S = 0.1  # the time a sample takes: a retry's first cooldown is 10 samples long
CHECKED = range(3)  # epochs compared (read on to epoch 5: every retry was due by then)


@pytest.fixture(params=[[2], [2, 1]], ids=["retry-reads", "retry-breaks-too"])
def shards(tmp_path, monkeypatch, request):
    """4 shards of 6 samples dealt over 2 slots; slot 0's last unit of epoch 0 breaks after
    2 samples on its first read (a dropped connection; with ``retry-breaks-too`` its retry
    delivers 1 more sample and breaks as well), and slot 0 is dealt it again in epoch 1,
    after one other unit: drawn 6 samples after the failure, before the retry is due (and
    in epoch 2, before that retry is done)."""
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", SAMPLES, size=8)))
            for i in range(SHARDS)]
    deal = [[urls[u] for u in slot_units(SHARDS, 2, 0, SEED, "a", epoch)]
            for epoch in (0, 1)]
    late = deal[0][-1]
    assert deal[1][1] == late  # after one other unit of epoch 1
    real, breaks, broke = stream_module.read_shard, list(request.param), []

    def breaking(url, source, s3, counter, outcome=None, cursor=None, **kw):
        for n, raw in enumerate(real(url, source, s3, counter, outcome, cursor, **kw), 1):
            yield raw
            if url == late and len(broke) < len(breaks) and n == breaks[len(broke)]:
                broke.append(url)
                outcome.update(status="failed", failed=True, error="simulated reset")
                return

    monkeypatch.setattr(stream_module, "read_shard", breaking)
    return {"urls": urls, "late": late, "broke": broke, "breaks": breaks}


def _every_sample(epochs: range) -> Counter[tuple[str, int]]:
    """Each sample of the data once per epoch (:mod:`data.epochs`: every unit is dealt to
    one slot per epoch)."""
    return Counter({(f"s{i}-{j:04d}", epoch): 1 for epoch in epochs for i in range(SHARDS)
                    for j in range(SAMPLES)})


def _dealt_to_slot_0(urls: list[str], epochs: range) -> Counter[tuple[str, int]]:
    """Each sample of slot 0's units once per epoch."""
    return Counter({(f"{Path(urls[u]).stem}-{j:04d}", epoch): 1 for epoch in epochs
                    for u in slot_units(SHARDS, 2, 0, SEED, "a", epoch)
                    for j in range(SAMPLES)})


def _stream(urls: list[str], slot: int = 0, nslots: int = 2,
            cursor: SourceCursor | None = None, seed: int = SEED) -> SourceStream:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    stream = SourceStream("a", urls, slot, nslots, seed, S3, SkipCounter(), cursor=cursor,
                          clock=lambda: now[0], sleep=sleep)
    stream.now = now  # (the test's handle on its clock)
    return stream


def _read(stream: SourceStream, until_epoch: int = 5):
    """``(key, epoch read as, cursor after it as checkpoints store it)`` of each sample, up
    to the first one of ``until_epoch``."""
    for raw in stream:
        epoch = stream.reading_epoch()
        if epoch >= until_epoch:
            return
        yield raw["__key__"], epoch, json.loads(json.dumps(stream.cursor().to_dict()))
        stream.now[0] += STEP_S


def test_a_set_aside_unit_dealt_again_next_epoch_is_read_in_both(shards):
    # The slot drew the shard for epoch 1 while its epoch-0 read still waited for its
    # retry, and skipped the draw: epoch 1's whole shard was never read; the rest owed to
    # epoch 0 was read once due (at 4,096 slots about one set-aside unit in 4,096 is dealt
    # to its own slot again).
    seen = Counter((key, epoch) for key, epoch, _ in _read(_stream(shards["urls"]))
                   if epoch in CHECKED)
    assert shards["broke"] == [shards["late"]] * len(shards["breaks"])
    owed = _dealt_to_slot_0(shards["urls"], CHECKED)
    assert seen == owed, (owed - seen, seen - owed)


def test_resumed_anywhere_each_sample_is_read_once_per_epoch(shards):
    # A checkpoint taken while the epoch-1 read waits for the epoch-0 rest must owe both.
    urls = shards["urls"]
    order = list(_read(_stream(urls)))
    owed = _dealt_to_slot_0(urls, CHECKED)
    for i, (_, _, cursor) in enumerate(order):
        resumed = _read(_stream(urls, cursor=SourceCursor.from_dict(cursor)))
        seen = Counter((key, epoch) for key, epoch, _ in [*order[:i + 1], *resumed]
                       if epoch in CHECKED)
        assert seen == owed, (i, owed - seen, seen - owed)


def test_resized_anywhere_each_sample_is_read_once_per_epoch(shards):
    # The same on 3 slots: what the 2 old slots left (slot 0 saved at each of its samples,
    # slot 1 after 3) is re-dealt, the epoch-1 read of the set-aside shard with it.
    urls = shards["urls"]
    order = list(_read(_stream(urls)))
    slot1 = list(_read(_stream(urls, slot=1)))[:3]
    for i, (_, _, cursor) in enumerate(order):
        seen = Counter((key, epoch) for key, epoch, _ in order[:i + 1] + slot1)
        new, _, _ = redeal_source([SourceCursor.from_dict(c) for c in (cursor, slot1[-1][2])],
                                  SourceSpec("a", urls), 2, 3, SEED)
        for slot, c in enumerate(new):
            stream = _stream(urls, slot, 3, c)
            for raw in stream:
                if stream.cursor().share is None:  # past the re-dealt entries
                    break
                seen[raw["__key__"], stream.reading_epoch()] += 1
        every = _every_sample(range(new[0].share_last + 1))
        assert seen == every, (i, every - seen, seen - every)


def test_the_reads_owed_to_later_epochs_are_capped(tmp_path, monkeypatch, caplog):
    # A 2-shard source over 2 slots: a slot's epoch of it (4 samples) is shorter than the
    # retry cooldown (1 s = 10 samples), and every read of s0 from its start breaks after
    # 1 sample (its retries from sample 1 read on). Each epoch deals s0 to the slot again
    # while its earlier read waits: the owed reads grew without limit (2,364 after 20k
    # samples, a 19 KB cursor). Now at most MAX_OWED wait; the reads beyond are skipped,
    # logged, and their samples counted lost (s0's sample count is known here).
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 4, size=8)))
            for i in range(2)]
    (tmp_path / "s0_stats.json").write_text(json.dumps({"successes": 4}))
    real = stream_module.read_shard

    def breaking(url, source, s3, counter, outcome=None, cursor=None, **kw):
        start = cursor.samples if cursor is not None else 0
        for n, raw in enumerate(real(url, source, s3, counter, outcome, cursor, **kw), 1):
            yield raw
            if url == urls[0] and start == 0 and n == 1:
                outcome.update(status="failed", failed=True, error="simulated reset")
                return

    monkeypatch.setattr(stream_module, "read_shard", breaking)
    caplog.set_level(logging.WARNING, logger="data.stream")
    stream = _stream(urls, seed=0)
    most, size = 0, 0
    for n, _ in enumerate(stream, 1):
        cursor = json.loads(json.dumps(stream.cursor().to_dict()))
        most = max([most, *(len(e[6]) for e in cursor["aside"].values() if len(e) > 6)])
        size = max(size, len(json.dumps(cursor)))
        stream.now[0] += STEP_S
        if n == 3000:
            break
    assert cursor["epoch"] > 1000  # (the epochs went by)
    assert size < 600, size
    assert most == stream_module.MAX_OWED
    lost = {(s, r): n for kind, s, r, n in stream.counter.drain() if kind == "skip"}
    assert set(lost) == {("a", "lost_samples")}
    assert lost["a", "lost_samples"] % 4 == 0  # each skipped read: s0's 4 samples
    assert any("this epoch's read is skipped" in r.getMessage() for r in caplog.records)
