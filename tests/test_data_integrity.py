"""Shard integrity and fault policy on local files (issue #14): damaged tars are detected and
what they lose is counted exactly; ``.jpeg`` images and malformed tag JSON are handled; a
shard that fails is retried later and never removes its source.

Format facts used (POSIX.1-2017 ``pax``/ustar, and GNU tar's manual): a tar member is a
512-byte header (with a checksum) followed by its data padded to 512 bytes, and an archive
ends with two 512-byte zero blocks. img2dataset writes ``<shard>_stats.json`` next to each
``<shard>.tar``, whose ``successes`` is the number of samples in the tar (its logger.py).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from s3_server import good_samples, jpeg_bytes, write_tar

from data.config import S3Config
from data.shard_schedule import SHARD_ATTEMPTS
from data.sources import read_shard
from data.stats import DataStats, SkipCounter
from data.stream import SourceStream
from pretrain.data import DataConfig, SourceConfig, build_loader
from pretrain.data.verify import verify_shards

WRITTEN = 5  # samples written to each test shard: t0000 .. t0004, members jpg, txt, json
PREALLOCATED = 64 * 1024  # > 3 tar records: the test shard is 2 (it is padded to one)


def _fast_retries() -> S3Config:
    return S3Config(retries=0, backoff=0.01, max_backoff=0.01)


def _shard(tmp_path: Path) -> tuple[Path, dict[str, tarfile.TarInfo]]:
    path = write_tar(tmp_path / "whole.tar", good_samples("t", WRITTEN, size=16))
    with tarfile.open(path) as tar:
        return path, {m.name: m for m in tar.getmembers()}


def _damaged(tmp_path: Path, kind: str) -> tuple[Path, set[str], int]:
    """A copy of the 5-sample shard damaged as ``kind``; the keys a reader may deliver (the
    samples whole before the damage, less the last one when the break does not prove it
    whole) and the samples it cannot deliver."""
    path, members = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    t3_jpg, t3_txt = members["t0003.jpg"], members["t0003.txt"]
    if kind == "cut_at_header_boundary":  # right before t0003's first header
        data = data[:t3_jpg.offset]
        # t0002 may have had more members after the cut: dropped, counted lost
        delivered = {"t0000", "t0001"}
    elif kind == "cut_mid_member":  # inside t0003.txt's data: t0003 is partial
        data = data[:t3_txt.offset_data + 3]
        delivered = {"t0000", "t0001", "t0002"}  # t0002 is whole: t0003 had begun
    elif kind == "corrupt_header_mid_shard":  # t0003.txt's header fails its checksum
        data[t3_txt.offset + 10] ^= 0xFF
        delivered = {"t0000", "t0001", "t0002"}
    elif kind == "missing_end_of_archive":  # every member intact, zero blocks gone
        last = members["t0004.json"]
        data = data[:last.offset_data + -(-last.size // 512) * 512]
        delivered = {"t0000", "t0001", "t0002", "t0003"}  # t0004 unproven: dropped
    elif kind == "zero_filled_tail":  # a write into a preallocated 64 KiB file stopped
        data = data[:t3_jpg.offset] + bytes(PREALLOCATED - t3_jpg.offset)  # before t0003
        delivered = {"t0000", "t0001"}  # as cut there: t0002 may have lost members
    elif kind == "zeroed_header_mid_shard":  # t0003.txt's header block is all zeros
        data[t3_txt.offset:t3_txt.offset + 512] = bytes(512)
        delivered = {"t0000", "t0001", "t0002"}  # t0003 lost its txt (and the rest)
    else:
        raise ValueError(kind)
    out = tmp_path / "damaged.tar"
    out.write_bytes(bytes(data))
    return out, delivered, WRITTEN - len(delivered)


KINDS = ["cut_at_header_boundary", "cut_mid_member", "corrupt_header_mid_shard",
         "missing_end_of_archive", "zero_filled_tail", "zeroed_header_mid_shard"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample_count_known", [False, True])
def test_damaged_tar_is_detected_and_its_losses_counted(tmp_path, kind, sample_count_known):
    url, delivered, lost = _damaged(tmp_path, kind)
    intact = SkipCounter()  # control: the undamaged shard reads whole and counts nothing
    assert len(list(read_shard(str(tmp_path / "whole.tar"), "src", _fast_retries(),
                               intact))) == WRITTEN
    assert not [c for c in intact.drain() if c[0] == "skip"]
    if sample_count_known:  # as img2dataset leaves it next to each shard
        (tmp_path / "damaged_stats.json").write_text(json.dumps(
            {"count": WRITTEN, "successes": WRITTEN, "failed_to_download": 0}))
    counter = SkipCounter()
    outcome: dict = {}
    keys = [s["__key__"] for s in read_shard(str(url), "src", _fast_retries(), counter,
                                             outcome)]
    assert keys == sorted(delivered)
    counts = {(kind_, name): n for kind_, _, name, n in counter.drain()}
    skipped = {name: n for (kind_, name), n in counts.items() if kind_ == "skip"}
    # Without the sample count only the sample cut in the middle is known to be lost.
    assert skipped == {"truncated_shard": 1, "lost_samples": lost if sample_count_known else 1}
    if sample_count_known:
        assert len(keys) + skipped["lost_samples"] == WRITTEN  # every sample accounted for
    assert outcome["status"] == "damaged"
    if kind == "corrupt_header_mid_shard":  # the rest of the shard was not read: say how much
        assert counts["event", "unread_bytes"] == url.stat().st_size - \
            _shard(tmp_path)[1]["t0003.txt"].offset


@pytest.mark.parametrize("sample_count_known", [False, True])
def test_zero_padding_past_the_usual_record_is_cleared_only_by_the_sample_count(
        tmp_path, sample_count_known):
    # A writer with a larger record (``tar -b 128``: 64 KiB) pads the whole archive with
    # zeros further than tar's default 10 KiB record; without the shard's sample count
    # that padding cannot be told from a zero-filled tail, so it is counted as one.
    path, _ = _shard(tmp_path)
    padded = tmp_path / "padded.tar"
    padded.write_bytes(path.read_bytes().ljust(PREALLOCATED, b"\0"))
    if sample_count_known:
        (tmp_path / "padded_stats.json").write_text(json.dumps({"successes": WRITTEN}))
    counter, outcome = SkipCounter(), {}
    keys = [s["__key__"] for s in read_shard(str(padded), "src", _fast_retries(), counter,
                                             outcome)]
    skipped = {name: n for kind, _, name, n in counter.drain() if kind == "skip"}
    if sample_count_known:
        assert len(keys) == WRITTEN and outcome["status"] == "complete" and not skipped
    else:
        assert outcome["status"] == "damaged"
        assert skipped == {"truncated_shard": 1, "lost_samples": 1}


def test_jpeg_spellings_are_images(tmp_path):
    # webdataset's image decoder treats .jpg and .jpeg alike (its IMAGE_EXTENSIONS);
    # member keys are compared lower-case, so .JPEG is .jpeg.
    shard = write_tar(tmp_path / "j.tar", [
        {"__key__": "lower", "jpeg": jpeg_bytes(1), "txt": "a .jpeg image"},
        {"__key__": "upper", "JPEG": jpeg_bytes(2), "txt": "a .JPEG image"},
        {"__key__": "plain", "jpg": jpeg_bytes(3), "txt": "a .jpg image"},
    ])
    report = verify_shards(str(shard), _fast_retries(), image_size=16)
    assert report["samples"] == 3 and report["skipped"] == 0


def test_malformed_tag_json_is_counted_and_the_sample_kept_untagged(tmp_path):
    vocab = tmp_path / "tags.txt"
    vocab.write_text("a\nb\n")
    tags = [json.dumps({"tags": ["a"]}),  # fine
            "{not json",                  # malformed: not JSON
            json.dumps(["a", "b"]),       # malformed: not an object
            json.dumps({"tags": 5}),      # malformed: the field is not a list
            # malformed: nested past what json's C scanner follows (RecursionError: before,
            # it escaped the worker and ended the run, and every requeue met it again)
            '{"tags": ' + "[" * 200_000 + "]" * 200_000 + "}",
            json.dumps({"tags": None}),   # untagged, not malformed
            json.dumps({"other": 1})]     # untagged, not malformed
    samples = good_samples("m", len(tags))
    for sample, value in zip(samples, tags, strict=True):
        sample["json"] = value
    url = str(write_tar(tmp_path / "m.tar", samples))
    cfg = DataConfig(sources=[SourceConfig("s", url, resampled=False)], image_size=16,
                     batch_size=len(tags), workers=0, shuffle_buffer=0, context_length=12,
                     tag_vocab=str(vocab), s3=_fast_retries())
    loader = build_loader(cfg, 0, 1, train=False)
    (batch,) = list(loader)
    assert batch["has_tags"].tolist() == [True] + [False] * 6
    assert loader.stats.events["malformed_tags"] == 4
    assert not loader.stats.skipped


def _flaky(tmp_path: Path, shard: Path, failures: int) -> str:
    """A ``pipe:`` URL whose command fails (exit 3) its first ``failures`` runs, then serves
    ``shard``: a store that is down for a while."""
    runs = tmp_path / f"{shard.stem}.runs"
    return (f"pipe:sh -c 'n=$(cat {runs} 2>/dev/null || echo 0); echo $((n+1)) > {runs}; "
            f"[ $n -ge {failures} ] && cat {shard} || exit 3'")


def _keys(loader, batches: int | None = None) -> list[str]:
    keys = []
    for i, batch in enumerate(loader):
        keys += [k.split("/")[1] for k in batch["keys"]]
        if batches is not None and i + 1 == batches:
            break
    return keys


def _cfg(sources, batch_size: int = 5) -> DataConfig:
    return DataConfig(sources=sources, image_size=8, batch_size=batch_size, workers=0,
                      shuffle_buffer=0, context_length=12, s3=_fast_retries())


def test_a_failed_shard_is_read_later_without_losing_or_repeating_samples(tmp_path):
    a = write_tar(tmp_path / "a.tar", good_samples("a", 6, size=8))
    b = write_tar(tmp_path / "b.tar", good_samples("b", 4, size=8))
    src = SourceConfig("s", [_flaky(tmp_path, a, failures=2), str(b)], resampled=False)
    loader = build_loader(_cfg([src]), 0, 1, train=False)
    keys = _keys(loader)
    assert sorted(keys) == [f"a{i:04d}" for i in range(6)] + [f"b{i:04d}" for i in range(4)]
    assert not loader.stats.skipped
    assert loader.stats.events["shard_failures"] == 2


def test_failures_of_the_only_shard_never_end_a_resampled_source(tmp_path):
    a = write_tar(tmp_path / "a.tar", good_samples("a", 5, size=8))
    src = SourceConfig("s", [_flaky(tmp_path, a, failures=3)])
    loader = build_loader(_cfg([src]), 0, 1, train=True)
    keys = _keys(loader, batches=4)
    assert keys == [f"a{i:04d}" for i in range(5)] * 4
    assert not loader.stats.skipped
    assert loader.stats.events["storage_waits"] == 1


def test_a_shard_that_keeps_failing_while_others_read_is_given_up(tmp_path):
    good = write_tar(tmp_path / "good.tar", good_samples("g", 5, size=8))
    dead = "pipe:sh -c 'exit 3'"
    src = SourceConfig("s", [dead, str(good)])
    loader = build_loader(_cfg([src]), 0, 1, train=True)
    for i, _ in enumerate(loader):  # until given up (cooldowns 10, 20, 40 ms)
        if loader.stats.skipped or i == 5000:
            break
    assert dict(loader.stats.skipped) == {"unreadable_shard": 1}
    # retried (set aside) before being given up at the last attempt
    assert loader.stats.events["shard_failures"] == SHARD_ATTEMPTS - 1


def test_a_truncated_shard_stays_in_a_resampled_source_and_is_counted_once(tmp_path):
    url, delivered, _ = _damaged(tmp_path, "cut_mid_member")
    loader = build_loader(_cfg([SourceConfig("s", str(url))], batch_size=3), 0, 1)
    keys = _keys(loader, batches=4)
    assert keys == sorted(delivered) * 4
    assert dict(loader.stats.skipped) == {"truncated_shard": 1, "lost_samples": 1}


def test_a_training_stream_with_nothing_readable_fails_with_a_clear_error(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 200)
    loader = build_loader(_cfg([SourceConfig("s", [str(junk), str(tmp_path / "gone.tar")])]),
                          0, 1, train=True)
    with pytest.raises(RuntimeError, match="every source stream .* ended"):
        _keys(loader)


def _cut_shard(tmp_path: Path, name: str, n: int, cut_in: int | None,
               count: bool = True) -> str:
    """A shard of ``n`` samples ``{name}0000..``, cut inside sample ``cut_in``'s caption
    (None: whole), with img2dataset's ``_stats.json`` when ``count``."""
    path = write_tar(tmp_path / f"{name}.tar", good_samples(name, n, size=8))
    if cut_in is not None:
        with tarfile.open(path) as tar:
            txt = tar.getmember(f"{name}{cut_in:04d}.txt")
        path.write_bytes(path.read_bytes()[:txt.offset_data + 3])
    if count:
        (tmp_path / f"{name}_stats.json").write_text(json.dumps({"successes": n}))
    return str(path)


