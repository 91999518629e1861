"""`internimage shards write` stores only samples the reader can read (image_key
``jpg;png;webp``). Before, an image of another format went into the shard under its own
suffix (``000000000.bmp``), which the reader never looks at, and a ``.txt``/``.json`` file
listed as an image overwrote the sample's caption/metadata member: both were counted as
written and only `shards verify` (or training's skip counts) showed them as
``missing_image``. Now other formats PIL decodes are stored as PNG of the same pixels, and a
file that is no decodable image is left out, counted by reason and named."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from launch.cli import main


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def _write(tmp_path: Path, rows: list[tuple[str, str]]) -> tuple[Path, dict]:
    """`internimage shards write` of ``rows`` (path, caption) from tmp_path/imgs; the
    shard and the manifest."""
    captions = tmp_path / "cap.csv"
    captions.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    out = tmp_path / "o"
    assert main(["shards", "write", "--images", str(tmp_path / "imgs"), "--captions",
                 str(captions), "--out", str(out / "d-%06d.tar")]) == 0
    return out / "d-000000.tar", json.loads((out / "manifest.json").read_text())


def _samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes} of a shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _verify(shard: Path, capsys) -> dict:
    """The project's own reader over ``shard``: its JSON tally."""
    capsys.readouterr()
    assert main(["shards", "verify", str(shard)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_other_formats_are_stored_as_png_of_the_same_pixels(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(_pixels(1)).save(imgs / "pic.bmp")
    Image.fromarray(_pixels(2)).save(imgs / "pic.tif")
    Image.fromarray(_pixels(3)).convert("P").save(imgs / "pic.gif")
    Image.fromarray(_pixels(4)).save(imgs / "plain.jpg", quality=90)
    Image.fromarray(_pixels(5)).save(imgs / "photo.jpe", format="JPEG")  # a JPEG suffix
    shard, manifest = _write(tmp_path, [("pic.bmp", "a bmp"), ("pic.tif", "a tif"),
                                        ("pic.gif", "a gif"), ("plain.jpg", "a jpg"),
                                        ("photo.jpe", "a jpe")])
    bmp, gif, jpe, jpg, tif = sorted(_samples(shard).values(), key=lambda s: s["txt"])
    # one image member per sample, under a name the reader's image_key takes
    assert [sorted(s) for s in (bmp, gif, jpe, jpg, tif)] == [
        ["json", "png", "txt"], ["json", "png", "txt"], ["json", "png", "txt"],
        ["jpg", "json", "txt"], ["json", "png", "txt"]]
    # lossless: the PNG holds exactly the source's pixels (the GIF's palette included)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bmp["png"]))), _pixels(1))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(tif["png"]))), _pixels(2))
    with Image.open(imgs / "pic.gif") as src, Image.open(io.BytesIO(gif["png"])) as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(src.convert("RGB")))
    with Image.open(imgs / "photo.jpe") as src, Image.open(io.BytesIO(jpe["png"])) as png:
        assert np.array_equal(np.asarray(png), np.asarray(src))  # full size, as decoded
    assert jpg["jpg"] == (imgs / "plain.jpg").read_bytes()  # the reader's formats: as they are
    assert json.loads(tif["json"]) == {"path": "pic.tif", "tags": []}
    tally = _verify(shard, capsys)
    assert tally["samples"] == 5 and tally["skipped"] == 0, tally
    assert manifest["samples"] == 5 and manifest["transcoded"] == 4
    assert manifest["skipped_unreadable"] == {}


def test_files_that_are_no_image_are_left_out_counted_and_named(tmp_path, capsys, caplog):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(_pixels(1)).save(imgs / "good.png")
    (imgs / "notimg.txt").write_text("just some words\n")
    (imgs / "meta.json").write_text('{"a": 1}\n')
    jpeg = io.BytesIO()
    Image.fromarray(_pixels(2)).save(jpeg, format="JPEG")
    (imgs / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="data.shard_writer"):
        shard, manifest = _write(tmp_path, [("notimg.txt", "a text"), ("good.png", "a png"),
                                            ("meta.json", "a json"), ("cut.jpg", "a cut")])
    assert manifest["samples"] == 1
    assert manifest["skipped_unreadable"] == {"not_an_image": 2, "undecodable_image": 1}
    warning = caplog.text
    assert "skipped 3 caption rows" in warning
    assert all(name in warning for name in ("notimg.txt", "meta.json", "cut.jpg"))
    (sample,) = _samples(shard).values()
    assert sample["txt"] == b"a png" and sample["png"] == (imgs / "good.png").read_bytes()
    assert json.loads(sample["json"]) == {"path": "good.png", "tags": []}
    tally = _verify(shard, capsys)
    assert tally["samples"] == 1 and tally["skipped"] == 0, tally


def test_rows_the_reader_would_skip_are_left_out_and_counted(tmp_path, capsys, caplog):
    """Written and counted in manifest.json before, then skipped by every training read
    (pretrain/data/decode.py): a blank caption (``missing_caption``: the reader strips it)
    and an image over the reader's pixel limit (``data.max_image_pixels``, PIL's
    Image.MAX_IMAGE_PIXELS by default: ``oversized_image``; the writer refused only beyond
    twice that, PIL's DecompressionBombError). Now both are left out, counted by reason, and
    the manifest's samples are what the reader reads."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        Image.fromarray(_pixels(seed)).save(imgs / name)
    # 20x24 = 480 pixels: over a limit of 400, as a 10000x9000 scan is over PIL's
    with caplog.at_level(logging.WARNING, logger="data.shard_writer"):
        captions = tmp_path / "cap.jsonl"
        captions.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in
                                    (("a.png", "a cat"), ("b.png", "   "), ("c.png", ""))))
        out = tmp_path / "o"
        assert main(["shards", "write", "--images", str(imgs), "--captions", str(captions),
                     "--out", str(out / "d-%06d.tar")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 1 and manifest["skipped_unreadable"] == {"empty_caption": 2}
    assert "b.png" in caplog.text and "c.png" in caplog.text
    assert _verify(out / "d-000000.tar", capsys)["samples"] == manifest["samples"]
    captions.write_text("".join(json.dumps({"path": p, "caption": "x"}) + "\n"
                                for p in ("a.png", "b.png")))
    assert main(["shards", "write", "--images", str(imgs), "--captions", str(captions),
                 "--out", str(tmp_path / "small" / "d-%06d.tar"),
                 "--max-image-pixels", "400"]) == 1  # nothing left to write
    assert "2 unreadable or blank" in capsys.readouterr().err
    # the default limit is the reader's: PIL's
    from data.shard_writer import UnreadableImage, image_member

    big = tmp_path / "big.png"
    Image.new("L", (10000, 9000)).save(big)
    try:
        image_member(big)
        raise AssertionError("a 90M-pixel image was accepted")
    except UnreadableImage as err:
        assert err.reason == "oversized_image"
