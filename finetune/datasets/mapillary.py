"""Mapillary Vistas v1.2 semantic segmentation, natively (66 classes) or as Cityscapes' 19.

Layout: ``{split}/images/*.jpg`` with ``{split}/labels/*.png`` (v2.0 releases keep the
v1.2 labels in ``{split}/v1.2/labels``; both are found), splits ``training`` /
``validation``. Label PNGs store the class index 0..65 in the order of the release's
``config.json``; when ``root/config.json`` exists its order is used, otherwise the v1.2
order below.

Mapping to Cityscapes (``to_cityscapes=True``, the Cityscapes two-stage recipe's
pre-fine-tuning): ``VISTAS_TO_CITYSCAPES``, the table of the released InternImage recipe
(road <- road, general lane marking, manhole; sidewalk <- sidewalk, curb; pole <- pole,
utility pole; rider <- the three riders; one Vistas class for each other Cityscapes class).
Every class not in the table becomes 255 (ignore).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.data_files import files_named, listed_names
from finetune.datasets.base import (
    PairedSegmentation,
    Transform,
    lookup_table,
    refuse_unlabelled,
)
from finetune.datasets.cityscapes import CITYSCAPES_CLASSES

VISTAS_V12_CLASSES = (
    "animal--bird", "animal--ground-animal", "construction--barrier--curb",
    "construction--barrier--fence", "construction--barrier--guard-rail",
    "construction--barrier--other-barrier", "construction--barrier--wall",
    "construction--flat--bike-lane", "construction--flat--crosswalk-plain",
    "construction--flat--curb-cut", "construction--flat--parking",
    "construction--flat--pedestrian-area", "construction--flat--rail-track",
    "construction--flat--road", "construction--flat--service-lane",
    "construction--flat--sidewalk", "construction--structure--bridge",
    "construction--structure--building", "construction--structure--tunnel", "human--person",
    "human--rider--bicyclist", "human--rider--motorcyclist", "human--rider--other-rider",
    "marking--crosswalk-zebra", "marking--general", "nature--mountain", "nature--sand",
    "nature--sky", "nature--snow", "nature--terrain", "nature--vegetation", "nature--water",
    "object--banner", "object--bench", "object--bike-rack", "object--billboard",
    "object--catch-basin", "object--cctv-camera", "object--fire-hydrant",
    "object--junction-box", "object--mailbox", "object--manhole", "object--phone-booth",
    "object--pothole", "object--street-light", "object--support--pole",
    "object--support--traffic-sign-frame", "object--support--utility-pole",
    "object--traffic-light", "object--traffic-sign--back", "object--traffic-sign--front",
    "object--trash-can", "object--vehicle--bicycle", "object--vehicle--boat",
    "object--vehicle--bus", "object--vehicle--car", "object--vehicle--caravan",
    "object--vehicle--motorcycle", "object--vehicle--on-rails",
    "object--vehicle--other-vehicle", "object--vehicle--trailer", "object--vehicle--truck",
    "object--vehicle--wheeled-slow", "void--car-mount", "void--ego-vehicle", "void--unlabeled",
)
assert len(VISTAS_V12_CLASSES) == 66

# The InternImage recipe's Vistas -> Cityscapes correspondence (its ``MapillaryHack``
# transform, OpenGVLab/InternImage segmentation/mmseg_custom/datasets/pipelines/transform.py),
# written by class name instead of v1.2 index. Deliberately narrow: lane markings other than
# "general", crosswalks, curb cuts, bike lanes, bridges, sign frames, ... are ignored (255).
VISTAS_TO_CITYSCAPES = {
    "construction--flat--road": "road",
    "marking--general": "road",
    "object--manhole": "road",
    "construction--barrier--curb": "sidewalk",
    "construction--flat--sidewalk": "sidewalk",
    "construction--structure--building": "building",
    "construction--barrier--wall": "wall",
    "construction--barrier--fence": "fence",
    "object--support--pole": "pole",
    "object--support--utility-pole": "pole",
    "object--traffic-light": "traffic light",
    "object--traffic-sign--front": "traffic sign",
    "nature--vegetation": "vegetation",
    "nature--terrain": "terrain",
    "nature--sky": "sky",
    "human--person": "person",
    "human--rider--bicyclist": "rider",
    "human--rider--motorcyclist": "rider",
    "human--rider--other-rider": "rider",
    "object--vehicle--car": "car",
    "object--vehicle--truck": "truck",
    "object--vehicle--bus": "bus",
    "object--vehicle--on-rails": "train",
    "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--bicycle": "bicycle",
}

SPLITS = ("training", "validation", "testing")


def class_names(root: str | Path) -> tuple[str, ...]:
    """The label order of the release at ``root`` (its config.json), else v1.2's."""
    config = Path(root) / "config.json"
    if not config.is_file():
        return VISTAS_V12_CLASSES
    return tuple(label["name"] for label in json.loads(config.read_text())["labels"])


