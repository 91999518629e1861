"""Constant-time exact resume of the raw sample streams (issue #14): a resumed stream is the
uninterrupted one (the full-replay oracle) from the saved point on, and it starts with one
ranged read per source at the saved byte offset."""

from __future__ import annotations

import json

import numpy as np
from s3_server import good_samples, write_tar

import data.storage
from data.config import S3Config
from data.stats import SkipCounter
from data.stream import MixedStream, SourceCursor, SourceStream

S3 = S3Config(retries=0, backoff=0.01)


def _mixed(urls_a: list[str], urls_b: list[str], counter: SkipCounter, block: int,
           state: dict | None = None) -> MixedStream:
    def make_sources(cursors: list[SourceCursor] | None) -> list[SourceStream]:
        return [SourceStream(name, urls, slot=1, nslots=2, seed=5, s3=S3, counter=counter,
                             cursor=cursors[i] if cursors else None)
                for i, (name, urls) in enumerate((("a", urls_a), ("b", urls_b)))]

    return MixedStream(make_sources, [2.0, 1.0], seed=5, slot=1, block_size=block,
                       counter=counter, state=state)


def test_resumed_stream_equals_the_replayed_oracle_with_a_failed_shard_saved(tmp_path):
    urls_a = [str(write_tar(tmp_path / f"a{i}.tar", good_samples(f"a{i}-", 7, size=8)))
              for i in range(4)]
    gone = tmp_path / "a_gone.tar"  # missing during the first run: dropped and counted
    urls_a.append(str(gone))
    urls_b = [str(write_tar(tmp_path / f"b{i}.tar", good_samples(f"b{i}-", 5, size=8)))
              for i in range(3)]
    oracle = _mixed(urls_a, urls_b, SkipCounter(), block=5)
    stream = iter(oracle)
    saved = None
    for _ in range(2000):
        next(stream)
        st = oracle.state()
        # save mid shuffle block, inside a shard of source a, with the missing shard in the
        # failed set (the state names the block start; the block is re-read on resume)
        if (st["emitted"] > 0 and st["sources"][0]["dropped"] == [str(gone)]
                and st["sources"][0]["unit"] is not None
                and st["sources"][0]["samples"] > 0):
            saved = json.loads(json.dumps(st))  # as stored in checkpoints
            break
    assert saved is not None, "no save point found"
    expected = [next(stream) for _ in range(150)]  # ~6 epochs of source a on this slot
    # The shard is back: a resumed run that forgot the failed set would read it now and
    # shift every later sample (issue #14).
    write_tar(gone, good_samples("gone-", 7, size=8))
    counter = SkipCounter()
    got_stream = iter(_mixed(urls_a, urls_b, counter, block=5, state=saved))
    got = [next(got_stream) for _ in range(150)]
    assert [(i, r["__key__"]) for i, r in got] == [(i, r["__key__"]) for i, r in expected]
    assert [r["jpg"] for _, r in got] == [r["jpg"] for _, r in expected]
    shards = [r["__url__"] for _, r in expected]
    assert len(set(shards)) >= 3, "the compared stretch crosses shard boundaries"
    assert "gone-" not in str([r["__key__"] for _, r in got])
    counts = {(k, s, n): c for k, s, n, c in counter.drain()}
    assert ("skip", "a", "missing_shard") not in counts, "counted before the save already"


