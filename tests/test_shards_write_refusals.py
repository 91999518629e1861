"""`internimage shards write` with bad input: each refused before anything is written, in
one line on stderr naming its flag and path, exit status 2 (as `shards verify|tags` refuse
a shard list they cannot use); a write that fails part-way removes the shards it began
(exit status 1, no manifest).

Why part-way matters: webdataset's ShardWriter closes its open tar on the way out of its
``with`` block whatever ended it (webdataset/writer.py ``ShardWriter.__exit__`` ->
``close`` -> ``finish`` -> ``TarWriter.close``), so the shard being written when a read
failed was left as a well-formed tar holding part of its samples: it looked complete."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from s3_server import jpeg_bytes

import data.shard_writer
from data.shard_writer import write_shards
from launch.cli import main


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    return folder


def _csv(path: Path, text: str = "path,caption\n0.jpg,a\n1.jpg,b\n2.jpg,c\n3.jpg,d\n") -> Path:
    path.write_text(text)
    return path


def _refused(tmp_path, images: Path, captions: Path, out: str | None = None) -> int:
    """The exit status of a `shards write` of these arguments (default: ``out/`` under
    ``tmp_path``)."""
    out = out or str(tmp_path / "out" / "d-%06d.tar")
    code = main(["shards", "write", "--images", str(images), "--captions", str(captions),
                 "--out", out, "--maxcount", "2"])
    return code


def _one_line(capsys) -> str:
    """The message of a refusal: stderr's one line, without its prefix; nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("internimage shards write: "), err
    return err.removeprefix("internimage shards write: ").rstrip("\n")


def _last_line(capsys) -> str:
    """The message of a write that failed once begun: stderr's last line (the progress
    bar's come before it), no traceback; nothing on stdout."""
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("internimage shards write: "), err
    return last.removeprefix("internimage shards write: ")


