"""ADE20K (SceneParsing, ``ADEChallengeData2016``) image / label pairs.

Layout: ``images/{training,validation}/*.jpg`` with ``annotations/{split}/<name>.png``,
the label id per pixel (0 = "other", ignored by ``reduce_zero_label``). The demo set of the
segmentation task is written in the same layout.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data_files import files_named, listed_names
from finetune.datasets.base import refuse_unlabelled


def ade20k_pairs(root: str | Path, split: str) -> list[tuple]:
    """(image, label, None) triples of ``split``; images without a label file are an
    :class:`UnlabelledImages` error naming how many (one listing of the label folder, no
    file looked at one by one)."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    images = files_named(image_dir, ".jpg")
    labels = listed_names(label_dir)
    unlabelled = [image for image in images if f"{image.stem}.png" not in labels]
    refuse_unlabelled(image_dir, len(images), unlabelled, f"annotations/{split}/<name>.png")
    return [(image, label_dir / f"{image.stem}.png", None) for image in images]
