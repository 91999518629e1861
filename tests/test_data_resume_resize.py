"""Resume on another slot count (issue #14: ``--resume`` on a different number of ranks or
workers works at shard granularity): what the old slots left of the current epochs is
re-dealt over the new slots, so every sample of those epochs is read exactly once across
the change, and a shard an old slot was inside goes on at its saved byte offset."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
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


def test_a_second_resize_before_any_slot_reached_its_shares_next_epoch_keeps_it(tmp_path):
    # 4 slots -> 3 with old slot 0 two samples into epoch 1: each new slot's share holds
    # entries of epochs 0 and 1. Resized again (3 -> 2) while every slot was still in its
    # share's epoch-0 entries, the epoch-1 entries were left out (the last epoch concerned
    # was taken from the slots' current epochs only) and epoch 1 dealt afresh: the
    # samples old slot 0 had read of it were read twice.
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(8)]
    seen: Counter[tuple[str, int]] = Counter()

    def read(slot, nslots, cursor, take):
        stream = _stream(urls, slot, nslots, cursor)
        it = iter(stream)
        for _ in range(take):
            seen[next(it)["__key__"], stream.reading_epoch()] += 1
        return SourceCursor.from_dict(json.loads(json.dumps(stream.cursor().to_dict())))

    old = [read(slot, 4, None, take) for slot, take in enumerate((12, 1, 1, 1))]
    middle, _, _ = redeal_source(old, SourceSpec("a", urls), 4, 3, SEED)
    assert all({e[0] for e in c.share} == {0, 1} for c in middle)
    middle = [read(slot, 3, c, 1) for slot, c in enumerate(middle)]
    assert {c.share[c.position - 1][0] for c in middle} == {0}
    new, _, _ = redeal_source(middle, SourceSpec("a", urls), 3, 2, SEED)
    for slot, cursor in enumerate(new):
        stream = _stream(urls, slot, 2, cursor)
        for raw in stream:
            if stream.reading_epoch() > 1:
                break
            seen[raw["__key__"], stream.reading_epoch()] += 1
    assert seen == Counter({(f"s{i}-{j:04d}", epoch): 1 for i in range(8) for j in range(5)
                            for epoch in (0, 1)})


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


# -- fault state across a resize ---------------------------------------------------------

FAULTY = S3Config(retries=0, backoff=0.01, prefetch_bytes=0)


def _shards_with_faults(tmp_path, n: int = 8, missing: int = 2, cut: int = 5) -> list[str]:
    """``n`` shards of 5 samples ``s{i}-0000``..; shard ``missing`` does not exist and shard
    ``cut`` is cut inside sample 3's caption (samples 0-2 readable)."""
    urls = []
    for i in range(n):
        path = write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8))
        if i == cut:
            with tarfile.open(path) as tar:
                txt = tar.getmember(f"s{i}-0003.txt")
            path.write_bytes(path.read_bytes()[:txt.offset_data + 3])
        if i == missing:
            path.unlink()
        urls.append(str(path))
    return urls


def _skips(counter: SkipCounter) -> Counter[str]:
    return Counter({reason: n for kind, _, reason, n in counter.drain() if kind == "skip"})


def _read(urls, slot, nslots, cursor, seen, skips, take=None, until_epoch=None):
    """Read ``take`` samples (or every sample of epochs before ``until_epoch``) of one slot,
    tallying keys per epoch in ``seen`` and skip counts in ``skips``; the cursor after it,
    as stored in checkpoints."""
    counter = SkipCounter()
    stream = SourceStream("a", urls, slot, nslots, SEED, FAULTY, counter, cursor=cursor)
    it, n = iter(stream), 0
    while take is None or n < take:
        raw = next(it)
        if until_epoch is not None and stream.reading_epoch() >= until_epoch:
            break
        seen[raw["__key__"], stream.reading_epoch()] += 1
        n += 1
    skips.update(_skips(counter))
    return SourceCursor.from_dict(json.loads(json.dumps(stream.cursor().to_dict())))


