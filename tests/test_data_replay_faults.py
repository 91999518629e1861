"""A resume inside a shuffle block re-reads the block in replay mode
(:meth:`data.shard_schedule.ShardSchedule.replay`); a shard of that block that went bad
after the save is met there. Replay is best effort: a shard refused, failing for good or
missing since the save ends it (one warning naming the shard), the shard is given up and
counted as a fresh run counts it, and the run goes on (before: a refused shard ended the
resumed run after ``s3.auth_grace_s``, a 5xx for ever made it wait for ever, a missing
one went uncounted)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from test_data_block_resume_faults import S3, SEED, STEP_S, _counts, _shards, _Tagged

import data.stream as stream_module
from data.sources import _new_outcome
from data.stats import SkipCounter
from data.stream import MixedStream

BLOCK = 8
MAX_SLEEPS = 500  # a run waiting longer than this on its fake clock is hung


class Hung(Exception):
    """The fake clock slept too often: the stream waits for ever."""


def _mixed(sources: dict[str, list[str]], state: dict | None = None) -> MixedStream:
    """Slot 0 of 2 reading one-pass ``sources`` on a fake clock that raises :class:`Hung`
    after :data:`MAX_SLEEPS` sleeps."""
    now, sleeps = [0.0], [0]

    def sleep(seconds: float) -> None:
        sleeps[0] += 1
        now[0] += seconds
        if sleeps[0] > MAX_SLEEPS:
            raise Hung(f"{sleeps[0]} sleeps, fake clock at {now[0]:.0f} s")

    counter = SkipCounter()

    def make(cursors):
        return [_Tagged(name, urls, 0, 2, SEED, S3, counter, resampled=False,
                        cursor=cursors[i] if cursors else None, clock=lambda: now[0],
                        sleep=sleep)
                for i, (name, urls) in enumerate(sources.items())]

    mixed = MixedStream(make, [1.0] * len(sources), SEED, 0, BLOCK, counter, state=state)
    mixed.now = now
    return mixed


def _run(mixed: MixedStream) -> list:
    """``(key, state as a checkpoint stores it, counts drained)`` per sample."""
    out = []
    for _, raw in mixed:
        out.append((raw["__key__"], json.loads(json.dumps(mixed.state())),
                    mixed.counter.drain()))
        mixed.now[0] += STEP_S
    return out


def _fail_always(monkeypatch, url: str, error: str) -> None:
    """Every read of ``url`` fails at once with ``error`` (a shard bad for good)."""
    real = stream_module.read_shard

    def fake(u, source, s3, counter, outcome=None, cursor=None, **kw):
        if u == url:
            outcome.update(_new_outcome(cursor))
            outcome.update(status="failed", failed=True, error=error)
            return
        yield from real(u, source, s3, counter, outcome, cursor, **kw)

    monkeypatch.setattr(stream_module, "read_shard", fake)


@pytest.fixture
def resumed_block(tmp_path):
    """Two one-pass sources, the uninterrupted run, and a resume point inside a block
    (no fault cut it) whose re-read reads a shard of ``a`` from its start: ``(sources,
    keys, states, i, url)``."""
    sources = {"a": _shards(tmp_path, "a", 6), "b": _shards(tmp_path, "b", 4, samples=3)}
    run = _run(_mixed(sources))
    keys, states = [k for k, _, _ in run], [s for _, s, _ in run]
    for i, s in enumerate(states):
        if s["emitted"] == 0 or s.get("cut") or s["block"] < 1:
            continue
        block = [keys[j] for j in range(len(states)) if
                 (states[j]["block"] == s["block"] and states[j]["emitted"] > 0)
                 or (states[j]["block"] == s["block"] + 1 and states[j]["emitted"] == 0)]
        firsts = [k for k in block if k.startswith("a") and k.endswith("-0000")]
        if firsts:
            stem = firsts[0].rsplit("-", 1)[0]
            return sources, keys, states, i, next(u for u in sources["a"]
                                                  if Path(u).stem == stem)
    pytest.fail("no resume point inside a block that reads a shard from its start")


def _replay_warnings(caplog, url: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if "resumed shuffle block" in
            r.getMessage() and Path(url).name in r.getMessage()]


@pytest.mark.parametrize("error,reason", [
    ("StoreRefusedError: AccessDenied: Access Denied", "forbidden_shard"),
    ("OSError: 500 InternalError", "unreadable_shard")], ids=["forbidden", "5xx-forever"])
def test_a_shard_failing_for_good_in_a_re_read_block_is_given_up(
        resumed_block, monkeypatch, caplog, error, reason):
    # Before: retried in place for ever, the refused shard ended the resumed run after
    # auth_grace_s (StorageAccessError), the 5xx one made it wait for ever (Hung).
    sources, keys, states, i, url = resumed_block
    _fail_always(monkeypatch, url, error)
    fresh = sum((_counts(c) for _, _, c in _run(_mixed(sources))), Counter())
    assert fresh["skip", "a", reason] == 1  # what a fresh run meeting it counts
    caplog.set_level(logging.WARNING)
    resumed = _run(_mixed(sources, states[i]))
    got = [k for k, _, _ in resumed]
    counted = sum((_counts(c) for _, _, c in resumed), Counter())
    assert counted["skip", "a", reason] == 1
    # every sample of the other shards once, the bad one's from the resume on never
    bad = Path(url).stem + "-"
    assert not any(k.startswith(bad) for k in got)
    others = Counter(k for k in keys[:i + 1] + got if not k.startswith(bad))
    assert others == Counter(k for k in keys if not k.startswith(bad))
    assert len(_replay_warnings(caplog, url)) == 1, _replay_warnings(caplog, url)


def test_a_shard_missing_since_the_save_is_counted(resumed_block, caplog):
    # Before: the re-read's counts were muted up to the saved block's, and the saved
    # block had met no missing shard: missing_shard was never counted.
    sources, keys, states, i, url = resumed_block
    Path(url).unlink()
    caplog.set_level(logging.WARNING)
    resumed = _run(_mixed(sources, states[i]))
    counted = sum((_counts(c) for _, _, c in resumed), Counter())
    assert counted["skip", "a", "missing_shard"] == 1
    assert not any(k.startswith(Path(url).stem + "-") for k, _, _ in resumed)
    assert len(_replay_warnings(caplog, url)) == 1, _replay_warnings(caplog, url)