def test_resume_opens_the_current_shard_at_its_saved_byte_offset(tmp_path, monkeypatch):
    # Counts the reads the resume itself makes: the background prefetch of the next shard
    # (data.storage.ShardPrefetcher, one more read by design) is turned off here.
    monkeypatch.setitem(globals(), "S3", S3Config(retries=0, backoff=0.01, prefetch_bytes=0))
    urls = [str(write_tar(tmp_path / f"a{i}.tar", good_samples(f"a{i}-", 20, size=8)))
            for i in range(2)]
    first = _mixed(urls, urls, SkipCounter(), block=1)
    stream = iter(first)
    for _ in range(13):
        next(stream)
    saved = json.loads(json.dumps(first.state()))
    expected = next(stream)
    opened: list[tuple[str, int]] = []
    real_open = data.storage._open_once

    def recording_open(url, cfg, offset):
        opened.append((url, offset))
        return real_open(url, cfg, offset)

    monkeypatch.setattr(data.storage, "_open_once", recording_open)
    resumed = iter(_mixed(urls, urls, SkipCounter(), block=1, state=saved))
    got = next(resumed)
    assert got[1]["__key__"] == expected[1]["__key__"]
    assert len(opened) == 1, "the first sample costs one read"
    for _ in range(40):  # until the other source is drawn too
        if len(opened) == 2:
            break
        next(resumed)
    cursors = [(c["unit"], c["offset"]) for c in saved["sources"] if c["unit"] is not None]
    assert len(cursors) == 2 and all(offset > 0 for _, offset in cursors)
    # each source's shard in progress is opened once, at the byte offset of its next tar
    # header; what came before in it is never read again
    assert all(opened.count(c) == 1 for c in cursors), (opened, cursors)
    assert not {url for url, offset in opened if offset == 0} & {u for u, _ in cursors}


def _list_cfg(urls: list[str], **kw):
    from pretrain.data import DataConfig, SourceConfig

    return DataConfig(sources=[SourceConfig("laion", urls)], image_size=8, batch_size=1,
                      workers=0, shuffle_buffer=0, context_length=8, seed=1,
                      s3=S3Config(prefetch_bytes=0), **kw)


def _keys(loader, n: int) -> list[str]:
    out = []
    for batch in loader:
        out.append(batch["keys"][0].split("/")[1])
        if len(out) == n:
            return out
    return out


def test_a_changed_shard_list_is_refused_unless_a_restart_is_asked_for(tmp_path):
    import pytest

    from pretrain.data import build_loader

    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 4, size=8)))
            for i in range(9)]
    saved = []
    for rank in (0, 1):  # the run so far: 2 ranks, 6 samples each into an epoch of 8 shards
        loader = build_loader(_list_cfg(urls[:8]), rank, 2)
        _keys(loader, 6)
        saved.append(json.loads(json.dumps(loader.state_dict())))  # as checkpoints store it
    # the same list resumes, on the same ranks or re-dealt over another count
    build_loader(_list_cfg(urls[:8]), 0, 2, state=saved[0])
    build_loader(_list_cfg(urls[:8]), 0, 1, state=saved)
    for new in (urls, urls[:7], urls[:7] + urls[8:]):  # a shard added, removed, replaced
        for state, world in ((saved[0], 2), (saved, 1)):  # same ranks; re-dealt
            with pytest.raises(ValueError, match=f"source 'laion': saved with 8 shards .*now "
                                                 f"{len(new)}.*on_shard_list_change"):
                build_loader(_list_cfg(new), 0, world, state=state)
    # asked for: a fresh start over the new list, the counts kept
    restarted = build_loader(_list_cfg(urls, on_shard_list_change="restart"), 0, 2,
                             state=saved[0])
    assert restarted.stats.samples == {"laion": 6}
    fresh = build_loader(_list_cfg(urls), 0, 2)
    assert _keys(restarted, 10) == _keys(fresh, 10)
    merged = build_loader(_list_cfg(urls, on_shard_list_change="restart"), 0, 1, state=saved)
    assert merged.stats.samples == {"laion": 12}
    # a state saved before lists were recorded still resumes (unchecked)
    legacy = {k: v for k, v in saved[0].items() if k != "shard_lists"}
    build_loader(_list_cfg(urls), 0, 2, state=legacy)