def test_resizes_carry_no_slots_fault_lists_and_lose_nothing(tmp_path):
    # 4 slots -> 3 -> 2 over a source with a missing and a truncated shard. A new slot's
    # cursor used to get every old slot's dropped and damaged keys: at 512 x 8 slots with
    # 500 missing shards, 150 MB of cursors in every checkpoint. Now none (a cursor only
    # consults them for the units it draws; see data.redeal), while the samples read and
    # the losses counted over 4 epochs stay those of a run that never changed.
    urls = _shards_with_faults(tmp_path)
    seen: Counter[tuple[str, int]] = Counter()
    skips: Counter[str] = Counter()
    # old slot 0 counts the truncated s5 in epoch 0; old slot 2 meets the missing s2 in
    # epoch 1 while slot 3 has not reached it in epoch 0 (the epoch that counts it)
    old = [_read(urls, slot, 4, None, seen, skips, take)
           for slot, take in enumerate((14, 4, 12, 0))]
    assert {k for c in old for k in c.dropped} == {urls[2]}  # met by the old slots
    assert {k for c in old for k in c.damaged} == {urls[5]}
    middle, _, _ = redeal_source(old, SourceSpec("a", urls), 4, 3, SEED)
    assert all(c.dropped == [] and c.damaged == [] for c in middle)  # before: the union
    middle = [_read(urls, slot, 3, c, seen, skips, take)
              for slot, (c, take) in enumerate(zip(middle, (3, 11, 6), strict=True))]
    new, _, _ = redeal_source(middle, SourceSpec("a", urls), 3, 2, SEED)
    assert all(c.dropped == [] and c.damaged == [] for c in new)
    for slot, c in enumerate(new):
        _read(urls, slot, 2, c, seen, skips, until_epoch=4)
    # epochs 0-3: every readable sample once per epoch; the losses counted once
    readable = [f"s{i}-{j:04d}" for i in range(8) if i != 2 for j in range(3 if i == 5 else 5)]
    assert seen == Counter({(key, epoch): 1 for key in readable for epoch in range(4)})
    reference: Counter[str] = Counter()
    _read(urls, 0, 1, None, Counter(), reference, until_epoch=1)  # one slot, one epoch
    assert skips == reference and reference["missing_shard"] == 1


@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_a_shard_met_in_a_later_epoch_before_the_resize_is_counted_once(tmp_path, fault):
    # Shard 2 is dealt to old slot 3 in epoch 0 (the epoch whose reads count losses) and
    # to old slot 2 in epoch 1. Slot 2 gets there first and meets the fault, counting
    # nothing (a later epoch); slot 3 has not read anything when the run resizes. The
    # re-deal left the loss uncounted: a missing shard's unit was not re-dealt (dropped by
    # slot 2), a truncated one's new slot got slot 2's damaged key (as if counted).
    urls = _shards_with_faults(tmp_path, missing=2 if fault == "missing" else -1,
                               cut=2 if fault == "truncated" else -1)
    skips: Counter[str] = Counter()
    # slot 2: s0 and s4 of epoch 0, then s2 of epoch 1 (nothing, or its 3 readable
    # samples), and the first sample of s4 after it
    past = 11 if fault == "missing" else 14
    old = [_read(urls, slot, 4, None, Counter(), skips, take)
           for slot, take in enumerate((0, 0, past, 0))]
    assert urls[2] in (old[2].dropped if fault == "missing" else old[2].damaged)
    assert skips == Counter()  # met, not counted
    new, _, _ = redeal_source(old, SourceSpec("a", urls), 4, 2, SEED)
    for slot, c in enumerate(new):
        _read(urls, slot, 2, c, Counter(), skips, until_epoch=2)
    reference: Counter[str] = Counter()
    _read(urls, 0, 1, None, Counter(), reference, until_epoch=1)
    assert skips == reference and reference[f"{fault}_shard"] == 1


