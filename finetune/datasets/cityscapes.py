"""Cityscapes semantic segmentation (gtFine), the 19 evaluated classes.

Layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png``. Where the train-id files were never
generated (cityscapesScripts' ``createTrainIdLabelImgs``), ``*_gtFine_labelIds.png`` is
read and mapped with the official id -> trainId table (cityscapesScripts
``helpers/labels.py``); every other id, and the license plate (-1), is 255 (ignore).
"""

from __future__ import annotations

from pathlib import Path

from finetune.data_files import files_named, listed_names
from finetune.datasets.base import (
    PairedSegmentation,
    Transform,
    lookup_table,
    refuse_unlabelled,
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Official label id -> train id (cityscapesScripts labels.py); ids not listed are ignored.
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_ID_LUT = lookup_table(LABEL_ID_TO_TRAIN_ID)

SPLITS = ("train", "val", "test")


def cityscapes_pairs(root: str | Path, split: str) -> list[tuple[Path, Path, object]]:
    """(image, label, lut) triples; lut is None for train-id files, the table for label ids.

    Every image needs its label file (:class:`UnlabelledImages` otherwise, naming how many
    lack one); each city's label folder is listed once, no file is looked at one by one.
    """
    if split not in SPLITS:
        raise ValueError(f"cityscapes split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    # city by city, each in name order: the order of glob("*/*_leftImg8bit.png") sorted
    cities = [c for c in files_named(image_dir, "") if c.is_dir()]
    images = [image for city in cities for image in files_named(city, "_leftImg8bit.png")]
    listed: dict[str, frozenset[str]] = {}  # city -> names in its gtFine folder
    pairs, unlabelled = [], []
    for image in images:
        city = image.parent.name
        label_dir = root / "gtFine" / split / city
        if city not in listed:
            listed[city] = listed_names(label_dir)
        stem = image.name[: -len("_leftImg8bit.png")]
        train_ids, label_ids = f"{stem}_gtFine_labelTrainIds.png", f"{stem}_gtFine_labelIds.png"
        if train_ids in listed[city]:
            pairs.append((image, label_dir / train_ids, None))
        elif label_ids in listed[city]:
            pairs.append((image, label_dir / label_ids, LABEL_ID_LUT))
        else:
            unlabelled.append(image)
    refuse_unlabelled(image_dir, len(images), unlabelled,
                      f"gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png, or "
                      "_gtFine_labelIds.png")
    return pairs


class CityscapesSegmentation(PairedSegmentation):
    """Cityscapes ``split`` under ``root``: labels are train ids 0..18, 255 ignore."""

    num_classes = len(CITYSCAPES_CLASSES)
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Transform | None = None):
        pairs = cityscapes_pairs(root, split)
        if not pairs:
            where = Path(root) / "leftImg8bit" / split
            raise FileNotFoundError(f"no Cityscapes images under {where}")
        super().__init__(pairs, transform)