def test_a_resume_at_any_sample_continues_the_mix_exactly(tmp_path):
    # Two sources whose epochs end at different times (7 and 5 samples a shard): shuffle
    # blocks end where a source's epoch does (the next block opens with that source's
    # first sample of its next epoch, read ahead); a state saved after any sample, inside
    # such a block or at its start, must resume into the uninterrupted stream.
    urls_a = [str(write_tar(tmp_path / f"a{i}.tar", good_samples(f"a{i}-", 7, size=8)))
              for i in range(3)]
    urls_b = [str(write_tar(tmp_path / f"b{i}.tar", good_samples(f"b{i}-", 5, size=8)))
              for i in range(2)]
    oracle = _mixed(urls_a, urls_b, SkipCounter(), block=6)
    stream = iter(oracle)
    keys, states = [], []
    for _ in range(90):
        keys.append(next(stream)[1]["__key__"])
        states.append(json.loads(json.dumps(oracle.state())))
    assert any(s["lead"] is not None and s["emitted"] > 0 for s in states)
    assert any(s["lead"] is not None and s["emitted"] == 0 for s in states)
    for at in range(len(states) - 20):
        resumed = iter(_mixed(urls_a, urls_b, SkipCounter(), block=6, state=states[at]))
        got = [next(resumed)[1]["__key__"] for _ in range(20)]
        assert got == keys[at + 1:at + 21], at


def test_a_block_resumed_after_the_weights_changed_is_drawn_with_its_saved_weights(
        tmp_path, caplog):
    """Source weights changed between a save and its resume (a new mix for the rest of a
    run): the shuffle block the state was saved inside was drawn again with the new
    weights, i.e. other samples, of which the emitted count was skipped: samples handed
    out before were handed out again and others never (a reviewer's run: 10 of 120 and 7
    of 30 repeated). The resumed block must hand out exactly what the uninterrupted run
    had left of it; the new weights apply from the next block on (said once)."""
    urls_a = [str(write_tar(tmp_path / f"a{i}.tar", good_samples(f"a{i}-", 9, size=8)))
              for i in range(3)]
    urls_b = [str(write_tar(tmp_path / f"b{i}.tar", good_samples(f"b{i}-", 9, size=8)))
              for i in range(3)]

    def mixed(weights: list[float], state: dict | None = None) -> MixedStream:
        def make(cursors):
            return [SourceStream(name, urls, slot=0, nslots=1, seed=5, s3=S3,
                                 counter=SkipCounter(),
                                 cursor=cursors[i] if cursors else None)
                    for i, (name, urls) in enumerate((("a", urls_a), ("b", urls_b)))]
        return MixedStream(make, weights, seed=5, slot=0, block_size=8,
                           counter=SkipCounter(), state=state)

    oracle = mixed([1.0, 1.0])
    stream = iter(oracle)
    keys, states = [], []
    for _ in range(30):
        keys.append(next(stream)[1]["__key__"])
        states.append(json.loads(json.dumps(oracle.state())))
    at = next(i for i, st in enumerate(states) if st["block"] >= 1 and st["emitted"] == 2)
    assert states[at]["weights"] == [1.0, 1.0]
    end = next(j for j in range(at, len(states)) if states[j]["emitted"] == 0)
    rest = keys[at + 1:end + 1]  # what the block had left to hand out
    assert len(rest) >= 4
    resumed = mixed([6.0, 1.0], state=states[at])
    it = iter(resumed)
    with caplog.at_level("WARNING", logger="data.stream"):
        got = [next(it)[1]["__key__"] for _ in range(len(rest))]
    assert got == rest
    assert "source weights changed since the checkpoint ([1.0, 1.0] -> [6.0, 1.0])" in (
        caplog.text)
    assert resumed.state()["weights"] is None  # at the block's end
    next(it)
    assert resumed.state()["weights"] == [6.0, 1.0]  # the next block: the new weights