def test_a_rank_resizing_deals_each_epoch_once_and_builds_only_its_own_positions(
        monkeypatch):
    # Every new rank re-deals all old slots. At 4,096 old slots it computed each epoch's
    # permutation once per old slot (4,096 of 41k units: ~6 s) and built the positions of
    # all 3,584 new slots to keep its own 8 (~3 s); now one permutation per source and
    # epoch, and its own positions only, equal to those of the full re-deal.
    import data.epochs as epochs
    from data.redeal import redeal, resized_state
    from data.state import PipelineState, url_list_digest

    specs = [SourceSpec(name, [f"s3://b/{name}{i}.tar" for i in range(16)])
             for name in ("a", "b")]
    saved = []
    for rank in range(4):  # 4 ranks x 2 workers, each slot one unit into epoch 0
        positions = {w: {"block": 1, "emitted": 0, "draws": 1, "index": 1, "lead": None,
                         "sources": [SourceCursor(epoch=0, position=1).to_dict()
                                     for _ in specs]} for w in range(2)}
        saved.append(PipelineState(SEED, rank, 4, 2, ["a", "b"], positions=positions,
                                   shard_lists=[url_list_digest(s.urls) for s in specs]
                                   ).to_dict())
    everything = redeal(saved, specs, 3, 2, SEED).positions
    permutations: Counter[tuple[str, int]] = Counter()
    real_permutation, real_to_dict, built = epochs.epoch_permutation, SourceCursor.to_dict, []

    def permutation(units, seed, source, epoch, shuffle=True):
        permutations[source, epoch] += 1
        return real_permutation(units, seed, source, epoch, shuffle)

    def to_dict(cursor):
        built.append(cursor)
        return real_to_dict(cursor)

    monkeypatch.setattr(epochs, "epoch_permutation", permutation)
    monkeypatch.setattr(SourceCursor, "to_dict", to_dict)
    state = resized_state(saved, specs, 1, 3, 2, SEED)
    assert permutations == Counter({("a", 0): 1, ("b", 0): 1})  # before: 8 each
    assert len(built) == 2 * len(specs)  # rank 1's 2 slots; before: all 6
    assert state.positions == {0: everything[2], 1: everything[3]}


def test_a_resize_keeps_the_version_of_a_unit_an_old_slot_was_inside(tmp_path):
    """The re-dealt entry of a unit an old slot was inside keeps the object version its
    byte offset belongs to: a shard replaced by the resume is read from its start."""
    import os

    from data.stats import DataStats

    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(2)]
    stream = _stream(urls, 0, 1)
    it = iter(stream)
    first = [next(it)["__key__"] for _ in range(2)]
    cursor = SourceCursor.from_dict(json.loads(json.dumps(stream.cursor().to_dict())))
    assert cursor.unit is not None and cursor.version
    new, _, resumed = redeal_source([cursor], SourceSpec("a", urls), 1, 2, SEED)
    assert resumed == 1
    inside = next(e for c in new for e in c.share if len(e) > 2)
    assert inside[1] == cursor.unit and inside[5] == cursor.version
    shard = inside[1]
    prefix = Path(shard).stem + "-"
    os.replace(write_tar(tmp_path / "new.tar", good_samples("N" + prefix, 5, size=16)),
               shard)
    slot = next(i for i, c in enumerate(new) if inside in c.share)
    counter = SkipCounter()
    resumed_stream = SourceStream("a", urls, slot, 2, SEED, S3, counter, cursor=new[slot])
    keys = []
    for raw in resumed_stream:
        if resumed_stream.cursor().share is None:
            break
        keys.append(raw["__key__"])
    stats = DataStats()
    stats.add_counts(counter.drain())
    assert [k for k in keys if k.startswith("N")] == [f"N{prefix}{i:04d}" for i in range(2, 5)]
    assert not any(k.startswith(prefix) and k in first for k in keys)
    assert stats.events["shards_changed"] == 1


# -- loss counts of the old workers' shuffle blocks across a resize ----------------------

