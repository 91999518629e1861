"""A resume inside a shuffle block sees exactly the samples the uninterrupted run saw, even
when a read failed (transiently) or a set-aside shard was retried while the block was
filled: such a fault ends the block (:class:`data.stream.MixedStream`, ``MixState.cut``),
and a block's re-read retries its own failures in place instead of reading other shards
(:meth:`data.shard_schedule.ShardSchedule.replay`); or when a one-pass source had ended
before the block (``MixState.ended``).

Every resume here starts from the state a checkpoint stores (the MixedStream state or the
loader's ``state_dict``, through JSON), at every sample."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from s3_server import good_samples, write_tar

import data.stream as stream_module
from data.config import S3Config
from data.epochs import slot_units
from data.stats import SkipCounter
from data.stream import MixedStream, SourceCursor, SourceStream
from pretrain.data import DataConfig, SourceConfig, build_loader

SEED, SAMPLES = 4, 6
S3 = S3Config(retries=0, backoff=0.01, max_backoff=1.0, prefetch_bytes=0)
STEP_S = 0.1  # the (fake) time a sample takes: a first cooldown is 10 samples long


def _shards(tmp_path: Path, prefix: str, n: int, samples: int = SAMPLES) -> list[str]:
    return [str(write_tar(tmp_path / f"{prefix}{i}.tar",
                          good_samples(f"{prefix}{i}-", samples, size=8)))
            for i in range(n)]


def _breaking_reads(monkeypatch, stop_at) -> None:
    """Reads of shards break after ``stop_at(url, cursor)`` samples (a dropped connection;
    None: the read completes); ``stop_at`` is asked once per read, as it starts."""
    real = stream_module.read_shard

    def breaking(url, source, s3, counter, outcome=None, cursor=None, **kw):
        stop = stop_at(url, cursor)
        for n, raw in enumerate(real(url, source, s3, counter, outcome, cursor, **kw), 1):
            yield raw
            if n == stop:
                outcome.update(status="failed", failed=True, error="simulated reset")
                return

    monkeypatch.setattr(stream_module, "read_shard", breaking)


def _break_reads(monkeypatch, plan: dict[str, list[int | None]]) -> None:
    """The k-th read of ``url`` (in this process, from now on) breaks after
    ``plan[url][k]`` samples (a dropped connection); later reads, or None, complete."""
    reads: Counter[str] = Counter()

    def stop_at(url, cursor):
        stops = plan.get(url, [])
        reads[url] += 1
        return stops[reads[url] - 1] if reads[url] <= len(stops) else None

    _breaking_reads(monkeypatch, stop_at)


def _break_from(monkeypatch, plan: dict[str, dict[int, int]]) -> None:
    """Every read of ``url`` that starts at sample ``s`` of it breaks after
    ``plan[url][s]`` samples: a fault met again by every read, resumed or not."""
    _breaking_reads(monkeypatch, lambda url, cursor: plan.get(url, {}).get(
        cursor.samples if cursor is not None else 0))


class _Tagged(SourceStream):
    """Each sample with the epoch it is read as."""

    def __iter__(self):
        for raw in super().__iter__():
            yield {**raw, "__epoch__": self.reading_epoch()}


def _mixed(sources: dict[str, list[str]], block: int, state: dict | None = None,
           resampled: bool = False, counter: SkipCounter | None = None) -> MixedStream:
    """Slot 0 of 2 reading ``sources`` (name -> URLs, equal weights), on a fake clock."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    counter = counter or SkipCounter()

    def make(cursors: list[SourceCursor] | None) -> list[SourceStream]:
        return [_Tagged(name, urls, 0, 2, SEED, S3, counter, resampled=resampled,
                        cursor=cursors[i] if cursors else None, clock=lambda: now[0],
                        sleep=sleep)
                for i, (name, urls) in enumerate(sources.items())]

    mixed = MixedStream(make, [1.0] * len(sources), SEED, 0, block, counter, state=state)
    mixed.now = now  # (the test's handle on its clock)
    return mixed


def _run(mixed: MixedStream, limit: int | None = None):
    """``((key, epoch), state as a checkpoint stores it, counts drained)`` per sample."""
    for _, raw in mixed:
        if limit is not None and mixed.index > limit:
            return
        state = json.loads(json.dumps(mixed.state()))
        yield (raw["__key__"], raw["__epoch__"]), state, mixed.counter.drain()
        mixed.now[0] += STEP_S


def _dealt(urls: list[str], name: str) -> list[str]:
    """Slot 0's shards of epoch 0 (of 2 slots), in the order it reads them."""
    return [urls[u] for u in slot_units(len(urls), 2, 0, SEED, name, 0)]