def _run_slots(urls: list[str], nslots: int, epochs: int) -> tuple[DataStats, list[str]]:
    """Every slot's stream of one resampled source read through ``epochs`` epochs (or until
    it ends): the totals of all slots, as the run reports them, and the keys of epoch 0."""
    stats, first = DataStats(), []
    for slot in range(nslots):
        counter = SkipCounter()
        stream = SourceStream("s", urls, slot, nslots, 0, S3Config(prefetch_bytes=0, retries=0),
                              counter)
        for raw in stream:
            if stream.cursor().epoch >= epochs:
                break
            if stream.cursor().epoch == 0:
                first.append(raw["__key__"])
        stats.add_counts(counter.drain())
    return stats, sorted(first)


@pytest.mark.parametrize("sample_count_known", [False, True])
def test_a_damaged_shard_read_in_parts_and_epochs_is_counted_once(tmp_path,
                                                                  sample_count_known):
    # 1 shard, 3 slots: 3 parts, each reads the whole shard and meets the same break; over
    # 3 epochs every slot reads every part. 10 samples, cut inside t0004: t0000..t0003 read.
    url = _cut_shard(tmp_path, "t", 10, cut_in=4, count=sample_count_known)
    stats, first = _run_slots([url], nslots=3, epochs=3)
    assert first == [f"t{i:04d}" for i in range(4)]
    assert dict(stats.skipped) == {"truncated_shard": 1,
                                   "lost_samples": 6 if sample_count_known else 1}


