"""Resume on another slot count inside shuffle blocks: each old worker's current block is
finished by one new slot (data/adopted.py) and the re-deal goes on from the block's end, so
across the change every sample is handed out once. Before, the new slots read the blocks'
shards again and the part of each block already handed out was repeated: up to a shuffle
buffer per old worker (~10M samples at the H preset's 4,096 slots and buffer 5,000)."""

from __future__ import annotations

from collections import Counter

import pytest
from s3_server import good_samples, write_tar

from data.config import S3Config
from data.loader import LoaderOptions, ResumableLoader, StreamSource
from tests.test_data_resume_resize import _read_pass as _read  # (keys, state after them)

S3 = S3Config(retries=0, backoff=0.01)


class _Keys:
    """A batch is its samples' keys."""

    def decode(self, source_id, raw, rng, counter):
        return raw["__key__"]

    def collate(self, samples, worker, counter):
        return [key for _, key in samples]


def _shards(tmp_path, n: int = 8) -> list[str]:
    return [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(n)]


def _loader(urls, rank, world_size, state=None, resampled=False):
    opts = LoaderOptions(seed=3, batch_size=1, workers=0, shuffle_buffer=4, s3=S3)
    return ResumableLoader([StreamSource("s", urls, resampled=resampled)], opts, _Keys(),
                           rank, world_size, state=state)


def _save(urls, world_size, takes, state=None):
    """Each rank of ``world_size`` resumed from ``state`` reads ``takes[rank]`` batches:
    (keys read, the states saved)."""
    keys, saved = [], []
    for rank, take in enumerate(takes):
        read, st = _read(_loader(urls, rank, world_size, state), take)
        keys += read
        saved.append(st)
    return keys, saved


# batches read: by the 4 old ranks (10 samples each), then by the 3 ranks they resumed on
# (None: no second save, the pass is finished on 3); blocks of 4
@pytest.mark.parametrize("old, middle", [
    ((3, 5, 1, 6), None),
    ((3, 5, 1, 6), (2, 1, 3)),  # new rank 0 inside its second adopted block
    ((1, 2, 3, 9), (1, 0, 6)),  # rank 1 not started: its adopted block handed on as saved
    ((4, 8, 2, 5), (5, 4, 4)),  # two old ranks at a block end: nothing of theirs adopted
])
def test_every_sample_of_a_pass_once_across_two_resizes(tmp_path, old, middle):
    urls = _shards(tmp_path)
    one_pass = Counter(f"s{i}-{j:04d}" for i in range(8) for j in range(5))
    delivered, saved = _save(urls, 4, old)
    inside = [s["positions"]["0"]["emitted"] for s in saved]
    assert any(inside)
    # the block's end is saved with each position inside a block (MixState.end)
    assert all((s["positions"]["0"]["end"] is not None) == bool(n)
               for s, n in zip(saved, inside, strict=True))
    adopted = []
    if middle is not None:  # 4 -> 3 ranks, a few batches each, saved again
        keys, saved = _save(urls, 3, middle, state=saved)
        delivered += keys
        adopted = [len(s["positions"].get("0", {}).get("adopted", [])) for s in saved]
    totals = Counter(delivered)
    new_ranks = 2 if middle is not None else 3  # (3 -> 2)
    for rank in range(new_ranks):
        totals.update(_read(_loader(urls, rank, new_ranks, state=saved))[0])
    assert totals == one_pass, (totals - one_pass, one_pass - totals)
    if middle == (2, 1, 3):  # rank 0 adopted old blocks 0 and 3: one left, with progress
        assert adopted[0] == 1
        assert saved[0]["positions"]["0"]["adopted"][0]["state"]["emitted"] > 2


def test_a_same_count_resume_inside_an_adopted_block_hands_out_what_the_run_would(tmp_path):
    # 2 ranks resumed on 3 (each new rank adopting old blocks), then saved inside the
    # adopted block and resumed on 3 again: each rank hands out exactly what the
    # uninterrupted run on 3 hands out from there.
    urls = _shards(tmp_path)
    _, saved = _save(urls, 2, (1, 6))
    assert [s["positions"]["0"]["emitted"] for s in saved] == [1, 2]  # blocks of 4
    for rank in range(3):
        whole, _ = _read(_loader(urls, rank, 3, state=saved))
        head, state = _read(_loader(urls, rank, 3, state=saved), 1)
        if rank < 2:  # inside the adopted block (2 and 1 samples of it left)
            assert state["positions"]["0"]["adopted"][0]["state"]["emitted"] > 0
        tail, _ = _read(_loader(urls, rank, 3, state=state))
        assert head + tail == whole


