"""A source's ``.txt`` shard lists, as the loader reads them (data.sources.expand_urls, the
one walker of lists: the loader, evaluation, fine-tuning's streamed sets, the ``shards``
CLI and the start's check all read lists through it).

Before, only the start's check (data/preflight.py, its own walker) refused a list that
lists itself and a list that lists no shard; the loader's walker recursed until Python's
recursion limit on the first, and silently trained without the part on the second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from s3_server import good_samples, write_tar

from data.sources import ShardListError, expand_urls


def _write(path: Path, *lines: str) -> str:
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def test_lists_expand_in_order_with_joins_comments_braces_and_nesting(tmp_path):
    inner = _write(tmp_path / "inner.txt", "# part 2", "", "/d/b-{0..1}.tar")
    outer = _write(tmp_path / "outer.txt", "/d/a-0.tar::/d/a-1.tar", "# a comment",
                   inner, "  /d/c.tar  ")
    assert expand_urls([f"/d/x-{{0..1}}.tar::{outer}", "/d/y.tar"]) == [
        "/d/x-0.tar", "/d/x-1.tar", "/d/a-0.tar", "/d/a-1.tar", "/d/b-0.tar", "/d/b-1.tar",
        "/d/c.tar", "/d/y.tar"]
    # the same list twice, side by side, is no loop: each is walked on its own
    assert expand_urls(f"{inner}::{inner}") == ["/d/b-0.tar", "/d/b-1.tar"] * 2


def test_a_list_that_lists_itself_is_refused_naming_the_chain(tmp_path):
    # Before: the loader recursed until Python's recursion limit (RecursionError)
    direct = tmp_path / "direct.txt"
    _write(direct, "/d/a.tar", str(direct))
    with pytest.raises(ShardListError) as err:
        expand_urls(str(direct))
    assert str(err.value).startswith(
        f"shard list {direct} (listed in {direct}) lists itself, through {direct} -> "
        f"{direct}."), str(err.value)
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    _write(first, "/d/a.tar", str(second))
    _write(second, "/d/b.tar", str(first))
    with pytest.raises(ValueError, match=(  # a ValueError: a configuration mistake
            rf"^shard list {first} \(listed in {second}\) lists itself, through {first} -> "
            rf"{second} -> {first}\. ")):
        expand_urls(["/d/c.tar", str(first)])


def test_a_list_that_lists_no_shard_is_refused_naming_it_and_where_it_was_listed(tmp_path):
    # Before: an empty or comments-only list gave no shard, and the source trained
    # without that part of its mix, saying nothing
    empty = _write(tmp_path / "empty.txt")
    comments = _write(tmp_path / "comments.txt", "# laion part 2 (to be filled)", "", "#")
    for part in (empty, comments):
        for urls in (part, f"/d/a-{{0..3}}.tar::{part}", [part, "/d/b.tar"]):
            with pytest.raises(ShardListError, match=rf"^shard list {part} lists no shard "
                               r"\(only blank lines or '#' comments\)\. Fill the list"):
                expand_urls(urls)
    outer = _write(tmp_path / "outer.txt", "/d/a.tar", empty)  # nested: named where
    with pytest.raises(ShardListError, match=rf"^shard list {empty} \(listed in {outer}\) "
                       "lists no shard"):
        expand_urls(outer)
    # a list of lists that all list nothing is named at the innermost one
    hollow = _write(tmp_path / "hollow.txt", comments)
    with pytest.raises(ShardListError, match=rf"^shard list {comments} \(listed in "
                       rf"{hollow}\) lists no shard"):
        expand_urls(hollow)


def test_the_read_hook_reads_each_list_with_where_it_was_listed(tmp_path):
    """``read_list(url, parents)``: the start's check reads lists under its own rules."""
    lists = {"s3://b/outer.txt": "s3://b/a.tar\ns3://b/inner.txt\n",
             "s3://b/inner.txt": b"s3://b/c-{0..1}.tar\n"}  # text or bytes
    seen = []

    def read(url: str, parents: tuple[str, ...]):
        seen.append((url, parents))
        return lists[url]

    assert expand_urls("s3://b/outer.txt", read_list=read) == [
        "s3://b/a.tar", "s3://b/c-0.tar", "s3://b/c-1.tar"]
    assert seen == [("s3://b/outer.txt", ()), ("s3://b/inner.txt", ("s3://b/outer.txt",))]


def test_the_loader_refuses_a_mix_with_an_empty_list_part(tmp_path):
    # Before: the loader was built on the good part alone and trained without the other
    from pretrain.data import DataConfig, SourceConfig, build_loader

    shard = write_tar(tmp_path / "shard-0.tar", good_samples("s", 2, size=8))
    empty = _write(tmp_path / "part-2.txt", "# to be filled")
    cfg = DataConfig(sources=[SourceConfig("mix", f"{shard}::{empty}", resampled=False)],
                     image_size=16, batch_size=2, workers=0, shuffle_buffer=0,
                     context_length=12)
    with pytest.raises(ShardListError, match=rf"^shard list {empty} lists no shard"):
        build_loader(cfg, 0, 1, train=False)



