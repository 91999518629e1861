"""The local data a fine-tuning run will read, checked before anything is built.

Each task's data module lists what its readers open (:class:`DataPath`: the config key that
sets it, the path and what must be there), from the same settings its datasets are built
from; :func:`check_data_paths` refuses the first one that is missing, in one line naming
the key, the path and what was expected, as a ``ValueError('key: ...')`` that the command
line reports as a config error. Only local paths are looked at: ``s3://``, ``pipe:`` and
other remote shard URLs are read (and their faults handled) by the data pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["DataPath", "check_data_paths", "check_shard_urls"]


@dataclass(frozen=True)
class DataPath:
    """A local path a run reads: ``key`` sets it, ``expected`` says what belongs there.
    ``kind``: ``dir`` or ``file``; ``holds``: a glob at least one entry of the folder must
    match (``*/``: a sub-folder), described by ``holds_desc`` when none does."""

    key: str
    path: Path
    expected: str
    kind: str = "dir"
    holds: str = ""
    holds_desc: str = ""


def _problem(p: DataPath) -> str | None:
    """What is wrong with ``p`` (None: nothing)."""
    if not p.path.exists():
        return "not found"
    if p.kind == "dir" and not p.path.is_dir():
        return "is not a folder"
    if p.kind == "file" and not p.path.is_file():
        return "is not a file"
    if p.holds and not _holds(p.path, p.holds):
        return p.holds_desc or f"holds nothing matching {p.holds}"
    return None


def _holds(folder: Path, pattern: str) -> bool:
    """Whether ``folder`` holds an entry matching ``pattern`` (stops at the first one: an
    ImageNet folder is not listed in full)."""
    if pattern == "*/":  # Path.glob returns files too for a trailing slash before 3.11
        with os.scandir(folder) as entries:
            return any(e.is_dir() for e in entries)
    return next(iter(folder.glob(pattern)), None) is not None


def check_data_paths(paths: Iterable[DataPath]) -> None:
    """Refuse the first of ``paths`` that is missing or not what its reader expects:
    ``ValueError('key: PATH not found (expected ...)')``."""
    for p in paths:
        problem = _problem(p)
        if problem is not None:
            raise ValueError(f"{p.key}: {p.path} {problem} (expected {p.expected})")


def _local_path(url: str) -> Path | None:
    """The file a local shard URL names (a plain path or ``file:``), None for a remote one."""
    from data.storage import is_remote

    if is_remote(url):
        return None
    return Path(urlsplit(url).path if url.startswith("file:") else url)


def check_shard_urls(key: str, urls: list[str]) -> None:
    """Refuse, for the shard list ``key`` (``data.train_urls`` ...), a local ``.txt`` list
    that does not exist, lists itself (through nested lists too) or lists no shard (only
    blank lines or comments), and a local shard pattern none of whose shards exists (a
    wrong folder or name): one ``ValueError('key: ...')``. Lists are walked by the loader's
    own walker (``data.sources.expand_urls``, which refuses the loops and empty lists, as
    :class:`~data.sources.ShardListError`); only local lists are read here. Single missing
    shards of a pattern are the data pipeline's to skip and count, as for any shard;
    remote URLs, lists included, are not looked at (a login node may not reach them)."""
    from data.sources import ShardListError, expand_urls, list_lines, url_items

    def read_list(url: str, _parents: tuple[str, ...]) -> str:
        path = _local_path(url)
        if path is None:  # a remote list in a local one: the pipeline reads it
            return _UNREAD
        check_data_paths([DataPath(key, path, "a shard list file, one shard URL per "
                                   "line", kind="file")])
        text = path.read_text(encoding="utf-8")
        for item in url_items(list_lines(text)):  # its patterns; the walker its lists
            if not item.endswith(".txt"):
                _check_pattern(key, item)
        return text

    for part in url_items(urls):  # the items as data.sources.expand_urls reads them
        if _local_path(part) is None:
            continue
        if not part.endswith(".txt"):
            _check_pattern(key, part)
            continue
        try:
            expand_urls(part, read_list=read_list)
        except ShardListError as err:
            raise ValueError(f"{key}: {err}") from None


_UNREAD = "<a remote shard list, not read here>"
"""What :func:`check_shard_urls` walks for a remote list: one line that names no list (so
the walker neither reads it nor takes it for an empty list), never opened."""


def _check_pattern(key: str, pattern: str) -> None:
    """Refuse a local shard pattern none of whose shards exists; a remote one passes."""
    import braceexpand

    if _local_path(pattern) is None:
        return
    shards = [_local_path(u) for u in braceexpand.braceexpand(pattern)]
    if not any(s.is_file() for s in shards):
        what = f"none of its {len(shards)} shards exists" if len(shards) > 1 else \
            "no such file"
        raise ValueError(f"{key}: {pattern} not found (expected local webdataset .tar "
                         f"shards; {what})")