def test_an_adopted_block_hands_out_the_rest_the_old_worker_would_have(tmp_path):
    # A resampled (endless) source: 4 ranks saved inside their blocks, resumed on 3. Each
    # new rank first hands out the rest of the blocks it adopted (old ranks 0 and 3 for
    # rank 0, in that order), exactly what the old rank would have handed out of them next.
    urls = _shards(tmp_path)
    takes = (3, 5, 2, 6)
    saved = [_read(_loader(urls, rank, 4, resampled=True), take)[1]
             for rank, take in enumerate(takes)]
    rests = []
    for rank, state in enumerate(saved):
        emitted = state["positions"]["0"]["emitted"]
        assert emitted, rank
        keys, _ = _read(_loader(urls, rank, 4, state=state, resampled=True), 4 - emitted)
        rests.append(keys)  # blocks of 4
    for rank, olds in enumerate(([0, 3], [1], [2])):
        want = [key for old in olds for key in rests[old]]
        got, state = _read(_loader(urls, rank, 3, state=saved, resampled=True), len(want))
        assert got == want, rank
        assert "adopted" not in state["positions"]["0"]  # done, and not saved again


@pytest.mark.parametrize("gone", range(8))
def test_a_shard_gone_since_the_save_repeats_nothing_across_a_resize(tmp_path, gone,
                                                                    caplog):
    # An adopted block holding a shard that went missing since the save cannot be re-read
    # as it was: filled on from the old slot's deal, it read units the re-deal had given
    # other slots (their samples handed out twice, up to a block per broken block). Its
    # rest is dropped instead (said in a warning); other blocks and units are unchanged.
    import shutil

    urls = _shards(tmp_path)
    delivered, saved = _save(urls, 4, (3, 5, 1, 6))
    shutil.move(urls[gone], tmp_path / "away.tar")
    totals = Counter(delivered)
    for rank in range(3):
        totals.update(_read(_loader(urls, rank, 3, state=saved))[0])
    assert max(totals.values()) == 1, {k: n for k, n in totals.items() if n > 1}
    lost = [f"s{i}-{j:04d}" for i in range(8) for j in range(5)
            if i != gone and f"s{i}-{j:04d}" not in totals]
    dropped = [r.getMessage() for r in caplog.records if "could not be re-read" in
               r.getMessage()]
    assert len(lost) <= 3 * len(dropped), (lost, dropped)  # blocks of 4, 1+ handed out


def test_what_a_resize_takes_out_of_the_totals_is_what_the_new_slots_read_again():
    """The new slots read again, unmuted, from where the re-deal goes on: a position at a
    block's start whose lead sample's unit is re-read from its start (its ``skips``), and
    the lead at an adopted block's end (``end_skips``); an adopted block's own re-read is
    muted by the slot that adopts it, so its ``skips`` stay counted."""
    from data.redeal import SourceSpec, redeal
    from data.state import PipelineState, url_list_digest
    from data.stream import SourceCursor

    spec = SourceSpec("a", [f"s3://b/a{i}.tar" for i in range(8)])
    cursor = SourceCursor(epoch=0, position=1, unit="s3://b/a0.tar", offset=1024,
                          samples=1).to_dict()
    positions = [
        # a block's start, opened by a lead whose unit's read met a duplicate member
        {"block": 2, "emitted": 0, "draws": 5, "index": 5, "lead": 0, "sources": [cursor],
         "skips": [["a", "duplicate_member", 1]]},
        # inside a block (adopted); the next block's lead met a truncated shard
        {"block": 1, "emitted": 2, "draws": 1, "index": 3, "lead": None, "size": 4,
         "sources": [cursor], "skips": [["a", "missing_image", 3]], "end": [cursor],
         "end_skips": [["a", "truncated_shard", 1]]},
    ]
    saved = [PipelineState(7, rank, 2, 1, ["a"], positions={0: position},
                           shard_lists=[url_list_digest(spec.urls)]).to_dict()
             for rank, position in enumerate(positions)]
    out = redeal(saved, [spec], 3, 1, 7)
    assert (out.adopted, out.kept, out.repeated) == (1, 2, 0)
    assert out.recounted == [["a", "duplicate_member", 1], ["a", "truncated_shard", 1]]
