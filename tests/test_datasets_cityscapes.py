"""Cityscapes and Mapillary Vistas on hand-made label maps: layouts and id mappings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.datasets import (
    CITYSCAPES_CLASSES,
    VISTAS_V12_CLASSES,
    CityscapesSegmentation,
    MapillaryVistasSegmentation,
)


def _png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode if array.ndim == 2 else "RGB").save(path)


def _image(path: Path, h: int = 2, w: int = 4) -> None:
    _png(path, np.arange(h * w * 3).reshape(h, w, 3))


# Official Cityscapes label ids (cityscapesScripts labels.py) and their train ids.
LABEL_IDS = np.array([[0, 7, 8, 11, 12, 13, 17, 19], [20, 21, 22, 23, 24, 25, 26, 27],
                      [28, 31, 32, 33, 9, 14, 29, 30]])
TRAIN_IDS = np.array([[255, 0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14],
                      [15, 16, 17, 18, 255, 255, 255, 255]])


def test_cityscapes_reads_train_ids_and_maps_label_ids(tmp_path: Path):
    left, gt = tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val"
    # aachen: labelTrainIds present (used as is); bonn: only labelIds (mapped).
    _image(left / "aachen" / "aachen_000000_000019_leftImg8bit.png", 3, 8)
    _png(gt / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", TRAIN_IDS)
    _png(gt / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.zeros((3, 8)))
    _image(left / "bonn" / "bonn_000001_000019_leftImg8bit.png", 3, 8)
    _png(gt / "bonn" / "bonn_000001_000019_gtFine_labelIds.png", LABEL_IDS)
    data = CityscapesSegmentation(tmp_path, "val")
    assert len(data) == 2 and data.num_classes == 19 == len(CITYSCAPES_CLASSES)
    for i in range(2):
        image, label = data[i]
        assert image.shape == (3, 3, 8) and str(image.dtype) == "torch.uint8"
        np.testing.assert_array_equal(label.numpy(), TRAIN_IDS)


def test_cityscapes_missing_label_and_bad_split_fail_clearly(tmp_path: Path):
    _image(tmp_path / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    # a config error (ValueError) naming the count, the label expected and the image
    with pytest.raises(ValueError, match=r"1 of 1 images .* have no label file \(expected "
                       r"gtFine/train/<city>/<name>_gtFine_labelTrainIds\.png, or "
                       r"_gtFine_labelIds\.png; first: ulm/ulm_000000_000019_leftImg8bit\.png\)"):
        CityscapesSegmentation(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        CityscapesSegmentation(tmp_path, "training")


def _vistas_index(name: str) -> int:
    return VISTAS_V12_CLASSES.index(name)


# Vistas v1.2 class -> expected Cityscapes class (None: ignored).
VISTAS_CASES = {
    "construction--flat--road": "road", "marking--general": "road", "object--manhole": "road",
    "construction--barrier--curb": "sidewalk", "construction--flat--sidewalk": "sidewalk",
    "object--support--utility-pole": "pole", "object--traffic-light": "traffic light",
    "object--traffic-sign--front": "traffic sign", "nature--sky": "sky",
    "human--rider--motorcyclist": "rider", "object--vehicle--on-rails": "train",
    "object--vehicle--bicycle": "bicycle",
    # classes a broader mapping would keep; the released recipe ignores them
    "construction--flat--bike-lane": None, "construction--structure--tunnel": None,
    "construction--barrier--guard-rail": None, "object--support--traffic-sign-frame": None,
    "nature--snow": None, "marking--crosswalk-zebra": None,
    "animal--bird": None, "nature--water": None, "object--traffic-sign--back": None,
    "object--vehicle--caravan": None, "void--unlabeled": None,
}

# The released recipe's table as v1.2 indices (Cityscapes train id -> Vistas indices), as
# InternImage's MapillaryHack states it: ties our name order and name table to it.
RELEASED_VISTAS_INDICES = [[13, 24, 41], [2, 15], [17], [6], [3], [45, 47], [48], [50], [30],
                           [29], [27], [19], [20, 21, 22], [55], [61], [54], [58], [57], [52]]


def _write_vistas(root: Path, labels: np.ndarray, nested: bool = False) -> None:
    _image(root / "validation" / "images" / "a1.jpg", *labels.shape)
    label_dir = root / "validation" / ("v1.2/labels" if nested else "labels")
    # Released labels are palette PNGs; the pixel value is the class index.
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    label_dir.mkdir(parents=True, exist_ok=True)
    img.save(label_dir / "a1.png")


def test_mapillary_maps_vistas_classes_onto_cityscapes(tmp_path: Path):
    labels = np.array([[_vistas_index(n) for n in VISTAS_CASES]])
    _write_vistas(tmp_path, labels)
    data = MapillaryVistasSegmentation(tmp_path, "validation")
    assert data.num_classes == 19
    got = data[0][1].numpy()[0].tolist()
    want = [255 if c is None else CITYSCAPES_CLASSES.index(c) for c in VISTAS_CASES.values()]
    assert got == want
    # All 66 classes: exactly the released table, everything else ignored.
    all_labels = np.arange(66)[None]
    _write_vistas(tmp_path, all_labels, nested=False)
    mapped = MapillaryVistasSegmentation(tmp_path, "validation")[0][1].numpy()[0]
    want = np.full(66, 255)
    for train_id, indices in enumerate(RELEASED_VISTAS_INDICES):
        want[indices] = train_id
    assert mapped.tolist() == want.tolist()


def test_mapillary_native_classes_and_config_order(tmp_path: Path):
    _write_vistas(tmp_path, np.array([[0, 13, 64, 65]]), nested=True)
    native = MapillaryVistasSegmentation(tmp_path, "validation", to_cityscapes=False)
    assert native.num_classes == 65
    assert native[0][1].numpy().tolist() == [[0, 13, 64, 255]]
    # A release's config.json order wins over the built-in v1.2 order.
    reordered = ["construction--flat--road", "nature--sky"] + [
        n for n in VISTAS_V12_CLASSES if n not in ("construction--flat--road", "nature--sky")]
    (tmp_path / "config.json").write_text(json.dumps({"labels": [{"name": n} for n in reordered]}))
    _write_vistas(tmp_path, np.array([[0, 1]]), nested=True)
    mapped = MapillaryVistasSegmentation(tmp_path, "validation")[0][1].numpy()
    assert mapped.tolist() == [[CITYSCAPES_CLASSES.index("road"), CITYSCAPES_CLASSES.index("sky")]]