def cityscapes_lut(names: tuple[str, ...] = VISTAS_V12_CLASSES) -> np.ndarray:
    """Vistas class index -> Cityscapes train id (255 for unmapped classes)."""
    return lookup_table({i: CITYSCAPES_CLASSES.index(VISTAS_TO_CITYSCAPES[name])
                         for i, name in enumerate(names) if name in VISTAS_TO_CITYSCAPES})


def native_lut(names: tuple[str, ...] = VISTAS_V12_CLASSES) -> np.ndarray:
    """Vistas class index -> itself, with ``void--unlabeled`` as 255 (ignore)."""
    return lookup_table({i: i for i, name in enumerate(names) if name != "void--unlabeled"})


def labels_dir(root: str | Path, split: str) -> Path:
    """The label folder of ``split``: ``{split}/labels``, or a v2.0 release's
    ``{split}/v1.2/labels`` where only that one exists."""
    base = Path(root) / split
    if not (base / "labels").is_dir() and (base / "v1.2" / "labels").is_dir():
        return base / "v1.2" / "labels"
    return base / "labels"


def mapillary_pairs(root: str | Path, split: str, lut: np.ndarray) -> list[tuple]:
    """(image, label, lut) triples of ``split``; images without a label file are an
    :class:`UnlabelledImages` error naming how many (one listing of the label folder, no
    file looked at one by one)."""
    if split not in SPLITS:
        raise ValueError(f"mapillary split must be one of {SPLITS}, got {split!r}")
    image_dir = Path(root) / split / "images"
    label_dir = labels_dir(root, split)
    images = files_named(image_dir, ".jpg")
    labels = listed_names(label_dir)
    pairs, unlabelled = [], []
    for image in images:
        if f"{image.stem}.png" in labels:
            pairs.append((image, label_dir / f"{image.stem}.png", lut))
        else:
            unlabelled.append(image)
    refuse_unlabelled(image_dir, len(images), unlabelled,
                      f"{label_dir.relative_to(root)}/<name>.png")
    return pairs


class MapillaryVistasSegmentation(PairedSegmentation):
    """Mapillary Vistas ``split``: Cityscapes train ids (default) or the native classes.

    Native: 66 ids with ``void--unlabeled`` ignored (the last id, so 65 usable classes).
    """

    def __init__(self, root: str | Path, split: str = "training", to_cityscapes: bool = True,
                 transform: Transform | None = None):
        names = class_names(root)
        if to_cityscapes:
            lut, self.class_names = cityscapes_lut(names), CITYSCAPES_CLASSES
        else:
            lut, self.class_names = native_lut(names), names
        self.num_classes = len(CITYSCAPES_CLASSES) if to_cityscapes else len(names) - 1
        pairs = mapillary_pairs(root, split, lut)
        if not pairs:
            raise FileNotFoundError(f"no Mapillary Vistas images under {Path(root) / split}")
        super().__init__(pairs, transform)