def test_a_loop_through_another_spelling_of_the_list_is_caught_when_it_repeats(tmp_path):
    # the source names loop.txt, which lists itself as .../././loop.txt: that spelling
    # lists the same line again, so the walk repeats a list within one step
    loop = tmp_path / "loop.txt"
    other = f"{tmp_path}/././loop.txt"  # (pathlib would drop the dots)
    _write(loop, "/d/a.tar", other)
    with pytest.raises(ShardListError, match=rf"lists itself, through {loop} -> {other} -> "
                       rf"{other}\."):
        expand_urls(str(loop))


def test_an_indented_comment_is_a_comment(tmp_path):
    # Before: list_lines tested '#' on the unstripped line, so "  # to be filled" was taken
    # for a shard URL and a list holding only such lines was not refused
    from data.sources import list_lines

    assert list_lines("  # to be filled\n\t#x\n/d/a.tar\n  /d/b.tar # kept as written\n") == [
        "/d/a.tar", "/d/b.tar # kept as written"]
    hollow = _write(tmp_path / "hollow.txt", "  # laion part 2 (to be filled)", "\t#")
    with pytest.raises(ShardListError, match=rf"^shard list {hollow} lists no shard"):
        expand_urls(hollow)


# fine-tuning's start check (finetune.data_paths.check_shard_urls) walks lists through the
# same walker; a ValueError naming the key is what `internimage finetune`/`submit` print
# as one line (launch.commands.finetune.checked_start)

def test_finetune_start_check_refuses_a_self_listing_or_empty_local_list(tmp_path):
    # Before: its own recursive walk ended in a RecursionError traceback on a loop, and
    # passed an empty list (the streamed set then had no shard)
    from finetune.data_paths import check_shard_urls

    loop = tmp_path / "loop.txt"
    shard = write_tar(tmp_path / "a.tar", good_samples("s", 1, size=8))
    _write(loop, str(shard), str(loop))
    with pytest.raises(ValueError, match=rf"^data\.train_urls: shard list {loop} \(listed in "
                       rf"{loop}\) lists itself, through {loop} -> {loop}\."):
        check_shard_urls("data.train_urls", [str(loop)])
    empty = _write(tmp_path / "empty.txt", "  # to be filled")
    outer = _write(tmp_path / "outer.txt", str(shard), empty)
    with pytest.raises(ValueError, match=rf"^data\.val_urls: shard list {empty} \(listed in "
                       rf"{outer}\) lists no shard"):
        check_shard_urls("data.val_urls", f"{shard}::{outer}")


def test_finetune_start_check_keeps_its_rules_and_reads_no_remote_list(tmp_path, monkeypatch):
    from finetune.data_paths import check_shard_urls

    def no_remote_read(*args, **kwargs):  # a login node may not reach the store
        raise AssertionError(f"a remote read: {args}")

    monkeypatch.setattr("data.storage.RetryingReader", no_remote_read)
    monkeypatch.setattr("data.sources.RetryingReader", no_remote_read)
    shard = write_tar(tmp_path / "a-0.tar", good_samples("s", 1, size=8))
    # a local list of a local pattern with one shard present, a remote list and a remote
    # pattern (not looked at), and a nested local list
    inner = _write(tmp_path / "inner.txt", str(shard))
    outer = _write(tmp_path / "outer.txt", f"{tmp_path}/a-{{0..2}}.tar",
                   "s3://bucket/part-2.txt", "s3://bucket/{000..999}.tar", inner)
    check_shard_urls("data.train_urls", [outer, "s3://bucket/other.txt", "pipe:cat x.tar"])
    missing = tmp_path / "gone.txt"
    with_missing = _write(tmp_path / "with_missing.txt", str(shard), str(missing))
    with pytest.raises(ValueError, match=rf"^data\.train_urls: {missing} not found \(expected "
                       "a shard list file"):
        check_shard_urls("data.train_urls", with_missing)
    typo = _write(tmp_path / "typo.txt", f"{tmp_path}/b-{{0..2}}.tar")
    with pytest.raises(ValueError, match=rf"^data\.train_urls: {tmp_path}/b-\{{0\.\.2\}}\.tar "
                       "not found \\(expected local webdataset .tar shards; none of its 3"):
        check_shard_urls("data.train_urls", typo)


# zero-shot evaluation (pretrain.zeroshot) reads its held-out set through the walker too:
# a fresh start checks it as the source 'zero_shot'; an evaluation that cannot list it is
# skipped by every rank alike, never ending the run (its last step's save follows it)

def _zero_shot(urls):
    from data.config import S3Config
    from pretrain.config import ZeroShotConfig
    from pretrain.data.config import DataConfig, SourceConfig

    zs = ZeroShotConfig(urls=urls, class_names=["zero", "one"])
    data = DataConfig(sources=[SourceConfig("train", "/d/x.tar")], batch_size=2,
                      s3=S3Config(retries=0))
    return zs, data


