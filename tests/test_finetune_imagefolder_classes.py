"""An ImageFolder's classes: the validation set is labelled by the training set's class
folders, and folders the run cannot label are refused before anything is built.

Before, train/ and val/ were two independent torchvision ImageFolders, each numbering its
own sorted folders: with val/c1 missing, val's c2 images got label 1 and were scored against
class 1 without a word (val_loss 0.57 -> 1.45); more class folders than data.num_classes
ended the run mid-way (``index 2 is out of bounds`` in training, ``Target 2 is out of
bounds`` in evaluation)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image


def _tree(root: Path, train: list[str] | None, val: list[str]) -> Path:
    """``root`` with one tiny PNG per class folder of ``train/`` (None: no train/) and
    ``val/``."""
    for split, classes in (("train", train), ("val", val)):
        for name in classes or ():
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(root / split / name / "a.png")
    return root


def _cfg(root: Path, num_classes: int):
    from finetune.classification import ClassificationConfig
    from launch.config import load_config

    return load_config(ClassificationConfig, None, [
        "data.kind=imagefolder", f"data.root={root}", f"data.num_classes={num_classes}",
        "data.img_size=16"])


def test_val_without_a_class_is_labelled_by_the_training_folders(tmp_path, caplog):
    from finetune.cls_data import build_datasets, build_val_set, check_data

    root = _tree(tmp_path, ["c0", "c1", "c2"], ["c0", "c2"])
    cfg = _cfg(root, 3)
    check_data(cfg)  # a val set missing some class is legitimate
    with caplog.at_level(logging.WARNING, logger="finetune.cls_data"):
        train, val = build_datasets(cfg)
    assert val.class_to_idx == train.class_to_idx == {"c0": 0, "c1": 1, "c2": 2}
    by_class = {Path(path).parent.name: target for path, target in val.samples}
    assert by_class == {"c0": 0, "c2": 2}  # c2 was 1: scored against c1
    assert sorted(val.targets) == [0, 2] and val[1][1] == 2  # what the loader hands on
    warned = [r.getMessage() for r in caplog.records if "holds no images of" in r.getMessage()]
    assert len(warned) == 1 and "1 of the training set's 3 classes" in warned[0], warned
    # an evaluation without training (finetune/eval_only.py) labels it alike
    assert sorted(build_val_set(cfg).targets) == [0, 2]


def test_a_val_class_folder_training_lacks_is_refused(tmp_path):
    from finetune.cls_data import build_datasets, check_data

    root = _tree(tmp_path, ["c0", "c1"], ["c0", "c1", "c9"])
    with pytest.raises(ValueError, match=r"val holds 1 class folder\(s\) that .*train does "
                                         r"not \(c9\)"):
        check_data(_cfg(root, 2))
    with pytest.raises(ValueError, match=r"\(c9\)"):  # the datasets refuse it too
        build_datasets(_cfg(root, 2))


def test_more_class_folders_than_num_classes_are_refused_before_compute(tmp_path, capsys):
    from finetune.cls_data import check_data
    from launch.cli import main

    root = _tree(tmp_path / "d", ["c0", "c1", "c2"], ["c0", "c1"])
    with pytest.raises(ValueError) as err:
        check_data(_cfg(root, 2))
    assert str(err.value) == (f"data.num_classes=2 but {root / 'train'} holds 3 class "
                              "folders (c0, c1, c2): set data.num_classes=3")
    check_data(_cfg(root, 5))  # fewer folders than classes: a subset, left alone
    # the command line: one line, exit 2, nothing written
    out = tmp_path / "run"
    assert main(["finetune", "classification", "--output-dir", str(out),
                 "data.kind=imagefolder", f"data.root={root}", "data.num_classes=2"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.endswith("set data.num_classes=3"), line
    assert not out.exists()
    # evaluating the validation set alone, with no train/: val/'s folders are counted
    val_only = _tree(tmp_path / "v", None, ["c0", "c1", "c2"])
    with pytest.raises(ValueError, match=r"holds 3 class folders \(c0, c1, c2\)"):
        check_data(_cfg(val_only, 2), val_only=True)


def test_class_folders_are_torchvisions(tmp_path):
    """check_data counts the folders as ImageFolder numbers them (hidden ones too)."""
    from torchvision.datasets.folder import find_classes

    from finetune.cls_data import class_folders

    root = _tree(tmp_path, ["b", "a", ".hidden", "B"], [])
    (root / "train" / "loose.png").write_bytes(b"")
    assert class_folders(root / "train") == find_classes(str(root / "train"))[0]
