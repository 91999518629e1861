"""Segmentation layouts pair every image with its label file when they are listed.

An image without its label file (a partial copy of gtFine, a cut download) is a config
error naming the dataset folder, how many of how many images, the label path expected and
the first few; before, ADE20K trained until a DataLoader worker met the sample, and the
other layouts ended in a FileNotFoundError traceback naming only the first one, after a
stat of every label file. A label that lists but cannot be read is skipped in training
(the next pair read instead, the file named in the log) and ends an evaluation naming
the file; before, a worker traceback said "image file is truncated" without a name.

The naming conventions are the datasets' official layouts as mmsegmentation's dataset
classes read them (open-mmlab/mmsegmentation ``mmseg/datasets``): ``ade.py`` (images
``.jpg``, labels ``.png``, ``images/`` and ``annotations/`` of ADEChallengeData2016),
``cityscapes.py`` (``_leftImg8bit.png`` with ``_gtFine_labelTrainIds.png``, written by
cityscapesScripts' ``createTrainIdLabelImgs`` next to ``_gtFine_labelIds.png``),
``coco_stuff.py`` (``.jpg`` with ``_labelTrainIds.png``, written by
``tools/dataset_converters/coco_stuff164k.py``; the release's stuffthingmaps ``<id>.png``
otherwise) and ``mapillary.py`` (``.jpg`` with ``.png``; ``{split}/v1.2/labels`` in a
v2.0 release).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.datasets.cityscapes import LABEL_ID_LUT, cityscapes_pairs
from finetune.datasets.cocostuff import STUFFTHINGMAPS_LUT, cocostuff_pairs
from finetune.datasets.mapillary import mapillary_pairs


def _touch(root: Path, *names: str) -> None:
    """Empty files: listing and pairing never open them."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


def _cityscapes(root: Path) -> None:
    _touch(root, "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
           "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
           "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
           "gtFine/train/aachen/aachen_000000_000019_gtFine_color.png",
           "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png",
           "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png",  # not converted
           "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png",
           "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png")


def _ade20k(root: Path) -> None:
    _touch(root, *(f"{d}/training/ADE_train_{i:08d}.{ext}" for i in (1, 2, 3)
                   for d, ext in (("images", "jpg"), ("annotations", "png"))))


def _cocostuff(root: Path) -> None:
    _touch(root, "images/train2017/000000000009.jpg",
           "annotations/train2017/000000000009_labelTrainIds.png",
           "annotations/train2017/000000000009.png",
           "images/train2017/000000000025.jpg",
           "annotations/train2017/000000000025.png")  # stuffthingmaps only


def _mapillary(root: Path) -> None:
    _touch(root, "training/images/__CRyFzoDOXn6unQ6a3DnQ.jpg",
           "training/v1.2/labels/__CRyFzoDOXn6unQ6a3DnQ.png",
           "training/images/_1Gn_xkw7sa_i9GU4mkxxQ.jpg",
           "training/v1.2/labels/_1Gn_xkw7sa_i9GU4mkxxQ.png")


LUT = np.zeros(256, np.int64)  # mapillary_pairs hands its table through as it is


def ade20k_pairs(root: Path, split: str) -> list[tuple]:
    from finetune.datasets.ade20k import ade20k_pairs

    return ade20k_pairs(root, split)

# layout -> (builder, lister, the pairs a complete copy lists: (image, label, table))
LAYOUTS = {
    "cityscapes": (_cityscapes, lambda r: cityscapes_pairs(r, "train"), [
        ("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
         "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", None),
        ("leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png",
         "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png", LABEL_ID_LUT),
        ("leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png",
         "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png", None)]),
    "ade20k": (_ade20k, lambda r: ade20k_pairs(r, "training"), [
        (f"images/training/ADE_train_{i:08d}.jpg",
         f"annotations/training/ADE_train_{i:08d}.png", None) for i in (1, 2, 3)]),
    "cocostuff": (_cocostuff, lambda r: cocostuff_pairs(r, "train2017"), [
        ("images/train2017/000000000009.jpg",
         "annotations/train2017/000000000009_labelTrainIds.png", None),
        ("images/train2017/000000000025.jpg", "annotations/train2017/000000000025.png",
         STUFFTHINGMAPS_LUT)]),
    "mapillary": (_mapillary, lambda r: mapillary_pairs(r, "training", LUT), [
        ("training/images/_1Gn_xkw7sa_i9GU4mkxxQ.jpg",  # sorted by name: "1" < "_"
         "training/v1.2/labels/_1Gn_xkw7sa_i9GU4mkxxQ.png", LUT),
        ("training/images/__CRyFzoDOXn6unQ6a3DnQ.jpg",
         "training/v1.2/labels/__CRyFzoDOXn6unQ6a3DnQ.png", LUT)]),
}

