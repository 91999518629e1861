"""Which COCO annotations reach a detection training target: those mmdet 2.28.1's
``CocoDataset._parse_ann_info`` (open-mmlab/mmdetection mmdet/datasets/coco.py, the
mmdet of OpenGVLab/InternImage detection/README.md) turns into ``gt_bboxes``: not
``ignore``, a box overlapping the image, ``area`` > 0, ``w`` >= 1 and ``h`` >= 1, not
``iscrowd`` (mmdet's ignore boxes, which the released recipes do not use). Before, every
non-crowd entry was kept (only boxes of no width or height were dropped, after the flip).

And a compressed RLE mask whose runs do not cover its size (pycocotools' decode raises,
or leaves pixels unwritten) is refused by the start check, naming it; before, it passed,
and a loader worker raised "Invalid RLE mask representation" mid-epoch."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.test_det_annotation_check import _corrupt, _set
from tests.test_finetune_det_images import _cfg, _coco


def _ann(i: int, bbox: list, **extra) -> dict:
    x, y, w, h = bbox
    return {"id": i, "image_id": 1, "category_id": 1, "bbox": bbox, "area": w * h,
            "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            **extra}


def test_the_training_target_keeps_what_mmdet_keeps(tmp_path):
    from finetune.det_data import CocoInstances, check_data

    root = _coco(tmp_path / "coco")  # image 1: a.jpg, 48 wide, 40 high
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    anns = [
        _ann(1, [2, 3, 20, 16]),  # kept
        _ann(2, [2, 3, 20, 16], ignore=True),  # mmdet: `if ann.get('ignore', False)`
        _ann(3, [50, 3, 10, 10]),  # right of the 48-wide image: no intersection
        _ann(4, [-12, 3, 10, 10]),  # left of it, ending at x = -2
        _ann(5, [2, 3, 20, 16], area=0),  # `ann['area'] <= 0`
        _ann(6, [2, 3, 0.5, 16]),  # `w < 1`
        _ann(7, [2, 3, 20, 0.9]),  # `h < 1`
        _ann(8, [4, 5, 10, 10], iscrowd=1),  # mmdet's gt_bboxes_ignore: not a target
        _ann(9, [40, 30, 20, 20]),  # kept, clipped: partly outside, overlapping the image
        _ann(10, [5, 6, 1, 1]),  # kept: w and h exactly 1
    ]
    data["annotations"] = anns + [a for a in data["annotations"] if a["image_id"] != 1]
    ann_file.write_text(json.dumps(data))
    check_data(_cfg(root))  # none of them is refused: mmdet skips them without a word
    train = CocoInstances(root / "train2017", ann_file, True, hflip=0.0)
    _, target = train[train.ids.index(1)]
    # mmdet's Resize(bbox_clip_border=True) clips box 9 to the image: x to [0, 48], y to
    # [0, 40] (tests/test_det_box_clip.py)
    expected = [[2, 3, 22, 19], [40, 30, 48, 40], [5, 6, 6, 7]]
    assert target["boxes"].tolist() == expected
    assert target["labels"].tolist() == [1, 1, 1] and target["masks"].shape[0] == 3


def _rle(h: int, w: int) -> str:
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), np.uint8, order="F")
    m[3:19, 2:22] = 1
    return mask_utils.encode(m)["counts"].decode()


@pytest.mark.parametrize(("change", "fault"), [
    (lambda s: s + "1", "cover {} pixels, not the 1920 of its size [40, 48]"),
    (lambda s: s[:-3], "cover {} pixels, not the 1920 of its size [40, 48]"),  # last run
    (lambda s: s[:-1] + "z", "is not a compressed RLE string"),  # outside 48..111
    (lambda s: s + "P", "is not a compressed RLE string"),  # a number left open
])
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corrupt_compressed_rle_is_refused_at_start(split, change, fault, tmp_path):
    from pycocotools import mask as mask_utils

    from finetune import det_data

    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / f"instances_{split}2017.json"
    good = _rle(40, 48)
    # what a loader worker's annToMask would meet: decode fails, or is short of pixels
    counts = change(good)
    _corrupt(ann, "annotations", 0, _set("segmentation", {"size": [40, 48],
                                                         "counts": counts}))
    with pytest.raises(ValueError) as info:
        det_data.check_data(_cfg(root))
    det_data._PARSED.clear()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data.{split}_ann: {ann}: 1 of ")
    if "{}" in fault:  # the pixels named are those pycocotools reads: N fit, N - 1 not
        pixels = int(re.search(r"cover (\d+) pixels", msg).group(1))
        mask_utils.decode({"size": [pixels, 1], "counts": counts})
        with pytest.raises(ValueError, match="Invalid RLE mask representation"):
            mask_utils.decode({"size": [pixels - 1, 1], "counts": counts})
        if pixels > 1920:  # the loader worker's crash it prevents
            with pytest.raises(ValueError, match="Invalid RLE mask representation"):
                mask_utils.decode({"size": [40, 48], "counts": counts})
        fault = fault.format(pixels)
    assert msg.endswith(f"first: annotation id 1 (index 0): segmentation RLE counts "
                        f"{det_data._show(counts)} {fault}"), msg
    # the intact string passes, and reads as pycocotools reads it
    _corrupt(ann, "annotations", 0, _set("segmentation", {"size": [40, 48],
                                                         "counts": good}))
    det_data.check_data(_cfg(root))
    det_data._PARSED.clear()
