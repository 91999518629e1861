"""A unit set aside after a failed read (waiting for its retry) when its slot's draws of
that epoch ran out: the slot goes on into the next epoch while the unit is still owed to
the one it was dealt in. Its retry, and a resume on another slot count, read it as a unit
of its own epoch: each sample once per epoch, its losses counted by the epoch that counts
them (:mod:`data.redeal`, :class:`data.stream.SourceCursor` ``aside``)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from s3_server import good_samples, write_tar

import data.stream as stream_module
from data.config import S3Config
from data.epochs import slot_units
from data.redeal import SourceSpec, redeal_source
from data.stats import DataStats, SkipCounter
from data.stream import SourceCursor, SourceStream

SEED = 7
S3 = S3Config(retries=0, backoff=0.01, max_backoff=1.0, prefetch_bytes=0)


def _counts(counter: SkipCounter) -> Counter[str]:
    """Skips per reason, and the damaged shards' unread bytes."""
    stats = DataStats()
    stats.add_counts(counter.drain())
    return Counter({**stats.skipped, "unread_bytes": stats.events["unread_bytes"]})


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """4 shards of 6 samples on 2 slots. Old slot 0's first unit of epoch 0 (``late``) has
    a corrupt header at sample 4 (samples 0-3 readable, then 1 lost and the rest of the
    bytes unread); its first read breaks after 2 samples (a dropped connection). The
    clock stands still, so its retry stays due later while slot 0 reads its other unit of
    epoch 0 and 2 samples into epoch 1. Slot 1 read 3 samples."""
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 6, size=8)))
            for i in range(4)]
    late = urls[slot_units(4, 2, 0, SEED, "a", 0)[0]]
    with tarfile.open(late) as tar:
        header = tar.getmember(f"{Path(late).stem}-0004.txt").offset
    data = bytearray(Path(late).read_bytes())
    data[header + 10] ^= 0xFF
    Path(late).write_bytes(bytes(data))
    real, broke = stream_module.read_shard, []

    def breaks_once(url, source, s3, counter, outcome=None, cursor=None, **kw):
        for n, raw in enumerate(real(url, source, s3, counter, outcome, cursor, **kw), 1):
            yield raw
            if not broke and n == 2:
                broke.append(url)
                outcome.update(status="failed", failed=True, error="simulated reset")
                return

    monkeypatch.setattr(stream_module, "read_shard", breaks_once)
    now = [0.0]
    seen: Counter[tuple[str, int]] = Counter()  # (sample, epoch it was read as)

    def stream(slot, nslots, cursor=None, counter=None):
        return SourceStream("a", urls, slot, nslots, SEED, S3, counter or SkipCounter(),
                            cursor=cursor, clock=lambda: now[0], sleep=lambda s: None)

    def read(s, it, n):
        for _ in range(n):
            seen[next(it)["__key__"], s.reading_epoch()] += 1
        return SourceCursor.from_dict(json.loads(json.dumps(s.cursor().to_dict())))

    slot0 = stream(0, 2)
    it0 = iter(slot0)
    old = [read(slot0, it0, 10)]
    assert broke == [late] and old[0].epoch == 1 and late in old[0].aside
    slot1 = stream(1, 2)
    old.append(read(slot1, iter(slot1), 3))
    # every readable sample once per epoch (``late``: 0-3) in epochs 0 and 1
    readable = Counter({(f"s{i}-{j:04d}", epoch): 1 for i in range(4) for j in range(6)
                        for epoch in (0, 1) if not (urls[i] == late and j > 3)})
    # what the damage loses, counted once: as one slot reading one epoch counts it
    reference = SkipCounter()
    one = stream(0, 1, counter=reference)
    for _ in one:
        if one.reading_epoch() > 0:
            break
    return {"urls": urls, "late": late, "old": old, "seen": seen, "stream": stream,
            "slot0": (slot0, it0), "now": now, "readable": readable,
            "reference": _counts(reference)}


def test_a_set_aside_unit_is_re_dealt_in_its_own_epoch_after_a_resize(setup):
    # The re-deal filed ``late`` under its slot's epoch, 1: its rest (samples 2-3) was
    # read once but as epoch 1's (after every unit of epoch 0, in an epoch-1 block; a
    # new slot read ``late`` twice in epoch 1 and never its rest in epoch 0), and not by
    # the counting epoch: its truncated_shard, lost sample and unread bytes were never
    # counted. (Had an old slot dropped its shard, it was not re-dealt at all.)
    urls, late, old, seen = setup["urls"], setup["late"], setup["old"], setup["seen"]
    new, _, _ = redeal_source(old, SourceSpec("a", urls), 2, 3, SEED)
    entries = [list(e) for c in new for e in c.share]  # (the streams move their cursors)
    counted: Counter[str] = Counter()
    for slot, cursor in enumerate(new):
        counter = SkipCounter()
        stream = setup["stream"](slot, 3, cursor, counter)
        epochs = []
        for raw in stream:
            if stream.cursor().share is None:  # past the re-dealt entries: epoch 2
                break
            seen[raw["__key__"], stream.reading_epoch()] += 1
            epochs.append(stream.reading_epoch())
        assert epochs == sorted(epochs)  # each epoch's entries before the next one's
        counted.update(_counts(counter))
    assert seen == setup["readable"], (seen - setup["readable"], setup["readable"] - seen)
    assert counted == setup["reference"]
    assert setup["reference"]["truncated_shard"] == 1 and setup["reference"]["unread_bytes"]
    # the epoch it was dealt in is saved with it, and its rest re-dealt as that epoch's
    aside = old[0].aside[late]
    assert aside[5] == 0
    assert [0, late, *aside[:3], aside[4]] in entries


def test_a_set_aside_unit_retried_in_the_next_epoch_is_read_as_its_own(setup):
    # Without a resize: slot 0 goes on, ``late`` becomes due and is retried while slot 0
    # reads epoch 1. Its samples were counted as epoch 1's, so its damage (met by the
    # retry) was never counted: not by epoch 0, the epoch that counts losses.
    slot0, it0 = setup["slot0"]
    counter = slot0.counter
    counter.drain()  # what slot 0 counted before (nothing: it had not met the damage)
    setup["now"][0] = 100.0  # the retry is due
    seen, late = setup["seen"], Path(setup["late"]).stem
    for raw in it0:
        if slot0.reading_epoch() > 1:
            break
        seen[raw["__key__"], slot0.reading_epoch()] += 1
    assert {seen[f"{late}-{j:04d}", 0] for j in range(4)} == {1}
    assert not any(seen[f"{late}-{j:04d}", 1] for j in (2, 3))  # its epoch 1 not reached
    assert _counts(counter) == setup["reference"]