class _KeyCodec:
    """Decodes like pre-training's codec as far as the counts go (a sample without its
    image, or with one PIL cannot read, is skipped and counted); a batch is its keys."""

    def decode(self, source_id, raw, rng, counter):
        import io

        from PIL import Image

        if "jpg" not in raw:
            counter.skip("s", "missing_image")
            return None
        try:
            Image.open(io.BytesIO(raw["jpg"])).load()
        except Exception:
            counter.skip("s", "undecodable_image")
            return None
        return raw["__key__"]

    def collate(self, samples, worker, counter):
        return [key for _, key in samples]


def _tar_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding ``members`` (name, bytes) in order, repeats allowed."""
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _damaged_shard_set(tmp_path) -> list[str]:
    """8 shards of 6 samples with losses of every kind a read or a decode counts: images
    that do not decode (s1: 1, s5: 4), an image missing (s2: 2), a sample with two images
    (s0: 3), shard s3 cut inside sample 3, shard s6 missing."""
    urls = []
    for i in range(8):
        members = []
        for sample in good_samples(f"s{i}-", 6, size=8):
            key = sample.pop("__key__")
            for ext, value in sample.items():
                data = value.encode() if isinstance(value, str) else value
                if (i, key[-1], ext) in ((1, "1", "jpg"), (5, "4", "jpg")):
                    data = b"not a jpeg"
                if (i, key[-1], ext) == (2, "2", "jpg"):
                    continue
                members.append((f"{key}.{ext}", data))
                if (i, key[-1], ext) == (0, "3", "jpg"):
                    members.append((f"{key}.{ext}", data))
        path = _tar_members(tmp_path / f"s{i}.tar", members)
        if i == 3:
            with tarfile.open(path) as tar:
                txt = tar.getmember("s3-0003.txt")
            path.write_bytes(path.read_bytes()[:txt.offset_data + 3])
        if i == 6:
            path.unlink()
        urls.append(str(path))
    return urls


def _pass_loader(urls, rank, world_size, state=None):
    from data.loader import LoaderOptions, ResumableLoader, StreamSource

    opts = LoaderOptions(seed=3, batch_size=1, workers=0, shuffle_buffer=4, s3=FAULTY)
    return ResumableLoader([StreamSource("s", urls, resampled=False)], opts, _KeyCodec(),
                           rank, world_size, state=state)


# (batches read by old rank 0, by old rank 1): old blocks holding a truncated shard, a
# missing one, a missing image, a duplicate member, an undecodable image; (4, 4): none
# (a full pass is 21 and 14 batches)
@pytest.mark.parametrize("takes", [(1, 5), (1, 9), (3, 1), (19, 11), (1, 13), (4, 4)])
def test_skip_counts_of_the_old_shuffle_blocks_count_once_across_a_resize(tmp_path, takes):
    # A saved position is the start of the worker's current shuffle block: the block's
    # samples are read again on resume. On the same slot count that re-read is muted (its
    # counts were reported before the save); after a resize the new slots read those
    # samples again and counted their losses a second time: a truncated shard, a missing
    # one, an undecodable image met in an old worker's current block.
    urls = _damaged_shard_set(tmp_path)
    reference: Counter[str] = Counter()
    delivered_once: Counter[str] = Counter()
    for rank in range(2):  # one uninterrupted pass on 2 ranks
        loader = _pass_loader(urls, rank, 2)
        for batch in loader:
            delivered_once.update(batch)
        reference.update(loader.stats.skipped)
    assert set(reference) == {"undecodable_image", "missing_image", "duplicate_member",
                              "truncated_shard", "lost_samples", "missing_shard"}
    saved, delivered, mid_block = [], Counter(), 0
    for rank, take in enumerate(takes):
        loader = _pass_loader(urls, rank, 2)
        for i, batch in enumerate(loader):
            delivered.update(batch)
            if i + 1 == take:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # as in checkpoints
        mid_block += state["positions"]["0"]["emitted"] > 0
        saved.append(state)
    assert mid_block  # some old worker saved inside a block: its samples are read again
    skipped: Counter[str] = Counter()
    for rank in range(3):  # resumed on 3 ranks, to the end of the pass
        loader = _pass_loader(urls, rank, 3, state=saved)
        for batch in loader:
            delivered.update(batch)
        skipped.update(loader.stats.skipped)
    # each sample once: the old blocks were finished by new slots (data.adopted); before,
    # the samples handed out of them were read again
    assert delivered == delivered_once, (delivered - delivered_once,
                                         delivered_once - delivered)
    assert skipped == reference


def _corrupt_header_shard(path: Path, member: str) -> None:
    """Flip a byte of ``member``'s tar header: its checksum fails, the read stops there and
    the rest of the shard is never read (``unread_bytes``)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("old_ranks, new_ranks", [(2, 3), (3, 2)])