def test_a_state_saved_before_blocks_ended_at_epochs_re_reads_its_block_as_filled_then(
        tmp_path):
    # States written before 8b66a0c have no "lead": their shuffle block may hold two
    # epochs of a source. Resumed inside such a block, the block is filled as it was then
    # (12 draws across the slot's 7-sample epoch boundary, same permutation), so what it
    # had left to hand out comes out, none repeated or lost; later blocks follow the rule.
    urls = [str(write_tar(tmp_path / "a.tar", good_samples("a-", 7, size=8))),
            str(write_tar(tmp_path / "b.tar", good_samples("b-", 7, size=8)))]

    def one_source(block: int, state: dict | None = None) -> MixedStream:
        def make(cursors):
            return [SourceStream("a", urls, slot=0, nslots=2, seed=5, s3=S3,
                                 counter=SkipCounter(),
                                 cursor=cursors[0] if cursors else None)]
        return MixedStream(make, [1.0], seed=5, slot=0, block_size=block,
                           counter=SkipCounter(), state=state)

    raw = iter(one_source(block=1))  # the draws in order, unshuffled
    draws = [next(raw)[1]["__key__"] for _ in range(12)]
    assert len({key.split("-")[0] for key in draws[:7]}) == 1  # epoch 0: one 7-sample shard
    old_block = [draws[i] for i in one_source(block=12)._block_order(0, 12, 12)]
    legacy = {"block": 0, "emitted": 3, "draws": 0, "index": 3, "sources": None}
    resumed = iter(one_source(block=12, state=legacy))
    assert [next(resumed)[1]["__key__"] for _ in range(9)] == old_block[3:]
    # with the key present (a state of this version) the same block ends at the epoch
    current = iter(one_source(block=12, state={**legacy, "lead": None}))
    assert sorted(next(current)[1]["__key__"] for _ in range(4)) == sorted(
        [draws[i] for i in one_source(block=12)._block_order(0, 7, 12)][3:])


def test_a_shard_being_retried_at_the_save_is_re_dealt_once(tmp_path, monkeypatch):
    # A shard whose read broke is set aside, then retried; while the retry reads it, the
    # saved cursor names it both as the unit in progress (newer offset) and in its
    # set-aside list (the offset where it broke). A resume on another slot count must
    # re-deal it once, at the newer offset: twice, two new slots read its rest (and the
    # samples between the two offsets) again.
    import data.stream as stream_module
    from data.redeal import SourceSpec, redeal_source

    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 6, size=8)))
            for i in range(3)]
    s3 = S3Config(retries=0, backoff=0.01, max_backoff=0.01, prefetch_bytes=0)
    real, broke = stream_module.read_shard, []

    def breaks_once(url, source, s3, counter, outcome=None, cursor=None, **kw):
        for n, raw in enumerate(real(url, source, s3, counter, outcome, cursor, **kw), 1):
            yield raw
            if not broke and n == 2:  # the connection drops before the third sample
                broke.append(url)
                outcome.update(status="failed", failed=True, error="simulated reset")
                return

    monkeypatch.setattr(stream_module, "read_shard", breaks_once)
    clock = iter(range(1, 10_000))

    def source(slot: int, nslots: int, cursor: SourceCursor | None) -> SourceStream:
        return SourceStream("a", urls, slot=slot, nslots=nslots, seed=1, s3=s3,
                            counter=SkipCounter(), cursor=cursor,
                            clock=lambda: float(next(clock)), sleep=lambda s: None)

    mixed = MixedStream(lambda c: [source(0, 1, c[0] if c else None)], [1.0], seed=1, slot=0,
                        block_size=1, counter=SkipCounter())
    stream, before, saved = iter(mixed), [], None
    while saved is None:
        before.append(next(stream)[1]["__key__"])
        cursor = SourceCursor.from_dict(json.loads(json.dumps(mixed.state()))["sources"][0])
        if cursor.unit is not None and cursor.unit in cursor.aside:
            saved = cursor
    monkeypatch.setattr(stream_module, "read_shard", real)
    new, _, _ = redeal_source([saved], SourceSpec("a", urls), 1, 2, seed=1)
    after = []
    for slot, c in enumerate(new):  # what the two new slots read of the old epoch
        reader = iter(source(slot, 2, c))
        after += [next(reader)["__key__"] for _ in range(sum(
            6 - (e[3] if len(e) > 2 else 0) for e in c.share))]
    assert sorted(before + after) == sorted(f"s{i}-{j:04d}" for i in range(3) for j in range(6))


