"""A training label outside the classes is refused where its label map is read, naming the
file and its image (it was refused per batch, naming only the value: with ADE20K's 20k
maps the user had to hunt for the file), in one line, exit 2, also when a DataLoader
worker process read it (torch re-raises a worker's exception with its whole traceback as
the message); and ``data.reduce_zero_label`` keeps a stored 255 ignored, as mmseg."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_finetune_segmentation import TINY


def _ade20k(root: Path, labels: dict[str, np.ndarray], size: int = 64) -> None:
    """An ADE20K layout (images/<split>/<name>.jpg, annotations/<split>/<name>.png) with
    the training ``labels`` (stored ids, before reduce_zero_label) and one validation
    pair."""
    rng = np.random.default_rng(0)
    val = {"val_0": np.full((size, size), 1, np.uint8)}
    for split, maps in (("training", labels), ("validation", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for name, label in maps.items():
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")


def _good(size: int = 64) -> np.ndarray:
    """A stored map of the 4 classes (ids 1..4) and some "other" (0)."""
    label = np.zeros((size, size), np.uint8)
    for k in range(4):
        label[:, k * size // 4:(k + 1) * size // 4] = k + 1
    label[:4] = 0
    return label


@pytest.mark.parametrize("workers", [0, 2])
def test_a_label_past_the_classes_names_its_file_in_one_line(workers, tmp_path, capsys):
    from launch.cli import main

    bad = _good()
    bad[10:13, 20:22] = 9  # 6 pixels of stored id 9: class 8 after reduce_zero_label
    _ade20k(tmp_path / "ade", {"a_0": _good(), "a_1": bad, "a_2": _good(), "a_3": _good()})
    out = tmp_path / "run"
    code = main(["finetune", "segmentation", "--output-dir", str(out), *TINY,
                 "data.kind=ade20k", f"data.root={tmp_path / 'ade'}", "data.num_classes=4",
                 "run.batch_size=2", "run.max_steps=2", "run.eval_every=2",
                 f"run.num_workers={workers}", "data.cat_max_ratio=1.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    text = "\n".join(err)
    # before: "a training label map holds the value 8", no file; with workers > 0 the
    # whole worker traceback followed "Caught LabelRangeError in DataLoader worker"
    assert "Traceback" not in text and "Caught" not in text, text[-2000:]
    line = err[-1]
    assert line.startswith("internimage finetune: segmentation: training label map "), line
    label_file = tmp_path / "ade" / "annotations" / "training" / "a_1.png"
    image_file = tmp_path / "ade" / "images" / "training" / "a_1.jpg"
    assert f"{label_file} (image {image_file})" in line, line
    assert "value 8 (stored as 9, before data.reduce_zero_label) in 6 pixels" in line, line
    assert "data.num_classes - 1 = 3" in line and "at least 9" in line, line


def _dataset(root: Path, reduce: bool = True):
    from finetune.seg_config import SegDataConfig
    from finetune.seg_data import SegDataset

    cfg = SegDataConfig(kind="ade20k", root=str(root), num_classes=4,
                        reduce_zero_label=reduce)
    return SegDataset(cfg, True)


def test_reduce_zero_label_keeps_a_stored_255_ignored_as_mmseg(tmp_path):
    # mmseg 0.27 LoadAnnotations (open-mmlab/mmsegmentation
    # mmseg/datasets/pipelines/loading.py), reduce_zero_label on the uint8 map:
    # 0 -> 255, then minus 1, then 254 -> 255: stored 0 and stored 255 are both ignored,
    # 1..N become 0..N-1. Before: a stored 255 became 254, refused as out of range.
    label = _good()
    label[5, :7] = 255
    _ade20k(tmp_path, {"a_0": label})
    _, got = _dataset(tmp_path)._load(0)
    stored = torch.from_numpy(label.astype(np.int64))
    expected = torch.where((stored == 0) | (stored == 255), 255, stored - 1)
    assert torch.equal(got, expected)
    assert int((got == 255).sum()) == 4 * 64 + 7  # rows 0..3 stored 0, row 5's 255s


def test_only_training_maps_are_refused_and_a_negative_value_is_named(tmp_path):
    from finetune.seg_config import SegDataConfig
    from finetune.seg_data import LabelRangeError, SegDataset, check_label_range

    label = _good()
    label[0, 0] = 200
    _ade20k(tmp_path, {"a_0": label})
    with pytest.raises(LabelRangeError, match=r"a_0\.png .*value 199 .* in 1 pixels"):
        _dataset(tmp_path)._load(0)
    # evaluation leaves such pixels out, as mmseg's metric (tests/test_seg_label_range.py)
    cfg = SegDataConfig(kind="ade20k", root=str(tmp_path), num_classes=4, val_kind="ade20k",
                        val_root=str(tmp_path))
    SegDataset(cfg, False)._load(0)
    # a lookup table's negative id (bincount takes none) is named too
    with pytest.raises(LabelRangeError, match=r"m\.png \(image i\.jpg\) holds the value -1 in "
                       r"2 pixels.*; fix the label map$"):
        check_label_range(torch.tensor([[0, -1], [-1, 255]]), 4, Path("m.png"),
                          Path("i.jpg"))