def test_unread_bytes_of_a_damaged_shard_in_an_old_block_count_once_across_a_resize(
        tmp_path, old_ranks, new_ranks):
    # A shard whose header is corrupt in its middle (s7, at sample 3) is counted
    # truncated_shard with the bytes after the break (unread_bytes, an event). Saved
    # inside the shuffle block whose read met the damage, the new slots read it again: the
    # skips were taken out of the totals (MixState.skips), its unread bytes were not and
    # counted twice (2 -> 3: 18,432 bytes counted 36,864).
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 6, size=8)))
            for i in range(8)]
    _corrupt_header_shard(Path(urls[7]), "s7-0003.txt")
    reference: Counter[str] = Counter()
    takes = []
    for rank in range(old_ranks):  # one uninterrupted pass; where to save each rank
        loader = _pass_loader(urls, rank, old_ranks)
        met = None  # the first batch after which the current block has met the damage
        for i, _ in enumerate(loader, 1):
            skips = loader.state_dict()["positions"]["0"]["skips"]
            if met is None and any(reason == "truncated_shard" for _, reason, _ in skips):
                met = i
        takes.append(met)
        reference.update(loader.stats.skipped)
        reference["unread_bytes"] += loader.stats.events["unread_bytes"]
    assert reference["truncated_shard"] == 1 and reference["unread_bytes"] > 0
    assert takes.count(None) == old_ranks - 1  # one rank saves inside that block
    takes = [2 if take is None else take for take in takes]  # the others: 2 batches in
    saved = [_read_pass(_pass_loader(urls, rank, old_ranks), take)[1]
             for rank, take in enumerate(takes)]
    totals: Counter[str] = Counter()
    for rank in range(new_ranks):  # to the end of the pass (rank 0 has the old totals)
        loader = _pass_loader(urls, rank, new_ranks, state=saved)
        _read_pass(loader)
        totals.update(loader.stats.skipped)
        totals["unread_bytes"] += loader.stats.events["unread_bytes"]
    assert totals == reference


class _MutedSkips(SkipCounter):
    """Also keeps the skips it was asked to count while muted."""

    def __init__(self):
        super().__init__()
        self.muted_skips: Counter[tuple[str, str]] = Counter()

    def skip(self, source, reason, n=1):
        if self.muted and n:
            self.muted_skips[source, reason] += n
        super().skip(source, reason, n)