def test_a_damaged_whole_shard_dealt_to_other_slots_in_later_epochs_is_counted_once(
        tmp_path):
    # 4 shards over 2 slots for 4 epochs: the damaged one is read by both slots
    urls = [_cut_shard(tmp_path, f"w{i}", 5, cut_in=3 if i == 1 else None) for i in range(4)]
    stats, _ = _run_slots(urls, nslots=2, epochs=4)
    assert dict(stats.skipped) == {"truncated_shard": 1, "lost_samples": 2}


def test_a_missing_shard_read_in_parts_is_counted_once(tmp_path):
    good = _cut_shard(tmp_path, "g", 6, cut_in=None)
    stats, first = _run_slots([good, str(tmp_path / "gone.tar")], nslots=4, epochs=3)
    assert first == [f"g{i:04d}" for i in range(6)]
    assert dict(stats.skipped) == {"missing_shard": 1}


def test_a_cursor_lists_every_dropped_shard_sorted_as_they_accrue_and_after_a_resume(
        tmp_path):
    """The cursor's dropped/damaged lists are kept sorted incrementally (one insertion per
    new key, where a sort of the whole set per unit made a source with many missing shards
    cost quadratic time): at every unit, before and after a resume, the cursor (and the
    unit's start) must list exactly the shards dropped so far, sorted. The shards go
    missing in an order unlike their sorted one (the deal shuffles them)."""
    good = [_cut_shard(tmp_path, f"g{i}", 2, cut_in=None) for i in range(3)]
    urls = good + [str(tmp_path / f"gone-{i:02d}.tar") for i in range(12)]
    counter = SkipCounter()
    stream = SourceStream("s", urls, 0, 1, 0, S3Config(prefetch_bytes=0, retries=0),
                          counter, resampled=False)
    order: list[str] = []
    for seen, _ in enumerate(stream, 1):
        now = set(stream.schedule.dropped)
        order = list(stream.schedule.dropped.added)
        assert stream.cursor().dropped == sorted(now)
        assert set(stream.unit_start().dropped) <= now
        if seen == 3:
            break
    assert order and order != sorted(order)  # some dropped out of sorted order
    saved = stream.cursor()
    resumed = SourceStream("s", urls, 0, 1, 0, S3Config(prefetch_bytes=0, retries=0),
                           SkipCounter(), resampled=False, cursor=saved)
    assert resumed.cursor().dropped == saved.dropped
    list(resumed)
    gone = sorted(u for u in urls if "gone" in u)
    assert resumed.cursor().dropped == gone


