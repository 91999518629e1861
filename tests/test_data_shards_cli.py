"""`internimage shards demo|write|verify` and the demo-data cache."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import pytest
from s3_server import jpeg_bytes, write_tar

from launch.cli import main
from pretrain.data import ensure_demo_shards


def _keys(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_demo_writes_manifest_with_disjoint_val_split(tmp_path, capsys):
    assert main(["shards", "demo", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["samples"] + val["samples"] == 1797
    assert 0.13 < val["samples"] / 1797 < 0.17
    assert len(val["shards"]) == 1
    train_keys = set().union(*(_keys(tmp_path / s) for s in train["shards"]))
    val_keys = _keys(tmp_path / val["shards"][0])
    assert len(train_keys) == train["samples"] and len(val_keys) == val["samples"]
    assert not train_keys & val_keys
    vocab = (tmp_path / manifest["tag_vocab"]).read_text().split()
    assert vocab == manifest["tags"] and "seven" in vocab and "odd" in vocab
    assert manifest["classes"][7] == "seven" and manifest["caption_templates"]
    capsys.readouterr()
    assert main(["shards", "verify", str(tmp_path / val["shards"][0])]) == 0
    report = _last_json(capsys.readouterr().out)
    assert report == {"samples": val["samples"], "skipped": 0, "reasons": {}, "shards": 1}


def test_demo_again_into_its_folder_replaces_the_earlier_shards(tmp_path, capsys):
    """`shards demo --out DIR` twice with another --maxcount: the first run's 24 train
    shards stayed beside the second's 3, and the manifest (a glob) listed all of them: a
    brace pattern over them read 2862 samples, every key twice."""
    assert main(["shards", "demo", "--out", str(tmp_path), "--maxcount", "64"]) == 0
    assert main(["shards", "demo", "--out", str(tmp_path), "--maxcount", "512"]) == 0
    train = json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]
    on_disk = sorted(p.name for p in tmp_path.glob("train-*.tar"))
    assert train["shards"] == on_disk and len(on_disk) == -(-train["samples"] // 512)
    keys = [k for s in on_disk for k in _keys(tmp_path / s)]
    assert len(keys) == len(set(keys)) == train["samples"]


@pytest.mark.parametrize("out", ["my.yaml", "my.yaml/sub"])
def test_demo_into_a_file_is_refused_in_one_line(out, tmp_path, capsys):
    """`shards demo --out FILE` (or a folder under a file): a FileExistsError traceback
    before; now one line naming the file, exit 2, the file untouched."""
    (tmp_path / "my.yaml").write_text("keep: me\n")
    assert main(["shards", "demo", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"internimage shards demo: --out {tmp_path / out}: {tmp_path / 'my.yaml'} "
                   "is a file, not a directory: give a directory for the shards\n")
    assert (tmp_path / "my.yaml").read_text() == "keep: me\n"


def test_ensure_demo_shards_is_safe_under_concurrent_calls(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_shards(tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1] and results[0].is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].parent.name]
    assert ensure_demo_shards(tmp_path) == results[0]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes(1))
    (images / "sub" / "b.jpeg").write_bytes(jpeg_bytes(2))
    (images / "c.jpg").write_bytes(jpeg_bytes(3))
    return images


def _captions_csv(path: Path) -> Path:
    path.write_text('path,caption,tags\na.jpg,a cat,"cat,animal"\nsub/b.jpeg,a dog,dog\n'
                    "gone.jpg,lost,\nc.jpg,a car,\n")
    return path


def test_write_lists_missing_files(tmp_path, image_folder, capsys):
    captions = _captions_csv(tmp_path / "captions.csv")
    code = main(["shards", "write", "--images", str(image_folder), "--captions",
                 str(captions), "--out", str(tmp_path / "out" / "d-%06d.tar")])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 image file(s)" in err and "gone.jpg" in err and "--skip-missing" in err
    assert not list((tmp_path / "out").glob("*.tar"))


def test_write_skip_missing_then_verify(tmp_path, image_folder, capsys):
    captions = _captions_csv(tmp_path / "captions.csv")
    out = tmp_path / "out"
    code = main(["shards", "write", "--images", str(image_folder), "--captions",
                 str(captions), "--out", str(out / "d-%06d.tar"), "--maxcount", "2",
                 "--skip-missing"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 3 and manifest["skipped_missing"] == 1
    assert manifest["shards"] == ["d-000000.tar", "d-000001.tar"]
    capsys.readouterr()
    assert main(["shards", "verify", str(out / "d-{000000..000001}.tar")]) == 0
    assert _last_json(capsys.readouterr().out)["samples"] == 3
    with tarfile.open(out / "d-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta == {"path": "a.jpg", "tags": ["cat", "animal"]}


def test_write_from_jsonl(tmp_path, image_folder):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"path": "a.jpg", "caption": "x", "tags": ["t"]}\n'
                        '{"path": "c.jpg", "caption": "y"}\n')
    out = tmp_path / "out"
    assert main(["shards", "write", "--images", str(image_folder), "--captions",
                 str(captions), "--out", str(out / "d-%06d.tar")]) == 0
    assert json.loads((out / "manifest.json").read_text())["samples"] == 2


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, image_folder, capsys):
    try:
        import pyarrow  # noqa: F401

        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    code = main(["shards", "write", "--images", str(image_folder), "--captions",
                 str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o" / "d-%06d.tar")])
    assert code == 2 and "pyarrow" in capsys.readouterr().err


def test_verify_counts_bad_samples_and_fails_only_when_nothing_read(tmp_path, capsys):
    shard = write_tar(tmp_path / "s.tar", [
        {"__key__": "good", "jpg": jpeg_bytes(1), "txt": "fine"},
        {"__key__": "bad", "jpg": b"not a jpeg", "txt": "broken"},
    ])
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
    assert main(["shards", "verify", str(shard), str(tmp_path / "junk.tar")]) == 0
    report = _last_json(capsys.readouterr().out)
    assert report == {"samples": 1, "skipped": 2, "shards": 2,
                      "reasons": {"undecodable_image": 1, "unreadable_shard": 1}}
    assert main(["shards", "verify", str(tmp_path / "junk.tar")]) == 1
    assert _last_json(capsys.readouterr().out)["samples"] == 0


@pytest.mark.parametrize("action", [["verify"], ["tags", "--top", "3", "--out", "vocab.txt"]])
def test_verify_and_tags_name_an_unusable_shard_list_in_one_line(tmp_path, capsys, action):
    # Before: a ShardListError traceback (verify of an empty list printed its tally, exit 1)
    empty = tmp_path / "empty.txt"
    empty.write_text("  # to be filled\n")
    loop = tmp_path / "loop.txt"
    loop.write_text(f"{loop}\n")
    action = [a if a != "vocab.txt" else str(tmp_path / a) for a in action]
    for lst, why in ((empty, "lists no shard"), (loop, "lists itself")):
        assert main(["shards", action[0], str(lst), *action[1:]]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"internimage shards {action[0]}: shard list {lst} ")
        assert why in err and err.count("\n") == 1 and out == ""
    # a list that is not there (before: a FileNotFoundError traceback)
    assert main(["shards", action[0], str(tmp_path / "gone.txt"), *action[1:]]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"internimage shards {action[0]}: a shard list could not be read "
                          "(FileNotFoundError")
    assert "gone.txt" in err and err.count("\n") == 1 and out == ""
    assert not (tmp_path / "vocab.txt").exists()