def test_a_saved_position_holds_no_credential_of_a_listed_url_and_resumes_a_re_signed_list(
        tmp_path):
    """A ``.txt`` shard list may hold presigned URLs or ``pipe:`` commands with a token
    (the config refuses them inline and says to list them there). A loader's position
    names shards: such a shard by its redacted name and its index in the list, never its
    credential (before: the whole URL, in every rank file of every checkpoint). A list
    signed again (new tokens: presigned URLs expire in days) is the same list: the resume
    continues exactly, on the same ranks and re-dealt over another count; and so do the
    split keys of a resampled list with fewer shards than slots (``#@index#part/parts``)."""
    from pretrain.data import DataConfig, SourceConfig, build_loader

    tars = [write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 4, size=8))
            for i in range(3)]

    def cfg(token: str, resampled: bool = False):
        path = tmp_path / f"list-{token}.txt"
        path.write_text("".join(f"pipe:AWS_SECRET_ACCESS_KEY={token} cat {t}\n" for t in tars))
        return DataConfig(sources=[SourceConfig("laion", str(path), resampled=resampled)],
                          image_size=8, batch_size=1, workers=0, shuffle_buffer=0,
                          context_length=8, seed=1, s3=S3Config(prefetch_bytes=0))

    def saved_state(loader) -> dict:
        text = json.dumps(loader.state_dict())  # as a checkpoint's rank file holds it
        assert "SECRET" not in text.replace("AWS_SECRET_ACCESS_KEY=***", ""), text[:600]
        assert "AWS_SECRET_ACCESS_KEY=*** cat" in text and "#@" in text, text[:600]
        return json.loads(text)

    world = 3
    saved, seen, rest = [], set(), []
    for rank in range(world):
        loader = build_loader(cfg("abc123SECRET"), rank, world)
        seen |= set(_keys(loader, 2))
        saved.append(saved_state(loader))
        rest.append(_keys(loader, 100))  # what the uninterrupted loader reads to its end
    everything = {f"s{i}-{k:04d}" for i in range(3) for k in range(4)}
    assert len(seen) == 6 and seen | {k for r in rest for k in r} == everything
    for rank in range(world):  # the same ranks, the list signed again
        resumed = build_loader(cfg("xyz789SECRET"), rank, world, state=saved[rank])
        assert _keys(resumed, 100) == rest[rank], rank
    # re-dealt over 2 ranks: what the old ranks had not read, each sample once
    read = []
    for rank in range(2):
        resumed = build_loader(cfg("xyz789SECRET"), rank, 2, state=saved)
        read += _keys(resumed, 1)
        saved_state(resumed)
        read += _keys(resumed, 100)
    assert sorted(read) == sorted(everything - seen)
    # resampled over 4 slots: each shard read as 2 parts
    for rank in range(4):
        loader = build_loader(cfg("abc123SECRET", resampled=True), rank, 4)
        _keys(loader, 1)
        state = saved_state(loader)
        assert "#@" in json.dumps(state["positions"]) and "/2" in json.dumps(state["positions"])
        expected = _keys(loader, 5)
        resumed = build_loader(cfg("xyz789SECRET", resampled=True), rank, 4, state=state)
        assert _keys(resumed, 5) == expected, rank


