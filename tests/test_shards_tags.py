"""`internimage shards tags`: the tag vocabulary built from the shards' tag metadata, in
the format the training loader reads, with counts and coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3_server import jpeg_bytes, write_tar

from launch.cli import main
from pretrain.data.decode import TagVocab

# The UCI "optical recognition of handwritten digits" set that sklearn's load_digits ships:
# 1,797 scans; samples per class 0..9 as in the UCI description / sklearn docs
# ("Samples per class: ~180"; exact counts 178,182,177,183,181,182,181,179,174,180).
PER_CLASS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
# The demo tags each digit with its name, its parity and "small" (< 5) or "large"
# (data/demo.py's documented weak labels), so by hand:
ODD = sum(PER_CLASS[d] for d in (1, 3, 5, 7, 9))           # 906
SMALL = sum(PER_CLASS[d] for d in range(5))                # 901
EVEN_AND_LARGE = PER_CLASS[6] + PER_CLASS[8]               # 356: neither odd nor small


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["shards", "demo", "--out", str(out)]) == 0
    return out


def _report(capsys) -> tuple[list[str], dict]:
    lines = capsys.readouterr().out.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


@pytest.mark.parametrize("top,vocab,covered", [
    (1, ["odd"], ODD),
    # "small" (901) beats "large" (896) and "even" (891); a sample is left out only if it
    # is even and large (digits 6 and 8)
    (2, ["odd", "small"], 1797 - EVEN_AND_LARGE),
])
def test_top_tags_of_the_demo_shards_and_their_coverage(demo_dir, tmp_path, capsys, top,
                                                        vocab, covered):
    capsys.readouterr()
    out = tmp_path / "vocab.txt"
    shards = sorted(str(p) for p in demo_dir.glob("*.tar"))  # train and val: all 1,797
    assert main(["shards", "tags", *shards, "--top", str(top), "--out", str(out)]) == 0
    printed, report = _report(capsys)
    assert TagVocab.load(out).tags == vocab  # what training will read back
    assert printed[0] == f"{ODD}\todd"
    assert report["samples"] == report["tagged"] == 1797
    assert report["distinct_tags"] == 14  # 10 digit names + even/odd + small/large
    assert report["coverage"] == pytest.approx(covered / 1797, abs=1e-6)


def test_malformed_tags_are_counted_and_untagged_samples_not_covered(tmp_path, capsys):
    shard = write_tar(tmp_path / "s.tar", [
        {"__key__": "a", "jpg": jpeg_bytes(1), "json": json.dumps({"tags": ["cat", "pet"]})},
        {"__key__": "b", "jpg": jpeg_bytes(2), "json": json.dumps({"tags": ["cat"]})},
        {"__key__": "c", "jpg": jpeg_bytes(3), "json": json.dumps({"tags": ["dog"]})},
        {"__key__": "d", "jpg": jpeg_bytes(4), "json": "{not json"},
        {"__key__": "e", "jpg": jpeg_bytes(5), "json": json.dumps({"tags": []})},
        # a '#' line is a comment in a vocabulary file: such a tag cannot be stored
        {"__key__": "f", "jpg": jpeg_bytes(6), "json": json.dumps({"tags": ["#x", "#x"]})},
    ])
    capsys.readouterr()
    out = tmp_path / "v.txt"
    assert main(["shards", "tags", str(shard), "--top", "5", "--out", str(out)]) == 0
    _, report = _report(capsys)
    assert out.read_text() == "cat\ndog\npet\n"  # cat 2; dog and pet 1 each, by name
    # 4 tagged samples (a, b, c, f); f has no storable tag: 3 of 4 covered
    assert (report["samples"], report["tagged"], report["malformed_tags"]) == (6, 4, 1)
    assert report["coverage"] == pytest.approx(0.75)


def test_bad_top_is_refused(tmp_path, capsys):
    assert main(["shards", "tags", str(tmp_path / "x.tar"), "--top", "0",
                 "--out", str(tmp_path / "v.txt")]) == 2
    assert "--top" in capsys.readouterr().err