@pytest.mark.parametrize("case", ["missing_csv", "missing_images", "images_is_file",
                                  "directory_as_captions", "unknown_suffix",
                                  "no_path_column", "semicolons", "binary_csv",
                                  "header_only", "empty_file", "short_row", "bad_jsonl",
                                  "jsonl_not_object", "wrong_images_folder",
                                  "lone_surrogate"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, images, capsys):
    captions = _csv(tmp_path / "captions.csv")
    expect = {}
    if case == "missing_csv":
        captions = tmp_path / "nofile.csv"
        expect = f"--captions {captions}: not found"
    elif case == "missing_images":
        images = tmp_path / "nodir"
        expect = f"--images {images}: not found"
    elif case == "images_is_file":
        images = captions
        expect = f"--images {images}: not a folder"
    elif case == "directory_as_captions":
        captions = tmp_path / "images"
        expect = f"--captions {captions}: not a file"
    elif case == "unknown_suffix":
        captions = _csv(tmp_path / "captions.txt")
        expect = f"--captions {captions}: unknown format '.txt'; use .csv, .jsonl or .parquet"
    elif case == "no_path_column":
        _csv(captions, "file,text\n0.jpg,a\n")
        expect = (f"--captions {captions}: its header line has no 'path' or 'caption' column "
                  "(header: file,text); expected columns path, caption[, tags], comma "
                  "separated")
    elif case == "semicolons":  # another delimiter: one column named "path;caption"
        _csv(captions, "path;caption\n0.jpg;a\n")
        expect = f"--captions {captions}: its header line has no 'path' or 'caption' column"
    elif case == "binary_csv":  # e.g. a spreadsheet saved under .csv
        captions.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xe2\xbf")
        expect = f"--captions {captions}: not UTF-8 text, not a CSV file"
    elif case == "header_only":
        _csv(captions, "path,caption\n")
        expect = f"--captions {captions}: no rows (expected columns path, caption[, tags])"
    elif case == "empty_file":
        _csv(captions, "")
        expect = f"--captions {captions}: no rows (expected columns path, caption[, tags])"
    elif case == "short_row":
        _csv(captions, "path,caption\n0.jpg,a\n1.jpg\n")
        expect = f"--captions {captions}: line 3 has no 'caption' value"
    elif case == "bad_jsonl":
        captions = tmp_path / "captions.jsonl"
        captions.write_text('{"path": "0.jpg", "caption": "a"}\n{"path": "1.jpg",\n')
        expect = f"--captions {captions}: line 2 is not JSON"
    elif case == "jsonl_not_object":
        captions = tmp_path / "captions.jsonl"
        captions.write_text('["0.jpg", "a"]\n')
        expect = f"--captions {captions}: line 1 is not a JSON object"
    elif case == "lone_surrogate":  # failed part-way: "'utf-8' codec can't encode ..."
        captions = tmp_path / "captions.jsonl"
        captions.write_text('{"path": "0.jpg", "caption": "a"}\n'
                            '{"path": "1.jpg", "caption": "b\\udc80"}\n')
        expect = (f"--captions {captions}: line 2: its 'caption' holds '\\udc80', which is "
                  "no Unicode character")
    elif case == "wrong_images_folder":  # a folder, but not the one the paths are under
        images = tmp_path
        expect = (f"--images {images}: none of the 4 image files --captions lists is there "
                  "(first: 0.jpg); the captions' paths are relative to --images")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _refused(tmp_path, images, captions) == 2
    assert _one_line(capsys).startswith(expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/ folder either


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_shard(
        tmp_path, images, capsys):
    captions = _csv(tmp_path / "captions.csv")
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert _refused(tmp_path, images, captions, str(blocker / "d-%06d.tar")) == 2
    assert _one_line(capsys) == f"--out '{blocker}/d-%06d.tar': {blocker} is a file, not a folder"
    out = blocker / "sub" / "d-%06d.tar"  # a parent that is a file
    assert _refused(tmp_path, images, captions, str(out)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"--out '{out}': cannot write into {out.parent} ("), line
    for bad in ("d.tar", "d-%d-%d.tar", "d-%%.tar"):
        assert _refused(tmp_path, images, captions, str(tmp_path / "o" / bad)) == 2
        assert "needs one shard number field, e.g. out/data-%06d.tar" in _one_line(capsys)
    assert _refused(tmp_path, images, captions, str(tmp_path / "o" / "d-%.0s.tar")) == 2
    assert "does not number the shards" in _one_line(capsys)  # each would overwrite the first
    code = main(["shards", "write", "--images", str(images), "--captions", str(captions),
                 "--out", str(tmp_path / "o" / "d-%06d.tar"), "--maxcount", "0"])
    assert code == 2 and _one_line(capsys) == "--maxcount must be >= 1, got 0"
    if os.geteuid() != 0:  # root writes into a read-only mode folder
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert _refused(tmp_path, images, captions, str(locked / "d-%06d.tar")) == 2
        assert "cannot write into" in _one_line(capsys)
        assert not list(locked.iterdir())
    assert not (tmp_path / "o").exists()


def test_a_failure_part_way_removes_the_shards_begun_and_writes_no_manifest(
        tmp_path, images, capsys, monkeypatch):
    """The fourth image cannot be read (a permission, an I/O error) after shard 0 was
    written whole (2 samples) and while shard 1 is open (1 sample of 2): neither is left;
    an earlier write's manifest.json there, which no longer describes the folder, is gone
    too."""
    captions = _csv(tmp_path / "captions.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"shards": ["d-000000.tar"], "samples": 2}\n')
    real = data.shard_writer.image_member

    def failing(file: Path, *limit):
        if file.name == "3.jpg":
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *limit)

    monkeypatch.setattr(data.shard_writer, "image_member", failing)
    code = main(["shards", "write", "--images", str(images), "--captions", str(captions),
                 "--out", str(out / "d-%06d.tar"), "--maxcount", "2"])
    assert code == 1
    assert _last_line(capsys) == (
        f"writing shards stopped at image 3.jpg: PermissionError: [Errno 13] Permission "
        f"denied: '{images / '3.jpg'}'; removed the 2 shard(s) begun, no manifest written")
    assert list(out.iterdir()) == []

    # an interrupt (Ctrl-C) removes them as well, and is not swallowed
    def interrupted(file: Path, *limit):
        if file.name == "3.jpg":
            raise KeyboardInterrupt
        return real(file, *limit)

    monkeypatch.setattr(data.shard_writer, "image_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(images, captions, str(out / "d-%06d.tar"), maxcount=2, progress=False)
    assert list(out.iterdir()) == []


def test_no_sample_written_is_a_failure_not_an_empty_shard(tmp_path, capsys):
    """Every file a non-image: the writer used to leave one empty tar and a manifest of 0
    samples, exit 0 (ShardWriter opens its first shard when it is created)."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_text("not an image")
    captions = _csv(tmp_path / "captions.csv", "path,caption\na.jpg,x\n")
    out = tmp_path / "out"
    code = main(["shards", "write", "--images", str(folder), "--captions", str(captions),
                 "--out", str(out / "d-%06d.tar")])
    assert code == 1
    assert _last_line(capsys).startswith("no sample written: none of the 1 caption rows' "
                                        "files is an image the reader can decode")
    assert not out.exists()  # the folder it made is gone again, not left empty
    with pytest.raises(data.shard_writer.ShardWriteError):
        write_shards(folder, captions, str(out / "d-%06d.tar"), progress=False)


def test_a_good_write_still_writes_whole_shards_and_its_manifest(tmp_path, images, capsys):
    """... from a CSV saved by a spreadsheet ("CSV UTF-8": a byte order mark first, which
    the header's first name must not take)."""
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\n0.jpg,a\n1.jpg,b\n2.jpg,c\n3.jpg,d\n",
                        encoding="utf-8-sig")
    out = tmp_path / "out"
    assert main(["shards", "write", "--images", str(images), "--captions", str(captions),
                 "--out", str(out / "d-%06d.tar"), "--maxcount", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 4 and manifest["shards"] == ["d-000000.tar", "d-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["d-000000.tar", "d-000001.tar",
                                                     "manifest.json"]
    with tarfile.open(out / "d-000001.tar") as tar:
        assert sorted(m.name for m in tar.getmembers()) == [
            "000000003.jpg", "000000003.json", "000000003.txt"]


def test_a_folder_holding_shards_of_the_pattern_is_refused_unless_overwrite(
        tmp_path, images, capsys):
    """A second write into a folder of 4 one-sample shards wrote 2 shards over the first
    two and left d-000002/3 of the old set: `out/d-{000000..000003}.tar` read both sets
    mixed. Refused now (exit 2, one line, nothing touched); ``--overwrite`` removes the old
    set first, and a folder a failed write created is not left behind."""
    captions = _csv(tmp_path / "captions.csv")
    out = tmp_path / "out"
    argv = ["shards", "write", "--images", str(images), "--captions", str(captions),
            "--out", str(out / "d-%06d.tar")]
    assert main([*argv, "--maxcount", "1"]) == 0
    capsys.readouterr()
    old = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(old) == 5  # 4 shards and the manifest

    assert main([*argv, "--maxcount", "2"]) == 2
    assert _one_line(capsys) == (
        f"--out '{out / 'd-%06d.tar'}': {out} already holds 4 shard(s) of this pattern "
        "(first: d-000000.tar); remove them, choose another folder, or give --overwrite "
        "to replace them")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == old
    # files that only look like shards of the pattern are not the writer's: they stay
    (out / "d-notes.tar").write_text("mine")
    (out / "d-000001.tar.bak").write_text("mine")

    assert main([*argv, "--maxcount", "2", "--overwrite"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == ["d-000000.tar", "d-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == [
        "d-000000.tar", "d-000001.tar", "d-000001.tar.bak", "d-notes.tar", "manifest.json"]


def test_a_failed_write_removes_the_folders_it_created(tmp_path, images, capsys,
                                                       monkeypatch):
    captions = _csv(tmp_path / "captions.csv")

    def failing(file: Path, *limit):
        raise OSError(5, "Input/output error", str(file))

    monkeypatch.setattr(data.shard_writer, "image_member", failing)
    out = tmp_path / "new" / "nested" / "d-%06d.tar"
    assert main(["shards", "write", "--images", str(images), "--captions", str(captions),
                 "--out", str(out)]) == 1
    assert "removed the 1 shard(s) begun" in _last_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out", ["s3://bucket/prefix/d-%06d.tar",
                                 "pipe:aws s3 cp - s3://bucket/d-%06d.tar"])
def test_an_out_that_is_a_url_or_a_pipe_is_refused_naming_out(out, tmp_path, images, capsys,
                                                               monkeypatch):
    """webdataset has no s3 writer (webdataset/gopen.py gopen_schemes): `--out s3://...`
    made a local folder "s3:" and failed at the first shard with "no gopen handler defined";
    a pipe: pattern made a folder named after the command and put manifest.json there, and
    the existing-shard and clean-up checks looked at that folder, not at the shards."""
    monkeypatch.chdir(tmp_path)
    captions = _csv(tmp_path / "captions.csv")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _refused(tmp_path, images, captions, out) == 2
    message = _one_line(capsys)
    assert message.startswith(f"--out {out!r}") and "local folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