def test_the_start_check_refuses_a_zero_shot_list_that_lists_no_shard(tmp_path):
    import dataclasses

    from data.config import S3Config
    from data.preflight import check_sources_readable
    from data.shard_schedule import StorageAccessError
    from pretrain.zeroshot import zero_shot_source

    empty = _write(tmp_path / "val.txt", "# held-out set: to be filled")
    zs, _ = _zero_shot([empty])
    assert zero_shot_source(zs) == [("zero_shot", [empty])]
    train = tmp_path / "x.tar"
    train.touch()  # a training source the start's check passes
    with pytest.raises(StorageAccessError, match=rf"^data source 'zero_shot': its shard list "
                       rf"{empty} lists no shard"):
        check_sources_readable([("train", str(train))] + zero_shot_source(zs), S3Config())
    # not configured (no class names: the trainer runs no evaluation): not checked
    assert zero_shot_source(dataclasses.replace(zs, class_names=[])) == []
    assert zero_shot_source(dataclasses.replace(zs, urls=[])) == []
    # a resumed run (a requeue) is not ended by its held-out set: evaluations are skipped
    assert zero_shot_source(zs, resumed=True) == []


def test_a_zero_shot_evaluation_whose_set_cannot_be_listed_is_skipped(tmp_path, caplog):
    # Before: ShardListError (or the read error) escaped evaluate() and ended the run at
    # its last step, before the final checkpoint was saved
    from pretrain.zeroshot import evaluate, read_share

    empty = _write(tmp_path / "val.txt", "  # to be filled")
    loop = tmp_path / "loop.txt"
    _write(loop, str(loop))
    for urls, why in (([empty], "lists no shard"), ([str(loop)], "lists itself"),
                      ([str(tmp_path / "gone.txt")], "FileNotFoundError")):
        zs, data = _zero_shot(urls)
        share = read_share(zs, data, 0, 1)
        assert share.error is not None and share.batches == [] and share.num_samples == 0
        assert share.error.startswith("zero-shot evaluation skipped: the held-out set "
                                      "zero_shot.urls cannot be listed (") and why in share.error
        caplog.clear()
        # no engine is touched: the evaluation ends before any forward
        assert evaluate(None, None, zs, data, 0, 1, torch.device("cpu"), torch.float32) == {
            "zero_shot_error": share.error, "zero_shot_unreadable_shards": 0}
        assert [r.levelname for r in caplog.records if r.getMessage() == share.error] == [
            "ERROR"]


def test_every_rank_skips_when_one_rank_cannot_list_the_set_before_reading_a_shard(
        tmp_path, monkeypatch):
    # The ranks agree through an all-gather before the first round (here its stand-in:
    # every rank's integers), so none runs the evaluation's collectives alone, and none
    # reads a shard of a set the evaluation then skips: the agreement used to travel with
    # the first round's counts, after each rank had read its first shard
    import pretrain.zeroshot as zeroshot

    shards = [str(tmp_path / f"v-{i}.tar") for i in range(2)]
    for url in shards:
        write_tar(Path(url), good_samples("s", 1, size=8))
    listed = _write(tmp_path / "val.txt", *shards)
    gathered, opened = [], []
    read = zeroshot._read_labelled
    monkeypatch.setattr(zeroshot, "_read_labelled",
                        lambda url, *a: opened.append(url) or read(url, *a))

    def gather(mine, world_size, device, others):
        gathered.append(mine)
        return [mine, *others]

    # this rank (0 of 2) lists the set; rank 1 could not: both stop before any read
    monkeypatch.setattr(zeroshot, "_gather_ints",
                        lambda mine, w, d: gather(mine, w, d, [(0, 1)]))
    zs, data = _zero_shot([listed])
    share = zeroshot.read_share(zs, data, 0, 2)
    assert share.error == ("zero-shot evaluation skipped: rank 1 could not list the held-out "
                           "set zero_shot.urls (its log says why)")
    assert gathered == [(2, 0)] and share.batches == [] and opened == []
    # the ranks listed different numbers of shards (a list changed between their reads)
    gathered.clear()
    monkeypatch.setattr(zeroshot, "_gather_ints",
                        lambda mine, w, d: gather(mine, w, d, [(3, 0)]))
    share = zeroshot.read_share(zs, data, 0, 2)
    assert share.error == ("zero-shot evaluation skipped: ranks found different numbers of "
                           "held-out shards in zero_shot.urls (rank 0: 2, rank 1: 3)")
    assert gathered == [(2, 0)] and opened == []
    # this rank could not (its list emptied since): its own reason, the same single gather
    gathered.clear()
    monkeypatch.setattr(zeroshot, "_gather_ints",
                        lambda mine, w, d: gather(mine, w, d, [(2, 0)]))
    _write(tmp_path / "val.txt", "# emptied")
    share = zeroshot.read_share(zs, data, 0, 2)
    assert "cannot be listed (ShardListError: shard list" in share.error
    assert gathered == [(0, 1)] and opened == []