# layout -> (the label file removed, the error's image folder, expected label, first image)
MISSING = {
    "cityscapes": ("gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png",
                   "leftImg8bit/train", "gtFine/train/<city>/<name>_gtFine_labelTrainIds.png, "
                   "or _gtFine_labelIds.png", "bochum/bochum_000000_000313_leftImg8bit.png"),
    "ade20k": ("annotations/training/ADE_train_00000002.png", "images/training",
               "annotations/training/<name>.png", "ADE_train_00000002.jpg"),
    "cocostuff": ("annotations/train2017/000000000025.png", "images/train2017",
                  "annotations/train2017/<name>_labelTrainIds.png, or <name>.png",
                  "000000000025.jpg"),
    "mapillary": ("training/v1.2/labels/_1Gn_xkw7sa_i9GU4mkxxQ.png", "training/images",
                  "training/v1.2/labels/<name>.png", "_1Gn_xkw7sa_i9GU4mkxxQ.jpg"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_complete_layout_pairs_each_image_with_its_official_label(layout, tmp_path):
    build, pairs, expected = LAYOUTS[layout]
    build(tmp_path)
    got = [(str(i.relative_to(tmp_path)), str(lab.relative_to(tmp_path)), lut)
           for i, lab, lut in pairs(tmp_path)]
    assert [(i, lab) for i, lab, _ in got] == [(i, lab) for i, lab, _ in expected]
    assert [lut is want for (*_, lut), (*_, want) in zip(got, expected)] == [True] * len(got)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_image_without_its_label_file_is_named_when_listed(layout, tmp_path):
    build, pairs, expected = LAYOUTS[layout]
    build(tmp_path)
    removed, image_dir, pattern, first = MISSING[layout]
    (tmp_path / removed).unlink()
    with pytest.raises(ValueError) as err:  # the type a data check refuses with
        pairs(tmp_path)
    assert str(err.value) == (f"1 of {len(expected)} images in {tmp_path / image_dir} have "
                              f"no label file (expected {pattern}; first: {first})")


def test_many_missing_labels_are_counted_and_the_first_three_named(tmp_path):
    _touch(tmp_path, *(f"images/training/ADE_train_{i:08d}.jpg" for i in range(1, 6)),
           "annotations/training/ADE_train_00000003.png")
    with pytest.raises(ValueError, match=r"^4 of 5 images .* first: "
                       r"ADE_train_00000001\.jpg, ADE_train_00000002\.jpg, "
                       r"ADE_train_00000004\.jpg, \.\.\.\)$"):
        ade20k_pairs(tmp_path, "training")


def test_submit_warns_about_missing_labels_on_the_login_node(tmp_path, capsys):
    """At submit the login node may see another copy than the compute nodes: a warning
    naming the key and the count, as for a folder it does not see."""
    from launch.cli import main

    _ade20k(tmp_path / "ade")
    _touch(tmp_path / "ade", "images/validation/ADE_val_00000001.jpg")
    (tmp_path / "ade" / "annotations" / "validation").mkdir()
    assert main(["submit", "--dry-run", "finetune", "segmentation", "--output-dir",
                 str(tmp_path / "ft"), "data.kind=ade20k", f"data.root={tmp_path / 'ade'}",
                 "data.num_classes=150"]) == 0
    err = capsys.readouterr().err
    assert (f"internimage submit: warning: data.root: 1 of 1 images in "
            f"{tmp_path / 'ade' / 'images' / 'validation'} have no label file (expected "
            "annotations/validation/<name>.png; first: ADE_val_00000001.jpg)") in err


# ---------------------------------------------------------------- unreadable files
def _real_ade20k(root: Path, n: int = 3) -> None:
    """``n`` training and one validation pair of 8x8 images, pair i labelled i + 1."""
    for split, count in (("training", n), ("validation", 1)):
        for i in range(count):
            for d in ("images", "annotations"):
                (root / d / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * i % 256, np.uint8)).save(
                root / "images" / split / f"{i}.jpg")
            Image.fromarray(np.full((8, 8), i + 1, np.uint8)).save(
                root / "annotations" / split / f"{i}.png")


def _truncate(path: Path) -> None:
    """Cut a PNG inside its pixel data (a download cut short): it opens, then fails."""
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"IDAT") + 8])


