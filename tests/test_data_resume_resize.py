"""Resume on another slot count (issue #14: ``--resume`` on a different number of ranks or
workers works at shard granularity): what the old slots left of the current epochs is
re-dealt over the new slots, so every sample of those epochs is read exactly once across
the change, and a shard an old slot was inside goes on at its saved byte offset."""

from __future__ import annotations

import json
from collections import Counter

from s3_server import good_samples, write_tar

from data.config import S3Config
from data.redeal import SourceSpec, redeal_source
from data.stats import SkipCounter
from data.stream import SourceCursor, SourceStream

S3 = S3Config(retries=0, backoff=0.01)
SEED = 7


def _stream(urls: list[str], slot: int, nslots: int,
            cursor: SourceCursor | None = None) -> SourceStream:
    return SourceStream("a", urls, slot, nslots, SEED, S3, SkipCounter(), cursor=cursor)


def test_four_slots_resumed_on_three_read_every_sample_once_per_epoch(tmp_path):
    # 8 shards of 5 samples on 4 old slots (2 shards each per epoch). Old slot 0 is fast:
    # its 2 shards of epoch 0 done and 2 samples into epoch 1; the others are mid-shard,
    # at a shard's last sample, or not started. The rule: every shard is read
    # exactly once per epoch whatever the slot count.
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(8)]
    everything = {f"s{i}-{j:04d}" for i in range(8) for j in range(5)}
    seen: Counter[str] = Counter()
    cursors = []
    for slot, take in enumerate((12, 3, 5, 0)):
        stream = _stream(urls, slot, 4)
        it = iter(stream)
        for _ in range(take):
            seen[next(it)["__key__"]] += 1
        cursors.append(SourceCursor.from_dict(json.loads(json.dumps(
            stream.cursor().to_dict()))))  # as stored in checkpoints
    new, units, resumed = redeal_source(cursors, SourceSpec("a", urls), 4, 3, SEED)
    assert resumed == 3  # slots 0, 1 and 2 were inside a shard
    # epochs 0 and 1 (8 shards each) less the 2 shards old slot 0 finished; a shard whose
    # last sample was read but whose end was not yet seen counts as unfinished
    assert units == 16 - 2
    # Re-dealt round the 3 new slots: 14 entries, 5, 5 and 4.
    assert [len(c.share) for c in new] == [5, 5, 4]
    for slot, cursor in enumerate(new):
        stream = _stream(urls, slot, 3, cursor)
        for raw in stream:
            if stream.cursor().share is None:  # past the re-dealt entries: epoch 2
                break
            seen[raw["__key__"]] += 1
    # Epochs 0 and 1 read completely, each sample exactly twice: none repeated, none lost.
    assert set(seen) == everything
    assert set(seen.values()) == {2}, {k: v for k, v in seen.items() if v != 2}


def test_loader_saved_on_two_ranks_resumes_on_three_with_each_sample_once(tmp_path):
    # The same rule through the training loader: 2 ranks save their states mid-epoch, 3
    # ranks load every old rank's state and finish the epoch; no shuffle buffer, so nothing
    # handed out is read again (the repeated count is the shuffle block's emitted part).
    from pretrain.data import DataConfig, SourceConfig, build_loader

    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 6, size=8)))
            for i in range(6)]
    cfg = DataConfig(sources=[SourceConfig("s", urls)], image_size=8, batch_size=1,
                     workers=0, shuffle_buffer=0, context_length=8, seed=4, s3=S3)
    seen: Counter[str] = Counter()
    saved = []
    for rank, take in ((0, 8), (1, 3)):
        loader = build_loader(cfg, rank, 2)
        for i, batch in enumerate(loader):
            seen[batch["keys"][0].split("/")[1]] += 1
            if i + 1 == take:
                break
        saved.append(json.loads(json.dumps(loader.state_dict())))  # as in checkpoints
    for rank in range(3):
        loader = build_loader(cfg, rank, 3, state=saved)
        for batch in loader:
            if loader.state_dict()["positions"]["0"]["sources"][0]["share"] is None:
                break  # this sample is the next epoch's
            seen[batch["keys"][0].split("/")[1]] += 1
    assert seen == Counter({f"s{i}-{j:04d}": 1 for i in range(6) for j in range(6)})


def test_a_new_slot_dealt_nothing_of_a_source_goes_on_drawing_it(tmp_path):
    # 2 ranks resumed on 4: source B (2 shards) has fewer unfinished units than new
    # slots, so ranks 2 and 3 are re-dealt none of it. They must move on to B's next
    # epoch and keep drawing it at its weight: a slot whose source weight fell to 0 would
    # never draw it again, for the rest of the run (the mix of the config silently lost).
    from pretrain.data import DataConfig, SourceConfig, build_loader

    a = [str(write_tar(tmp_path / f"a{i}.tar", good_samples(f"a{i}-", 4, size=8)))
         for i in range(8)]
    b = [str(write_tar(tmp_path / f"b{i}.tar", good_samples(f"b{i}-", 4, size=8)))
         for i in range(2)]
    cfg = DataConfig(sources=[SourceConfig("A", a), SourceConfig("B", b)], image_size=8,
                     batch_size=1, workers=0, shuffle_buffer=0, context_length=8, seed=2,
                     s3=S3)
    saved = []
    for rank in range(2):
        loader = build_loader(cfg, rank, 2)
        for i, _ in enumerate(loader):
            if i + 1 == 5:
                break
        saved.append(json.loads(json.dumps(loader.state_dict())))
    for rank in range(4):
        loader = build_loader(cfg, rank, 4, state=saved)
        drawn: Counter[int] = Counter()
        for i, batch in enumerate(loader):
            drawn[int(batch["source_ids"][0])] += 1
            if i + 1 == 40:
                break
        # equal weights: 20 of each expected; a source starved on this slot gives 0
        assert min(drawn[0], drawn[1]) >= 8, (rank, drawn)