def test_a_saved_state_holds_the_skips_a_re_read_of_its_block_meets_again(tmp_path):
    # What a resize takes out of the totals (MixState.skips) must be what a re-read of
    # the saved block meets again: what the muted re-read of a same-size resume meets, plus
    # the decoding of the samples it skips as handed out. Checked at every sample of a
    # resampled source whose epochs end inside blocks (a block then opens with a lead
    # sample, re-read from its unit's start), and again after a resume inside a block.
    from data.stream import MixedStream

    # 4 shards of 5 samples: each opens with a sample of two images (met before the
    # first sample of an epoch: with its lead), t1's sample 2 has none, t3 is cut in 3
    urls = []
    for i in range(4):
        members = []
        for j, sample in enumerate(good_samples(f"t{i}-", 5, size=8)):
            key = sample.pop("__key__")
            members += [(f"{key}.{ext}", v.encode() if isinstance(v, str) else v)
                        for ext, v in sample.items() if (i, j, ext) != (1, 2, "jpg")]
            if j == 0:
                members.append((f"{key}.jpg", sample["jpg"]))
        path = _tar_members(tmp_path / f"t{i}.tar", members)
        if i == 3:
            with tarfile.open(path) as tar:
                txt = tar.getmember("t3-0003.txt")
            path.write_bytes(path.read_bytes()[:txt.offset_data + 3])
        urls.append(str(path))

    def mixed(counter, state=None):
        def make_sources(cursors):
            return [SourceStream("s", urls, 0, 1, SEED, FAULTY, counter,
                                 cursor=cursors[0] if cursors else None)]

        # blocks of 3 samples, epochs of 15: some epochs end inside a block
        return MixedStream(make_sources, [1.0], SEED, 0, 3, counter, state=state)

    def decode(raw, counter):  # a codec's counts: for every sample handed out
        if "jpg" not in raw:
            counter.skip("s", "missing_image")

    def check(states, handed):
        """``states[i]`` was saved after handing out ``handed[i]``."""
        for i, state in enumerate(states):
            counter = _MutedSkips()
            next(iter(mixed(counter, state)))  # re-reads the block (muted), then goes on
            expected = Counter(counter.muted_skips)
            for raw in handed[i + 1 - state["emitted"]:i + 1]:  # the block's handed out
                decode(raw, decoded := SkipCounter())
                expected.update(decoded.met)
            assert Counter({(s, r): n for s, r, n in state["skips"]}) == expected, i

    def run(state, n):
        """The first ``n`` samples handed out from ``state``, each with the state after."""
        counter = SkipCounter()
        stream, handed, states = mixed(counter, state), [], []
        for _, raw in stream:
            decode(raw, counter)
            handed.append(raw)
            states.append(json.loads(json.dumps(stream.state())))  # as in checkpoints
            if len(handed) == n:
                return handed, states

    handed, states = run(None, 50)  # 3 epochs and more
    assert any(s["lead"] is not None and s["skips"] for s in states)
    assert any(s["skips"] and s["emitted"] for s in states)
    check(states, handed)
    # inside a block, where it ends (MixState.end, what a resize re-deals from) and what
    # the next block's lead met (end_skips, what a resize takes out of the totals): the
    # next block's start, as the state after the block's last sample names it
    for i, state in enumerate(states[:-5]):
        if state["emitted"]:
            after = next(s for s in states[i + 1:] if not s["emitted"])
            assert (state["end"], state["end_skips"]) == (after["sources"], after["skips"]), i
    assert any(s["emitted"] and s["end_skips"] for s in states)
    # resumed inside a block that ends with a lead met with skips, saved again further on
    k = next(i for i in range(len(states) - 1) if states[i]["emitted"]
             and states[i + 1]["lead"] is not None and states[i + 1]["skips"])
    more, later = run(states[k], 20)
    check(states[:k + 1] + later, handed[:k + 1] + more)


# -- one-pass sources: old ranks at different points of the pass -------------------------

def _read_pass(loader, take=None) -> tuple[list[str], dict]:
    """The keys ``loader`` delivers (``take`` batches of one sample, or its whole pass),
    and its state after them, as stored in checkpoints."""
    keys: list[str] = []
    if take != 0:
        for batch in loader:
            keys += batch
            if len(keys) == take:
                break
    return keys, json.loads(json.dumps(loader.state_dict()))