def test_a_state_saved_under_a_numpy_that_permutes_differently_is_refused(tmp_path, caplog):
    """numpy keeps PCG64's bit stream stable, not the algorithms of Generator's methods
    (NEP 19): a requeue on a node image whose numpy permutes otherwise would go on in other
    shard orders from the same saved position (samples repeated and skipped, silently). A
    state records what its numpy deals; another one is refused on the same ranks and over
    another count, or the pipeline restarts when asked; a state saved before the record
    resumes unchecked."""
    import pytest

    from data.state import permutation_fingerprint
    from pretrain.data import build_loader

    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 4, size=8)))
            for i in range(4)]
    saved = []
    for rank in (0, 1):
        loader = build_loader(_list_cfg(urls), rank, 2)
        _keys(loader, 3)
        saved.append(json.loads(json.dumps(loader.state_dict())))
    assert saved[0]["permutations"] == permutation_fingerprint()
    other = [dict(s, permutations=["1.0.0", "0123456789abcdef"]) for s in saved]
    for state, world in ((other[0], 2), (other, 1)):
        with pytest.raises(ValueError, match=rf"numpy {np.__version__} permutes the shards "
                                             r"differently from numpy 1.0.0.*resume with "
                                             r"numpy 1.0.0"):
            build_loader(_list_cfg(urls), 0, world, state=state)
    restarted = build_loader(_list_cfg(urls, on_shard_list_change="restart"), 0, 2,
                             state=other[0])
    assert _keys(restarted, 4) == _keys(build_loader(_list_cfg(urls), 0, 2), 4)
    assert "numpy's permutations" in caplog.text
    legacy = [{k: v for k, v in s.items() if k != "permutations"} for s in saved]
    build_loader(_list_cfg(urls), 0, 2, state=legacy[0])
    build_loader(_list_cfg(urls), 0, 1, state=legacy)


def test_a_list_signed_again_is_the_same_list_whatever_the_signing_scheme():
    """Signed URLs carry their signature and expiry in the query string: AWS SigV4
    (``X-Amz-Signature``, ``X-Amz-Date``), Azure SAS (``sig``, ``se``, ``sp``, ``sv``: Azure
    Storage docs, "Create a service SAS"), S3 V2 (``Signature``, ``Expires``). A shard with
    one is named without its query (and without ``user:password@``): the list's digest and
    the saved keys do not change when it is signed again, and hold no credential. A URL
    without a credential is its own name and key, even one ending like an indexed key."""
    from data.state import key_url, unit_key, url_list_digest

    def lists(sig: str, expiry: str) -> list[str]:
        return [f"https://b.s3.amazonaws.com/s/{i}.tar?X-Amz-Date={expiry}"
                f"&X-Amz-Signature={sig}" for i in range(2)] + [
            f"https://acct.blob.core.windows.net/c/2.tar?sv=2022&se={expiry}&sp=r&sig={sig}",
            f"https://h/3.tar?AWSAccessKeyId=AKIA&Expires={expiry}&Signature={sig}",
            "s3://AKIA:hunter2@bucket/4.tar", "https://h/5.tar#@0", "s3://bucket/6.tar"] + [
            f"https://h/get?file={i}.tar&token={sig}" for i in (7, 8)]  # the query names it

    first, again = lists("s1gnat", "20261201"), lists("0ther", "20261208")
    assert url_list_digest(first) == url_list_digest(again)
    assert url_list_digest(first) != url_list_digest(first[:-1] + ["s3://bucket/7.tar"])
    assert url_list_digest(first) != url_list_digest(first[:-2] + first[-2:][::-1])
    for urls in (first, again):
        keys = [unit_key(urls, i) for i in range(len(urls))]
        assert not any(s in " ".join(keys) for s in ("s1gnat", "0ther", "hunter2", "AKIA"))
        assert [key_url(urls, k) for k in keys] == urls
        assert keys[5:7] == urls[5:7]  # no credential: the URL itself
    assert [unit_key(first, i) for i in range(9)] == [unit_key(again, i) for i in range(9)]


