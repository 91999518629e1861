"""A COCO annotation file with entries the readers cannot use is refused by the start
checks of `internimage finetune detection`, before the model is built, in one line naming
the key, the file, how many entries are bad, the first and what is wrong with it. Before,
a bad training entry gave a raw traceback at the first batch holding it, and a bad
validation entry one at the first evaluation, after a whole epoch and no checkpoint.

The set is tiny (six 48x40 JPEGs, see tests/test_finetune_det_images.py): each test takes
well under a second."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_finetune_bad_input import _refusal
from tests.test_finetune_det_images import _cfg, _coco


def _corrupt(ann_file: Path, section: str, index: int, change) -> None:
    """Entry ``index`` of ``section`` of ``ann_file`` replaced by ``change`` of it."""
    data = json.loads(ann_file.read_text())
    data[section][index] = change(data[section][index])
    ann_file.write_text(json.dumps(data))


def _null(_entry: dict) -> None:
    return None


def _set(key: str, value: object):
    def change(entry: dict) -> dict:
        return {**entry, key: value}
    return change


def _drop(key: str):
    def change(entry: dict) -> dict:
        return {k: v for k, v in entry.items() if k != key}
    return change


# (section, what is done to its entry 1 (id 2, index 1), the message's end)
BAD = {
    "category_not_listed": ("annotations", _set("category_id", 99),
                            "category_id 99 is not one of the file's 1 categories"),
    "no_bbox": ("annotations", _drop("bbox"), "no bbox"),
    "bbox_not_numbers": ("annotations", _set("bbox", "oops"),
                         'bbox "oops" is not [x, y, width, height] numbers'),
    "short_polygon": ("annotations", _set("segmentation", [[1, 2, 3]]),
                      "segmentation polygon 0 [1, 2, 3] is not x, y pairs (pycocotools "
                      "reads a first polygon of 4 numbers or more)"),
    "no_segmentation": ("annotations", _drop("segmentation"), "no segmentation"),
    "null_annotation": ("annotations", _null, None),
    "image_without_width": ("images", _drop("width"), "no width"),
}


def _expected(section: str, fault: str | None, total: int) -> str:
    """The message's part after the file for a fault in entry index 1 (id 2)."""
    if section == "images":
        return f"1 of {total} images unusable, first: image id 2 (index 1): {fault}"
    first = "annotation index 1: not an object (null)" if fault is None else \
        f"annotation id 2 (index 1): {fault}"
    return f"1 of {total} annotations unusable, first: {first}"


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_entry_is_refused_by_the_start_check_naming_key_file_and_entry(
        kind, split, tmp_path):
    from finetune import det_data

    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / f"instances_{split}2017.json"
    section, change, fault = BAD[kind]
    _corrupt(ann, section, 1, change)
    total = 4 if split == "train" else 2
    with pytest.raises(ValueError) as info:
        det_data.check_data(_cfg(root))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == f"data.{split}_ann: {ann}: {_expected(section, fault, total)}"
    assert not det_data._PARSED  # a refused start keeps no parse
    if split == "val":  # --eval-only checks the validation file alone, and finds it
        with pytest.raises(ValueError, match=rf"^data\.val_ann: {re.escape(str(ann))}: "):
            det_data.check_data(_cfg(root), val_only=True)
    else:
        det_data.check_data(_cfg(root), val_only=True)
        det_data._PARSED.clear()


def test_a_valid_file_passes_and_lenient_entries_are_left_alone(tmp_path):
    """What the readers skip is not refused: a box of no area (dropped when read, as
    mmdet skips it), a training crowd entry without box or mask (skipped), an annotation
    of an image the file does not list (never asked for), an RLE mask of its image's
    size; and the submit check (thorough=False) parses nothing."""
    from finetune import det_data

    root = _coco(tmp_path / "coco")
    det_data.check_data(_cfg(root))
    det_data._PARSED.clear()
    train = root / "annotations" / "instances_train2017.json"
    val = root / "annotations" / "instances_val2017.json"
    _corrupt(train, "annotations", 0, _set("bbox", [2, 3, 0, 0]))
    _corrupt(train, "annotations", 1, lambda a: {"id": 2, "image_id": 2, "category_id": 1,
                                                 "iscrowd": 1})
    _corrupt(train, "annotations", 2, _set("image_id", 999))
    # polygons pycocotools reads though they are not COCO's form (an odd count, a short
    # second polygon): as len // 2 points, no error (refusing them could refuse real data)
    _corrupt(train, "annotations", 3, _set("segmentation", [[4, 4, 20, 4, 20, 20, 9],
                                                            [1, 1]]))
    _corrupt(val, "annotations", 0, _set("segmentation", {"size": [40, 48],
                                                         "counts": [0, 1920]}))
    cfg = _cfg(root)
    det_data.check_data(cfg)
    for dataset in det_data.build_datasets(cfg):  # and the readers do read them
        assert all(dataset[i][1]["boxes"].shape[1] == 4 for i in range(len(dataset)))
    _corrupt(val, "annotations", 1, _drop("bbox"))  # refused, but not by a submit check
    det_data.check_data(_cfg(root), thorough=False)
    assert not det_data._PARSED