# batches read by each old rank before the save (None: its whole pass, so its state is the
# next pass's start: epoch 1, no positions; 0: none yet, epoch 0, no positions); each old
# rank's share is 2 or 3 shards (10-15 batches)
@pytest.mark.parametrize("takes, new_ranks", [
    ((3, None), 3),         # rank 1 finished: its whole share was dealt and read again
    ((None, 3), 3),         # rank 0 finished: the next pass was dealt into this one
    ((None, 0, 5), 2),      # rank 1 not started took rank 0's epoch: its share was lost
    ((7, None, None), 2),
])
def test_a_rank_that_finished_its_pass_has_nothing_re_dealt_and_the_pass_ends_once(
        tmp_path, takes, new_ranks):
    # A one-pass source (resampled=False, as in evaluation or an epochs run over a finite
    # pass) saved while some ranks had finished the pass and others had not, resumed on
    # another rank count and read to the end of the pass: every sample of the pass is
    # delivered exactly once (before, the samples each old worker had handed out of its
    # current shuffle block were read again). The next pass is a whole pass 1, dealt over
    # the new ranks as in a run that started there.
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(6)]
    one_pass = Counter(f"s{i}-{j:04d}" for i in range(6) for j in range(5))
    delivered, saved, inside = Counter(), [], 0
    for rank, take in enumerate(takes):
        keys, state = _read_pass(_pass_loader(urls, rank, len(takes)), take)
        assert (state["epoch"], bool(state["positions"])) == (
            (1, False) if take is None else (0, take > 0))
        inside += bool(state["positions"] and state["positions"]["0"]["emitted"])
        delivered.update(keys)
        saved.append(state)
    assert inside  # an old rank saved inside a shuffle block
    loaders = [_pass_loader(urls, rank, new_ranks, state=saved) for rank in range(new_ranks)]
    for loader in loaders:
        keys, state = _read_pass(loader)
        delivered.update(keys)
        assert state["epoch"] == 1  # the resumed pass was pass 0
    assert delivered == one_pass, (delivered - one_pass, one_pass - delivered)
    for rank, loader in enumerate(loaders):  # the next pass: pass 1 of the new rank count
        fresh = _pass_loader(urls, rank, new_ranks)
        fresh.start_at(1)
        assert _read_pass(loader)[0] == _read_pass(fresh)[0]


@pytest.mark.parametrize("takes", [(3, None), (None, 3), (19, None), (None, 13)])
def test_losses_of_a_rank_that_finished_its_pass_count_once_across_a_resize(tmp_path, takes):
    # Save points as above over shards with each loss kind (a full pass is 21 and 14
    # batches): a finished rank's shards were read again after the resize and every loss
    # in them counted twice.
    urls = _damaged_shard_set(tmp_path)
    reference: Counter[str] = Counter()
    for rank in range(2):  # one uninterrupted pass on 2 ranks
        loader = _pass_loader(urls, rank, 2)
        _read_pass(loader)
        reference.update(loader.stats.skipped)
    saved = [_read_pass(_pass_loader(urls, rank, 2), take)[1]
             for rank, take in enumerate(takes)]
    skipped: Counter[str] = Counter()
    for rank in range(3):
        loader = _pass_loader(urls, rank, 3, state=saved)
        _read_pass(loader)
        skipped.update(loader.stats.skipped)
    assert skipped == reference