def _block_rest(states: list[dict], i: int) -> int:
    """How many samples after sample ``i`` its shuffle block still had (up to the last)."""
    return next((j for j in range(i, len(states)) if states[j]["emitted"] == 0),
                len(states) - 1) - i


def _counts(drained) -> Counter:
    return Counter({(kind, source, name): n for kind, source, name, n in drained})


@pytest.fixture(params=[1, 2], ids=["break-mid-block", "break-at-block-start"])
def one_pass(tmp_path, monkeypatch, request):
    """Source ``a``: slot 0's first shard breaks after 1 or 2 samples on its first read
    only (a transient fault; with 1, inside a block of 4 or 8: the block holds samples
    before the fault), and its next shard is missing (counted once, drawn between the
    failure and the next sample); source ``b``: two good shards."""
    a = _shards(tmp_path, "a", 6)
    deal = _dealt(a, "a")
    Path(deal[1]).unlink()
    _break_reads(monkeypatch, {deal[0]: [request.param]})
    return {"a": a, "b": _shards(tmp_path, "b", 4, samples=3)}


@pytest.mark.parametrize("block", [1, 4, 8])
def test_a_resume_inside_a_block_after_a_transient_failure_is_exact(one_pass, block):
    # The block's re-read from its start did not meet the failure (nor the retry's timing)
    # and built another block: 12 of 17 resume points lost or repeated samples at block 8.
    run = list(_run(_mixed(one_pass, block)))
    keys, states = [k for k, _, _ in run], [s for _, s, _ in run]
    total = sum((_counts(c) for _, _, c in run), Counter())
    assert Counter(keys) == Counter(  # slot 0's deal, each sample once
        {(f"{Path(url).stem}-{j:04d}", 0): 1 for name, n in (("a", SAMPLES), ("b", 3))
         for url in _dealt(one_pass[name], name) if Path(url).exists() for j in range(n)})
    assert total[("skip", "a", "missing_shard")] == 1
    assert total[("event", "a", "shard_failures")] == 1
    for i in range(len(run) - 1):
        resumed = list(_run(_mixed(one_pass, block, states[i])))
        got = [k for k, _, _ in resumed]
        rest = _block_rest(states, i)
        assert got[:rest] == keys[i + 1:i + 1 + rest], i  # the block's rest, in its order
        # and the states saved meanwhile are the uninterrupted run's (a resume of the
        # resume is exact too), the next block's start included
        assert [s for _, s, _ in resumed[:rest]] == states[i + 1:i + 1 + rest], i
        assert Counter(keys[:i + 1] + got) == Counter(keys), i  # then each sample once
        counted = sum((_counts(c) for _, _, c in run[:i + 1] + resumed), Counter())
        assert counted["skip", "a", "missing_shard"] == 1, i
    if block > 1:
        assert any(s.get("cut") for s in states), "no resume inside a block a fault cut"


@pytest.mark.parametrize("block", [4, 8])
def test_a_failure_while_a_block_is_re_read_is_retried_in_place(one_pass, monkeypatch, block):
    # Resumed, every shard's first read breaks after 1 sample: the re-read of the block
    # retries it (after its cooldown) instead of reading another shard meanwhile, so the
    # block is the one handed out before the save.
    run = list(_run(_mixed(one_pass, block)))
    keys, states = [k for k, _, _ in run], [s for _, s, _ in run]
    urls = [u for u in one_pass["a"] + one_pass["b"] if Path(u).exists()]
    for i in range(len(run) - 1):
        if states[i]["emitted"] == 0:
            continue
        # patched once per resume (a fresh read count), over the fixture's patch
        with monkeypatch.context() as patch:
            _break_reads(patch, {url: [1] for url in urls})
            got = [k for k, _, _ in _run(_mixed(one_pass, block, states[i]))]
        rest = _block_rest(states, i)
        assert got[:rest] == keys[i + 1:i + 1 + rest], i
        assert Counter(keys[:i + 1] + got) == Counter(keys), i


