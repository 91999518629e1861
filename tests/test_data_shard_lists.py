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