def test_a_one_pass_slot_at_the_end_of_its_share_leaves_nothing_and_no_next_pass(tmp_path):
    # Old slot 0 read its whole share of a one-pass source (its cursor at the share's end,
    # its rank not yet at the pass's end); slot 1 is inside its first shard. What is left
    # is slot 1's rest of pass 0 only: the re-deal used to take slot 0 as being in epoch 1
    # and deal all of epoch 1 into the resumed pass (a one-pass stream reads its share and
    # ends), so the source was read a second time inside one pass.
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(4)]
    spec = SourceSpec("a", urls, resampled=False)
    cursors, seen = [], Counter()
    for slot, take in ((0, None), (1, 2)):  # None: to the stream's end
        stream = SourceStream("a", urls, slot, 2, SEED, S3, SkipCounter(), resampled=False)
        for n, raw in enumerate(stream, 1):
            seen[raw["__key__"]] += 1
            if n == take:
                break
        cursors.append(SourceCursor.from_dict(json.loads(json.dumps(
            stream.cursor().to_dict()))))
    assert cursors[0].unit is None and cursors[1].unit is not None
    new, units, resumed = redeal_source(cursors, spec, 2, 3, SEED)
    assert (units, resumed) == (2, 1)  # slot 1's current shard and its next one
    assert all(e[0] == 0 for c in new for e in c.share)
    assert {(c.epoch, c.share_last, c.count_epoch) for c in new} == {(0, 0, 0)}
    for slot, cursor in enumerate(new):
        stream = SourceStream("a", urls, slot, 3, SEED, S3, SkipCounter(), resampled=False,
                              cursor=cursor)
        seen.update(raw["__key__"] for raw in stream)
    assert seen == Counter(f"s{i}-{j:04d}" for i in range(4) for j in range(5))


def test_a_rank_already_in_the_next_pass_is_re_read_in_it_and_says_so(tmp_path):
    # Old rank 1 finished pass 0 and read 2 batches of pass 1 while rank 0 was still in
    # pass 0. The new ranks finish pass 0 exactly (its samples once: rank 0's current
    # shuffle block is finished by a new slot) and deal pass 1 afresh: rank 1's 2 samples
    # of it are read again, which the re-deal counts as repeated and names rank 1 for.
    from data.redeal import redeal

    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 5, size=8)))
            for i in range(6)]
    one_pass = Counter(f"s{i}-{j:04d}" for i in range(6) for j in range(5))
    keys, first = _read_pass(_pass_loader(urls, 0, 2), 7)
    delivered = Counter(keys)
    emitted = first["positions"]["0"]["emitted"]
    assert emitted  # saved inside a shuffle block
    ahead = _pass_loader(urls, 1, 2)
    delivered.update(_read_pass(ahead)[0])
    assert _read_pass(ahead, 2)[1]["epoch"] == 1
    saved = [first, json.loads(json.dumps(ahead.state_dict()))]
    out = redeal(saved, [SourceSpec("s", urls, resampled=False)], 3, 1, 3)
    assert (out.epoch, out.ahead, out.repeated) == (0, [1], 2)
    assert (out.adopted, out.kept) == (1, emitted)  # rank 0's block, handed on whole
    loaders = [_pass_loader(urls, rank, 3, state=saved) for rank in range(3)]
    for loader in loaders:
        delivered.update(_read_pass(loader)[0])
    assert delivered == one_pass
    for rank, loader in enumerate(loaders):
        fresh = _pass_loader(urls, rank, 3)
        fresh.start_at(1)
        assert _read_pass(loader)[0] == _read_pass(fresh)[0]


def test_a_one_pass_slot_waiting_on_a_set_aside_shard_keeps_it_in_its_pass():
    # One-pass slot 0 drew both its units; the second failed at sample 2 and waits for a
    # retry (set aside). Slot 1 has not started. Left of the pass: that unit at its
    # cursor, and slot 1's two units; nothing of epoch 1 (the slot's draws ran out, which
    # the resampled rule takes as being in the next epoch).
    from data.epochs import slot_units

    urls = [f"s3://b/s{i}.tar" for i in range(4)]
    mine = [urls[u] for u in slot_units(4, 2, 0, SEED, "a", 0)]
    waiting = SourceCursor(epoch=0, position=2, aside={mine[1]: [1024, 2, False, 1, "v1"]},
                           count_epoch=0)
    new, units, resumed = redeal_source([waiting, SourceCursor()],
                                        SourceSpec("a", urls, resampled=False), 2, 2, SEED)
    entries = [e for c in new for e in c.share]
    assert (units, resumed) == (3, 1)
    assert [0, mine[1], 1024, 2, False, "v1"] in entries
    assert {e[1] for e in entries} == set(urls) - {mine[0]}
    assert {(e[0], c.share_last) for c in new for e in c.share} == {(0, 0)}