def _seg_data(root: Path):
    from finetune.segmentation import SegmentationConfig
    from launch.config import load_config

    return load_config(SegmentationConfig, None, [
        "data.kind=ade20k", f"data.root={root}", "data.num_classes=4", "data.scale_short=8",
        "data.crop_size=[32,32]", "data.hflip=0"]).data


def _item(data, i: int):
    random.seed(0)
    torch.manual_seed(0)
    return data[i]


def test_an_unreadable_training_label_is_replaced_by_the_next_pair_and_named(tmp_path,
                                                                               caplog):
    from finetune.seg_data import SegDataset

    _real_ade20k(tmp_path)
    bad = tmp_path / "annotations" / "training" / "1.png"
    _truncate(bad)
    data = SegDataset(_seg_data(tmp_path), train=True)
    with caplog.at_level(logging.WARNING, logger="finetune.data_files"):
        img, label = _item(data, 1)
    want_img, want_label = _item(data, 2)
    assert torch.equal(img, want_img) and torch.equal(label, want_label)
    assert set(label.unique().tolist()) == {2, 255}  # pair 2's label (3, less the zero)
    assert data.skipped == 1
    assert f"cannot read label map {bad}" in caplog.text and "1 skipped" in caplog.text


@pytest.mark.parametrize("pairs, tries", [(20, 16), (3, 3)])
def test_a_damaged_training_set_ends_the_run_after_sixteen_unreadable_pairs(
        tmp_path, caplog, pairs, tries):
    # sixteen in a row, or every pair once when the set holds fewer (never one file twice)
    from finetune.seg_data import SegDataset

    _real_ade20k(tmp_path, pairs)
    for label in (tmp_path / "annotations" / "training").iterdir():
        label.write_bytes(b"not a png")
    data = SegDataset(_seg_data(tmp_path), train=True)
    with pytest.raises(RuntimeError, match=f"{tries} consecutive training pairs from index 0"):
        data[0]
    assert data.skipped == tries
    tried = [int(m.group(1)) for r in caplog.records
             if (m := re.search(r"training pair (\d+) skipped", r.getMessage()))]
    assert tried == list(range(tries))


def test_an_unreadable_evaluation_file_ends_the_evaluation_naming_it(tmp_path):
    from finetune.seg_data import SegDataset

    _real_ade20k(tmp_path)
    data = _seg_data(tmp_path)
    bad = tmp_path / "annotations" / "validation" / "0.png"
    _truncate(bad)
    with pytest.raises(OSError, match=f"^cannot read label map {re.escape(str(bad))} "):
        SegDataset(data, train=False)[0]
    image = tmp_path / "images" / "validation" / "0.jpg"
    image.write_bytes(b"")
    with pytest.raises(OSError, match=f"^cannot read image {re.escape(str(image))} "):
        SegDataset(data, train=False)[0]


def test_listings_keep_the_order_sorted_glob_gave(tmp_path):
    # a dataset's order is part of an exact resume: the string-sorted listing must give
    # the order of sorted(Path.glob(...)) that the datasets used before (pathlib's glob
    # includes hidden names; Python 3.11 orders paths part by part)
    from finetune.data_files import files_named
    from finetune.datasets.cityscapes import cityscapes_pairs

    names = ["x-1", "x_1", "X", "x.1", "x", ".hidden", "x1", "x10", "x2"]
    for city in ("aachen", "aachen-x", "Bonn", "a.b", "zz", ".h"):
        for name in names:
            for root, label in (("leftImg8bit", "_leftImg8bit.png"),
                                ("gtFine", "_gtFine_labelTrainIds.png")):
                folder = tmp_path / root / "train" / city
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{name}{label}").touch()
    (tmp_path / "leftImg8bit" / "train" / "stray_leftImg8bit.png").touch()  # not a city
    images = [image for image, _, _ in cityscapes_pairs(tmp_path, "train")]
    assert images == sorted((tmp_path / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in (*names, "a.JPG"):
        (flat / f"{name}.jpg").touch()
    assert files_named(flat, ".jpg") == sorted(flat.glob("*.jpg"))