@pytest.mark.parametrize(("split", "section", "change", "fault"), [
    ("val", "annotations", _drop("area"), "no area"),  # COCOeval compares it
    ("val", "annotations", _set("segmentation", {"size": [48, 40], "counts": "abc"}),
     "segmentation RLE size [48, 40] is not its image's [height, width] [40, 48]"),
    ("train", "annotations", _set("segmentation", {"size": [40, 48], "counts": [1921]}),
     "segmentation RLE counts cover 1921 pixels, more than its size [40, 48]"),
    ("train", "images", _set("height", 0), "height 0 is not a positive integer"),
])
def test_what_else_the_readers_cannot_use_is_refused(split, section, change, fault,
                                                     tmp_path):
    from finetune import det_data

    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / f"instances_{split}2017.json"
    _corrupt(ann, section, 0, change)
    with pytest.raises(ValueError) as info:
        det_data.check_data(_cfg(root))
    first = "image id 1 (index 0)" if section == "images" else "annotation id 1 (index 0)"
    assert str(info.value).endswith(f"{section} unusable, first: {first}: {fault}")


def test_a_start_is_refused_in_one_line_leaving_no_run_directory(tmp_path, capsys):
    """Through the CLI: exit 2, one stderr line, nothing written (before: a whole epoch
    trained, then ``KeyError: 99`` at the first evaluation)."""
    out, root = tmp_path / "run", _coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_val2017.json"
    _corrupt(ann, "annotations", 1, _set("category_id", 99))
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    assert err == (f"internimage finetune: config error: data.val_ann: {ann}: 1 of 2 "
                   "annotations unusable, first: annotation id 2 (index 1): category_id 99 "
                   "is not one of the file's 1 categories")


DINO = ("head.kind=dino",)


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_are_checked_only_for_a_head_that_reads_them(split, tmp_path):
    """DINO's training items decode no mask and its evaluation is bbox COCOeval alone,
    which reads none: a file without (or with unreadable) ``segmentation`` starts, and is
    read and scored as it is; Mask R-CNN's reads them (annToMask, segm COCOeval) and is
    refused with the same message as before."""
    from finetune import det_data
    from finetune.metrics import coco_evaluate

    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / f"instances_{split}2017.json"
    total = len(json.loads(ann.read_text())["annotations"])
    for i in range(total):
        _corrupt(ann, "annotations", i, _drop("segmentation"))
    _corrupt(ann, "annotations", total - 1, _set("segmentation", [[1, 2, 3]]))
    det_data.check_data(_cfg(root, *DINO))
    det_data.check_data(_cfg(root, *DINO), val_only=True)
    train, val = det_data.build_datasets(_cfg(root, *DINO))
    items = [train[i][1] for i in range(len(train))]
    assert items and all("masks" not in target for target in items)
    gt = val.coco.dataset["annotations"]
    results = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "bbox": a["bbox"], "score": 0.9} for a in gt]
    assert coco_evaluate(val.coco, results, iou_types=("bbox",))["bbox_AP"] > 0.99
    det_data._PARSED.clear()

    with pytest.raises(ValueError) as info:
        det_data.check_data(_cfg(root))  # Mask R-CNN, the default head
    assert str(info.value) == (f"data.{split}_ann: {ann}: {total} of {total} annotations "
                               "unusable, first: annotation id 1 (index 0): no segmentation")
    assert not det_data._PARSED


@pytest.mark.parametrize("change", ["extra_in_train", "renamed_in_val"])
def test_train_and_val_files_with_other_categories_are_refused(change, tmp_path):
    """The classes are the training file's categories (label i = its i-th id); the
    evaluation maps predicted labels back to ids with the validation file's list. A
    training file with a category the validation file lacks scored that class as the
    next one, or crashed (IndexError) at the first evaluation, after an epoch. mmdet's
    CocoDataset takes one class list for both splits (get_cat_ids(cat_names=CLASSES))."""
    from finetune import det_data

    root = _coco(tmp_path / "coco")
    train = root / "annotations" / "instances_train2017.json"
    val = root / "annotations" / "instances_val2017.json"
    target, edit = (train, lambda d: d["categories"].append({"id": 7, "name": "dog"})) \
        if change == "extra_in_train" else \
        (val, lambda d: d["categories"][0].update(name="something else"))
    data = json.loads(target.read_text())
    edit(data)
    target.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        det_data.check_data(_cfg(root))
    msg = str(info.value)
    assert msg.startswith(f"data.val_ann: {val} lists other categories than data.train_ann")
    assert ("id 7 (\"dog\") is only in " + str(train)) in msg if change == "extra_in_train" \
        else "but \"something else\" in it" in msg
    assert not det_data._PARSED
    # the datasets themselves refuse it too (a start whose checks were skipped)
    with pytest.raises(ValueError, match="lists other categories"):
        det_data.build_datasets(_cfg(root))
