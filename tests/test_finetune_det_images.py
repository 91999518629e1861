"""COCO detection data whose images are missing or damaged: an image the annotation file
names but the image folder lacks (a partial copy, a cut download) is refused by the start
checks of `internimage finetune detection`, before anything is built, in one line naming
the key, how many of how many, the folder and the first ones (before: a FileNotFoundError
from a DataLoader worker once training reached it); an image that exists but cannot be
decoded is named, skipped in training and fatal in evaluation.

The set is tiny (six 48x40 JPEGs): each test takes well under a second."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_finetune_bad_input import _refusal

TRAIN = ["a.jpg", "b.jpg", "c.jpg", "sub/d.jpg"]  # a file_name may hold a sub-folder
VAL = ["v1.jpg", "sub/v2.jpg"]


def _split(root: Path, folder: str, ann: str, names: list[str]) -> None:
    """``names`` as JPEGs under ``root/folder`` and their instance annotations (one box
    each) in ``root/annotations/ann``."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, name in enumerate(names, 1):
        w, h = (48, 40) if i % 2 else (40, 48)  # both aspect groups
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 3, 20, 16],
                     "area": 320, "iscrowd": 0,
                     "segmentation": [[2, 3, 22, 3, 22, 19, 2, 19]]})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / ann).write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))


def _coco(root: Path) -> Path:
    """A COCO layout (train2017/, val2017/, annotations/) with every image in place."""
    _split(root, "train2017", "instances_train2017.json", TRAIN)
    _split(root, "val2017", "instances_val2017.json", VAL)
    return root


def _cfg(root: Path, *overrides: str):
    from finetune.det_config import DetectionConfig
    from launch.config import load_config

    return load_config(DetectionConfig, None, ["data.kind=coco", f"data.root={root}",
                                               *overrides])


def test_images_the_annotation_file_names_but_the_folder_lacks_are_refused(tmp_path,
                                                                           capsys):
    out, root = tmp_path / "run", _coco(tmp_path / "coco")
    train_ann = root / "annotations" / "instances_train2017.json"
    (root / "train2017" / "b.jpg").unlink()
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    assert err == (f"internimage finetune: config error: data.train_images: 1 of 4 images "
                   f"that {train_ann} names are not in {root / 'train2017'} (first: b.jpg)")
    # more than three: the count says how many, the first three are named
    for name in ("a.jpg", "c.jpg", "sub/d.jpg"):
        (root / "train2017" / name).unlink()
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    assert err.endswith(f"data.train_images: 4 of 4 images that {train_ann} names are not in "
                        f"{root / 'train2017'} (first: a.jpg, b.jpg, c.jpg, ...)")
    # the validation images, a whole sub-folder gone: its own key
    root = _coco(tmp_path / "coco2")
    (root / "val2017" / "sub" / "v2.jpg").unlink()
    (root / "val2017" / "sub").rmdir()
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    assert err.endswith(f"config error: data.val_images: 1 of 2 images that "
                        f"{root / 'annotations' / 'instances_val2017.json'} names are not in "
                        f"{root / 'val2017'} (first: sub/v2.jpg)")


def test_an_annotation_file_that_is_not_json_names_its_key(tmp_path):
    from finetune.det_data import check_data

    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:50])  # a cut download
    with pytest.raises(ValueError, match=rf"^data\.val_ann: {re.escape(str(ann))} is not "
                                         r"valid JSON \("):
        check_data(_cfg(root))


def test_a_complete_set_passes_lists_the_same_images_and_is_parsed_once(tmp_path,
                                                                        monkeypatch):
    """The start check's parse of each annotation file is the one the datasets use: the
    start costs one parse per file, as before the check."""
    from pycocotools.coco import COCO

    from finetune import det_data
    from finetune.detection import check_start

    root = _coco(tmp_path / "coco")
    parsed = []
    read_json = det_data._read_json
    monkeypatch.setattr(det_data, "_read_json", lambda p: parsed.append(p) or read_json(p))
    cfg = _cfg(root)
    check_start(cfg)
    train, val = det_data.build_datasets(cfg)
    assert sorted(p.name for p in parsed) == ["instances_train2017.json",
                                              "instances_val2017.json"]
    assert not det_data._PARSED  # taken by the datasets, nothing left behind
    for ds, split in ((train, "train2017"), (val, "val2017")):
        ref = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert ds.ids == sorted(ref.imgs) and ds.coco.imgs == ref.imgs
        assert ds.coco.anns == ref.anns and ds.coco.imgToAnns == ref.imgToAnns
    assert [val[i][1]["image_id"] for i in range(len(val))] == [1, 2]


def test_an_image_that_cannot_be_decoded_is_named_skipped_in_training_fatal_in_eval(
        tmp_path, caplog):
    """Training: the next readable item replaces it, before any random draw of the item
    (a resume replays the same items and draws); evaluation ends, naming the file."""
    from finetune.data_files import UnreadableFile
    from finetune.det_data import build_datasets

    root = _coco(tmp_path / "coco")
    bad = root / "train2017" / "b.jpg"
    bad.write_bytes(b"not a jpeg")
    train, val = build_datasets(_cfg(root))
    with caplog.at_level(logging.WARNING, logger="finetune.data_files"):
        torch.manual_seed(0)
        img, target = train[1]  # b.jpg: c.jpg (item 2) instead
    assert target["image_id"] == 3 and train.skipped == 1
    assert str(bad) in caplog.text and "the next one read instead" in caplog.text
    torch.manual_seed(0)
    img2, target2 = train[2]  # the same draws as item 2 read directly
    assert torch.equal(img, img2) and torch.equal(target["boxes"], target2["boxes"])

    truncated = root / "val2017" / "sub" / "v2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UnreadableFile, match=re.escape(f"cannot read image {truncated}")):
        val[1]


def test_submit_checks_the_paths_but_leaves_the_annotation_parse_to_the_job(tmp_path,
                                                                          monkeypatch,
                                                                          capsys):
    """On a login node `internimage submit` must not parse COCO annotation files (~3 GB of
    memory for train2017's ~450 MB of JSON, far more for Objects365): it checks the paths
    (a missing folder is a warning there), the job's own start checks the images."""
    from finetune import det_data, detection
    from launch.commands.finetune import checked_start

    root = _coco(tmp_path / "coco")
    (root / "train2017" / "b.jpg").unlink()
    parsed = []
    monkeypatch.setattr(det_data, "_read_json", lambda p: parsed.append(p) or {})
    checked_start(detection, _cfg(root), None, missing_data="warn")
    assert parsed == [] and capsys.readouterr().err == ""
    (root / "val2017" / "sub" / "v2.jpg").unlink()
    (root / "val2017" / "sub").rmdir()
    (root / "val2017" / "v1.jpg").unlink()
    (root / "val2017").rmdir()  # a path check: still a warning at submit
    checked_start(detection, _cfg(root), None, missing_data="warn")
    assert "warning: data.val_images" in capsys.readouterr().err and parsed == []