@pytest.mark.parametrize("block", [4, 8])
def test_a_resume_inside_a_block_after_a_source_ended_is_exact(tmp_path, block):
    # Three one-pass sources, one of them read to its end early: the uninterrupted run
    # stops drawing it, a resume drew it again to find out (MixState.ended was not
    # saved), spending a mix draw: the block's samples were then picked from other
    # sources than before (3 of 21 resume points lost or repeated samples at block 4).
    sources = {"a": _shards(tmp_path, "a", 2, samples=2), "b": _shards(tmp_path, "b", 4, 5),
               "c": _shards(tmp_path, "c", 4, 5)}
    run = list(_run(_mixed(sources, block)))
    keys, states = [k for k, _, _ in run], [s for _, s, _ in run]
    for i in range(len(run) - 1):
        resumed = list(_run(_mixed(sources, block, states[i])))
        got = [k for k, _, _ in resumed]
        rest = _block_rest(states, i)
        assert got[:rest] == keys[i + 1:i + 1 + rest], i
        assert [s for _, s, _ in resumed[:rest]] == states[i + 1:i + 1 + rest], i
        assert Counter(keys[:i + 1] + got) == Counter(keys), i
    assert any(s.get("ended") and s["emitted"] for s in states)


@pytest.fixture(params=["transient", "breaks-from-start", "retry-breaks-too"])
def dealt_again(tmp_path, monkeypatch, request):
    """4 shards dealt over 2 slots; slot 0's last unit of epoch 0 (dealt to it again in
    epochs 1 and 2: owed reads) breaks after 2 samples: on its first read only
    (``transient``), on every read from its start, or also (after 1 more) on every read
    from its sample 2."""
    urls = _shards(tmp_path, "s", 4)
    late = urls[slot_units(4, 2, 0, SEED, "a", 0)[-1]]
    if request.param == "transient":
        _break_reads(monkeypatch, {late: [2]})
    else:
        _break_from(monkeypatch, {late: {0: 2, **({2: 1} if "too" in request.param else {})}})
    return urls


@pytest.mark.parametrize("block", [1, 3, 8])
def test_a_resume_inside_a_block_with_owed_reads_is_exact(dealt_again, block):
    # An owed read (the unit set aside, dealt to the slot again) is read like a retry: it
    # ends a block too. Before, 5 of 160 resume points at block 8 lost or repeated.
    urls, checked = dealt_again, range(3)
    run = list(_run(_mixed({"a": urls}, block, resampled=True), limit=160))
    keys, states = [k for k, _, _ in run], [s for _, s, _ in run]
    owed = Counter({(f"s{u}-{j:04d}", e): 1 for e in checked
                    for u in slot_units(4, 2, 0, SEED, "a", e) for j in range(SAMPLES)})
    assert Counter(k for k in keys if k[1] in checked) == owed
    for i in range(len(run)):
        resumed = list(_run(_mixed({"a": urls}, block, states[i], resampled=True),
                            limit=160))
        got = [k for k, _, _ in resumed]
        rest = _block_rest(states, i)
        assert got[:rest] == keys[i + 1:i + 1 + rest], i
        assert [s for _, s, _ in resumed[:rest]] == states[i + 1:i + 1 + rest], i
        seen = Counter(k for k in keys[:i + 1] + got if k[1] in checked)
        assert seen == owed, (i, owed - seen, seen - owed)


def test_a_loader_resumed_from_its_state_dict_after_a_transient_failure_is_exact(
        tmp_path, monkeypatch):
    # The same through the loader (one worker in-process, batches of one sample): the
    # state_dict after each batch, through JSON, resumed by a new loader.
    a, b = _shards(tmp_path, "a", 3), _shards(tmp_path, "b", 2, samples=4)
    _break_reads(monkeypatch, {a[0]: [2], a[1]: [3]})
    cfg = DataConfig(sources=[SourceConfig("a", a, resampled=False),
                              SourceConfig("b", b, resampled=False)],
                     image_size=8, batch_size=1, workers=0, shuffle_buffer=8,
                     context_length=12, s3=S3Config(retries=0, backoff=0.01,
                                                    max_backoff=0.01, prefetch_bytes=0))

    def keys_and_states(loader):
        for batch in loader:
            if batch.get("keys"):
                yield batch["keys"][0], json.loads(json.dumps(loader.state_dict()))

    run = list(keys_and_states(build_loader(cfg, 0, 1, train=True)))
    keys = [k for k, _ in run]
    assert sorted(keys) == sorted(f"{Path(u).name}/{Path(u).stem}-{j:04d}"
                                  for u, n in [*((u, SAMPLES) for u in a), *((u, 4) for u in b)]
                                  for j in range(n))
    positions = [s["positions"]["0"] for _, s in run]
    for i in range(len(run) - 1):
        got = [k for k, _ in keys_and_states(build_loader(cfg, 0, 1, train=True,
                                                          state=run[i][1]))]
        rest = _block_rest(positions, i)
        assert got[:rest] == keys[i + 1:i + 1 + rest], i
        assert sorted(keys[:i + 1] + got) == sorted(keys), i
    assert any(p.get("cut") for p in positions)