def test_a_stream_resumed_into_a_replaced_local_shard_reads_it_from_its_start(tmp_path):
    """A saved position is a byte offset in the object it was taken in; the same path may
    hold another file by the resume (a shard written again): its version (size, mtime) is
    saved with the position, and another one is read from its start, skipping the samples
    already passed. Before, the offset was read in the new file as a tar header."""
    import os

    from data.stream import SourceCursor

    path = write_tar(tmp_path / "shard.tar", good_samples("A", 12, size=8))
    stream = SourceStream("s", [str(path)], 0, 1, 0, _fast_retries(), SkipCounter(),
                          resampled=False, shuffle=False)
    it = iter(stream)
    assert [next(it)["__key__"] for _ in range(5)] == [f"A{i:04d}" for i in range(5)]
    saved = json.loads(json.dumps(stream.cursor().to_dict()))
    assert saved["version"]
    new = write_tar(tmp_path / "new.tar", good_samples("B", 12, size=16))
    os.replace(new, path)
    counter = SkipCounter()
    resumed = SourceStream("s", [str(path)], 0, 1, 0, _fast_retries(), counter,
                           resampled=False, shuffle=False,
                           cursor=SourceCursor.from_dict(saved))
    keys = [raw["__key__"] for raw in resumed]
    stats = DataStats()
    stats.add_counts(counter.drain())
    assert keys == [f"B{i:04d}" for i in range(5, 12)]
    assert stats.events["shards_changed"] == 1 and not stats.skipped


