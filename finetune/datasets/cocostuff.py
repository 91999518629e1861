"""COCO-Stuff-164k semantic segmentation: 171 classes (80 things + 91 stuff), 255 ignored.

The first stage of the released InternImage-H ADE20K recipe (Mask2Former pre-fine-tuned on
COCO-Stuff-164k, then ADE20K). Layout: ``images/{train2017,val2017}/*.jpg`` with
``annotations/{train2017,val2017}/``, holding either the release's ``stuffthingmaps`` PNGs
(``<stem>.png``: COCO category id - 1, i.e. 0..181 with 11 ids never used, 255 unlabeled),
mapped here to contiguous train ids 0..170, or already converted ``<stem>_labelTrainIds.png``
files (mmsegmentation's converter), read as they are.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data_files import files_named, listed_names
from finetune.datasets.base import lookup_table, refuse_unlabelled

# Stored ids 0..181 that no class uses (COCO's 11 unused thing/stuff category ids, minus 1).
UNUSED_STORED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
STORED_TO_TRAIN_ID = {stored: train_id for train_id, stored in
                      enumerate(i for i in range(182) if i not in UNUSED_STORED_IDS)}
STUFFTHINGMAPS_LUT = lookup_table(STORED_TO_TRAIN_ID)

COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth",
    "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock",
    "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops",
    "window-blind", "window-other", "wood",
)
assert len(COCO_STUFF_CLASSES) == len(STORED_TO_TRAIN_ID) == 171

SPLITS = ("train2017", "val2017")


def cocostuff_pairs(root: str | Path, split: str) -> list[tuple]:
    """(image, label, lut) triples of ``split``; images without a label file are an
    :class:`UnlabelledImages` error naming how many (one listing of the label folder, no
    file looked at one by one)."""
    if split not in SPLITS:
        raise ValueError(f"cocostuff split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    images = files_named(image_dir, ".jpg")
    labels = listed_names(label_dir)
    pairs, unlabelled = [], []
    for image in images:
        converted, raw = f"{image.stem}_labelTrainIds.png", f"{image.stem}.png"
        if converted in labels:
            pairs.append((image, label_dir / converted, None))
        elif raw in labels:
            pairs.append((image, label_dir / raw, STUFFTHINGMAPS_LUT))
        else:
            unlabelled.append(image)
    refuse_unlabelled(image_dir, len(images), unlabelled,
                      f"annotations/{split}/<name>_labelTrainIds.png, or <name>.png")
    return pairs
