"""Readers that read each shard once and must see all of it: `internimage shards tags`
(data/tags.py's count_tags) and the in-memory fine-tuning set (finetune/cls_data.py's
ShardDataset). A read that breaks after ``s3.retries`` is resumed at its cursor, as the
training stream's ShardSchedule resumes a set-aside shard; one that keeps failing ends
with an error naming the shard, never a vocabulary or a training set built from part of
a shard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from s3_server import jpeg_bytes, write_tar

from data.config import S3Config
from data.sources import ShardReadError, read_shard
from data.stats import SkipCounter
from data.tags import count_tags

# no in-place retry and no pause: each broken read reaches the resume logic at once
FAST = S3Config(retries=0, backoff=0.0, max_backoff=0.0)
SAMPLES = 20
CUT = 20_000  # bytes of the tar the failing command prints: the first few samples


def _tags_of(i: int) -> list[str]:
    return [f"t{i % 3}", f"t{i % 5}", "common"]


def _shard(path: Path) -> Path:
    """``SAMPLES`` samples with an image, a class label and tags (~2.5 KB each)."""
    return write_tar(path, [{"__key__": f"s{i:04d}", "jpg": jpeg_bytes(i, 24),
                             "cls": str(i % 4), "json": json.dumps({"tags": _tags_of(i)})}
                            for i in range(SAMPLES)])


def _fails_once(tmp_path: Path, tar: Path) -> str:
    """A ``pipe:`` URL whose command prints the first ``CUT`` bytes of ``tar`` and exits 1
    the first time it runs (a connection dropped mid-read), and the whole tar after."""
    mark, script = tmp_path / "failed_once", tmp_path / "flaky.sh"
    script.write_text(f'if [ -e "{mark}" ]; then cat "{tar}"; '
                      f'else touch "{mark}"; head -c {CUT} "{tar}"; exit 1; fi\n')
    return f"pipe:sh {script}"


def _always_fails(tar: Path) -> str:
    return f"pipe:head -c {CUT} {tar}; exit 1"


def test_count_tags_resumes_a_broken_read_where_it_broke(tmp_path):
    tar = _shard(tmp_path / "0.tar")
    whole = count_tags([str(tar)], "json:tags", FAST)
    assert whole.samples == SAMPLES and whole.tags["common"] == SAMPLES
    resumed = count_tags([_fails_once(tmp_path, tar)], "json:tags", FAST)
    assert (tmp_path / "failed_once").exists()  # the first read did break
    # every sample once: none lost after the break, none counted twice before it
    assert resumed.samples == resumed.tagged == SAMPLES
    assert resumed.tags == whole.tags and resumed.shard_skips == {}


def test_count_tags_of_a_shard_that_keeps_failing_raises_naming_it(tmp_path):
    tar = _shard(tmp_path / "0.tar")
    with pytest.raises(ShardReadError, match=r"0\.tar.*could not be read whole"):
        count_tags([_always_fails(tar), str(tar)], "json:tags", FAST)


def _to_tensor(img):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(img)


def test_shard_dataset_resumes_a_broken_read_where_it_broke(tmp_path):
    from finetune.cls_data import ShardDataset

    tar = _shard(tmp_path / "0.tar")
    whole = ShardDataset([str(tar)], _to_tensor, FAST, num_classes=4)
    resumed = ShardDataset([_fails_once(tmp_path, tar)], _to_tensor, FAST, num_classes=4)
    assert (tmp_path / "failed_once").exists()
    assert len(whole) == SAMPLES
    assert resumed.items == whole.items  # the same samples, in the same order


def test_shard_dataset_of_a_shard_that_keeps_failing_raises_naming_it(tmp_path):
    from finetune.cls_data import ShardDataset

    tar = _shard(tmp_path / "0.tar")
    with pytest.raises(ShardReadError, match=r"0\.tar.*could not be read whole"):
        ShardDataset([_always_fails(tar)], _to_tensor, FAST, num_classes=4)


@pytest.mark.parametrize("peers,message", [
    # another rank's read failed: this rank must not go on to a sampler of its own length
    ([None, (0, "shard x.tar could not be read whole")], "rank 1 could not read the set"),
    # every read completed, but another rank holds fewer items (a shard missing there)
    ([None, (SAMPLES - 1, None)], f"rank 0: {SAMPLES}, rank 1: {SAMPLES - 1}"),
])
def test_shard_dataset_ranks_that_read_different_items_fail_together(tmp_path, monkeypatch,
                                                                     peers, message):
    import finetune.cls_data as cls_data

    tar = _shard(tmp_path / "0.tar")

    def gather(obj):  # this process as rank 0 of two
        return [obj if p is None else p for p in peers]

    monkeypatch.setattr(cls_data, "all_gather_objects", gather)
    with pytest.raises(ShardReadError, match=message):
        cls_data.ShardDataset([str(tar)], _to_tensor, FAST, num_classes=4)


def test_a_reader_that_does_not_resume_is_not_told_it_will(tmp_path, caplog):
    tar = _shard(tmp_path / "0.tar")
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        list(read_shard(_always_fails(tar), "tags", FAST, SkipCounter()))
    assert "read broke" in caplog.text
    assert "the rest of the shard is not read" in caplog.text and "resumed" not in caplog.text


def test_the_tags_command_ends_in_one_line_and_writes_no_vocabulary(tmp_path, monkeypatch,
                                                                     capsys):
    """`internimage shards tags` over a shard that cannot be read whole: exit 1 with the
    shard's error on stderr, and no vocabulary file (one counted from part of the data)."""
    import data.tags
    from launch.cli import main

    def broken(urls, key, s3):
        raise ShardReadError(f"{urls[0]}: could not be read whole (stopped at sample 3)")

    monkeypatch.setattr(data.tags, "count_tags", broken)
    out = tmp_path / "vocab.txt"
    assert main(["shards", "tags", str(tmp_path / "0.tar"), "--top", "5",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"internimage shards tags: {tmp_path / '0.tar'}: could not be read "
                       "whole (stopped at sample 3)")
    assert not out.exists()