def test_member_names_follow_webdatasets_rules(tmp_path):
    """webdataset 1.0 (tariterators.py) skips only top-level names that start and end with
    ``__`` (archive metadata) and refuses two members of one name in a sample ("duplicate
    file name"). Before, a key starting with ``__`` was dropped uncounted, and a repeated
    member silently replaced the first."""
    import io

    members = [("t0000.jpg", jpeg_bytes(0)), ("t0000.txt", b"zero"),
               ("__meta__", b"{}"),
               ("__t0001.jpg", jpeg_bytes(1)), ("__t0001.txt", b"one"),
               ("t0002.jpg", jpeg_bytes(2)), ("t0002.txt", b"two"), ("t0002.TXT", b"2"),
               ("t0003.jpg", jpeg_bytes(3)), ("t0003.txt", b"three")]
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counter, outcome = SkipCounter(), {}
    samples = list(read_shard(str(path), "s", _fast_retries(), counter, outcome))
    stats = DataStats()
    stats.add_counts(counter.drain())
    assert [s["__key__"] for s in samples] == ["t0000", "__t0001", "t0003"]
    assert samples[1]["txt"] == b"one"
    assert dict(stats.skipped) == {"duplicate_member": 1}
    assert outcome["status"] == "complete" and outcome["cursor"].samples == 4
    # read in two parts (a shard split between slots): the sample is counted once
    counter = SkipCounter()
    for part in (0, 1):
        list(read_shard(str(path), "s", _fast_retries(), counter, {}, part=part, parts=2))
    stats = DataStats()
    stats.add_counts(counter.drain())
    assert dict(stats.skipped) == {"duplicate_member": 1}