def test_a_state_saved_before_shards_were_named_without_credentials_resumes(tmp_path):
    """The version before named a listed shard by its whole URL (credential included) in
    its keys and digested the list over the URLs. Its states resume as before: same ranks
    and re-dealt, exactly where the uninterrupted loader goes on (a state of that version is
    made here from today's by the inverse renaming: the old digest, the URLs as keys)."""
    from data.state import raw_list_digest, unit_key
    from pretrain.data import DataConfig, SourceConfig, build_loader

    tars = [write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 4, size=8))
            for i in range(3)]
    urls = [f"pipe:AWS_SECRET_ACCESS_KEY=abc123SECRET cat {t}" for t in tars]
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{u}\n" for u in urls))
    cfg = DataConfig(sources=[SourceConfig("laion", str(listed), resampled=False)],
                     image_size=8, batch_size=1, workers=0, shuffle_buffer=0,
                     context_length=8, seed=1, s3=S3Config(prefetch_bytes=0))
    old_names = {unit_key(urls, j): u for j, u in enumerate(urls)}

    def as_saved_before(state: dict) -> dict:
        text = json.dumps(state)
        for new, url in old_names.items():
            text = text.replace(json.dumps(new)[1:-1], json.dumps(url)[1:-1])
        old = json.loads(text)
        old["shard_lists"] = [raw_list_digest(urls)]
        return old

    saved, seen, rest = [], set(), []
    for rank in range(3):
        loader = build_loader(cfg, rank, 3)
        seen |= set(_keys(loader, 2))
        saved.append(as_saved_before(loader.state_dict()))
        rest.append(_keys(loader, 100))
    assert "abc123SECRET" in json.dumps(saved)  # what that version wrote
    for rank in range(3):
        resumed = build_loader(cfg, rank, 3, state=saved[rank])
        assert _keys(resumed, 100) == rest[rank], rank
    read = []
    for rank in range(2):
        read += _keys(build_loader(cfg, rank, 2, state=saved), 100)
    assert sorted(read) == sorted(k for r in rest for k in r)


def test_the_upgrade_renames_each_sources_keys_by_its_own_list():
    """Two sources may list the same shard at other places: an old state's key of it is
    renamed by the list of the source whose cursor holds it (one map over all sources gave
    source A source B's index, and A's unit was then read from the key's literal text)."""
    from data.state import legacy_naming, raw_list_digest, unit_key, upgrade_state, url_list_digest

    u = [f"pipe:HF_TOKEN=sk_EXAMPLE{i} cat /s/{i}.tar" for i in range(2)]
    lists = {"a": [u[0], u[1]], "b": [u[1], u[0]]}
    cursor = {"unit": u[1], "aside": {f"{u[0]}#0/2": [1]}, "dropped": [u[0]], "damaged": []}
    old = {"sources": ["a", "b"], "shard_lists": [raw_list_digest(lists["a"]),
                                                  raw_list_digest(lists["b"])],
           "positions": {"0": {"sources": [cursor, cursor], "cut": None}}}
    legacy = {}
    for name, urls in lists.items():
        raw, rename = legacy_naming(urls, url_list_digest(urls))
        legacy[name] = (raw, url_list_digest(urls), rename)
    assert legacy_naming(["s3://b/0.tar"], url_list_digest(["s3://b/0.tar"])) is None
    new = upgrade_state(old, legacy)
    a, b = new["positions"]["0"]["sources"]
    assert a["unit"] == unit_key(lists["a"], 1) and b["unit"] == unit_key(lists["b"], 0)
    assert a["dropped"] == [unit_key(lists["a"], 0)] and b["dropped"] == [unit_key(lists["b"], 1)]
    assert list(a["aside"]) == [unit_key(lists["a"], 0, 0, 2)]
    assert "sk_EXAMPLE" not in json.dumps(new)