def test_a_set_aside_shard_replaced_before_the_resume_is_read_from_its_start(tmp_path):
    """A shard whose read failed waits with its position (and the version it was taken
    in) in the saved state; replaced by the resume, it is read again from its start."""
    import os

    from data.stream import SourceCursor

    path = write_tar(tmp_path / "shard.tar", good_samples("A", 12, size=8))
    outcome: dict = {}
    for n, _ in enumerate(read_shard(str(path), "s", _fast_retries(), SkipCounter(),
                                     outcome), 1):
        if n == 5:
            break
    failed = outcome["cursor"]  # where a read that broke after 5 samples goes on
    saved = SourceCursor(epoch=0, position=1, aside={
        str(path): [failed.offset, failed.samples, failed.compressed, 1, failed.version]})
    os.replace(write_tar(tmp_path / "new.tar", good_samples("B", 12, size=16)), path)
    counter = SkipCounter()
    resumed = SourceStream("s", [str(path)], 0, 1, 0, _fast_retries(), counter,
                           resampled=False, shuffle=False,
                           cursor=SourceCursor.from_dict(json.loads(json.dumps(
                               saved.to_dict()))))
    keys = [raw["__key__"] for raw in resumed]
    stats = DataStats()
    stats.add_counts(counter.drain())
    assert keys == [f"B{i:04d}" for i in range(5, 12)]
    assert stats.events["shards_changed"] == 1 and not stats.skipped


# A source whose samples are all skipped (keys that do not match its shards) re-read its
# shards for ever: a resampled stream never ends, and skip counts reach the records only
# with a batch, so the run sat at step 0 with nothing logged (QA: text_key=caption over
# shards holding .txt, image_key=png over .jpg shards).


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("wrong", [{"text_key": "caption"}, {"image_key": "png"}])
def test_a_source_whose_every_sample_is_skipped_ends_the_run_with_its_reason(
        tmp_path, workers, wrong):
    from data.loader import UnusableSourceError

    shard = write_tar(tmp_path / "a.tar", good_samples("a", 6, size=8))
    good = write_tar(tmp_path / "b.tar", good_samples("b", 6, size=8))
    cfg = _cfg([SourceConfig("ok", str(good)), SourceConfig("bad", str(shard), **wrong)])
    cfg.workers, cfg.max_skipped_in_a_row = workers, 40
    loader = build_loader(cfg, 0, 1, train=True)
    reason = "missing_caption" if "text_key" in wrong else "missing_image"
    # the good source keeps delivering batches: the bad one's run is counted on its own
    with pytest.raises(UnusableSourceError) as err:
        _keys(loader, batches=1000)
    message = str(err.value)
    assert "\n" not in message and "source 'bad'" in message
    assert f"the last 40 samples it delivered were all skipped ({reason}: 40)" in message


def test_skips_between_usable_samples_never_end_a_source(tmp_path):
    samples = good_samples("a", 8, size=8)
    for s in samples[::2]:  # every other sample has no caption: runs of one
        del s["txt"]
    cfg = _cfg([SourceConfig("s", str(write_tar(tmp_path / "a.tar", samples)))], batch_size=2)
    cfg.max_skipped_in_a_row = 3
    loader = build_loader(cfg, 0, 1, train=True)
    keys = _keys(loader, batches=20)
    assert len(keys) == 40 and loader.stats.skipped["missing_caption"] == 40


def test_a_limit_of_zero_never_ends_a_source(tmp_path):
    """data.max_skipped_in_a_row=0: a source known to hold long runs of unusable samples
    (beside a good one) trains on."""
    bad = write_tar(tmp_path / "a.tar", good_samples("a", 6, size=8))
    good = write_tar(tmp_path / "b.tar", good_samples("b", 6, size=8))
    cfg = _cfg([SourceConfig("ok", str(good)), SourceConfig("bad", str(bad), text_key="x")])
    cfg.max_skipped_in_a_row = 0
    loader = build_loader(cfg, 0, 1, train=True)
    assert len(_keys(loader, batches=200)) == 1000
    assert loader.stats.skipped["missing_caption"] > 400
