"""Segmentation labels outside the classes (neither 0 .. data.num_classes - 1 nor the
ignore index 255).

Evaluation: a stray value in a validation label map crashed ``ConfusionMatrix.update``
(``shape '[4, 4]' is invalid``) after a whole epoch, before any checkpoint. mmseg's
``intersect_and_union`` (mmseg/core/evaluation/metrics.py) drops only the ignore index
and bins with ``torch.histc(bins=C, min=0, max=C - 1)``: such a label is in no label area
and no intersection, while its pixel's prediction still counts in the predicted area.

Training: a label >= data.num_classes reached the loss as ``IndexError: Target 3 is out of
bounds`` (on a GPU, a device-side assert); it is now one line, exit 2, naming the value and
data.num_classes (and the label file: tests/test_seg_label_file.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.test_finetune_segmentation import M2F, TINY


def _mmseg_areas(pred: np.ndarray, label: np.ndarray, c: int, ignore: int = 255):
    """intersect, union, pred and label areas by mmseg's rule, with numpy: the ignore
    index dropped, then each area a histogram over the values 0 .. c - 1 only."""
    keep = label != ignore
    p, t = pred[keep], label[keep]

    def hist(v: np.ndarray) -> np.ndarray:
        return np.bincount(v[(v >= 0) & (v < c)], minlength=c).astype(np.float64)

    inter, area_pred, area_label = hist(p[p == t]), hist(p), hist(t)
    return inter, area_pred + area_label - inter, area_pred, area_label


def test_out_of_range_validation_labels_are_left_out_as_mmseg(caplog):
    from finetune.metrics import ConfusionMatrix

    c = 4
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, c, (2, 20, 20), generator=gen)
    target = torch.randint(0, c, (2, 20, 20), generator=gen)
    target[0, :5, :5] = 200  # the QA repro: a patch of 200 in a 4-class set
    target[1, 0, :7] = 4  # just past the last class
    target[1, 3, :6] = 255  # ignored, not counted as out of range
    cm = ConfusionMatrix(c, ignore_index=255)
    for i in range(2):  # one image at a time, as the evaluation
        cm.update(pred[i], target[i])

    p, t = pred.numpy().ravel(), target.numpy().ravel()
    in_range = t < c
    # the class rows: the matrix of the same data with those pixels (and 255) removed
    expected = np.bincount(t[in_range] * c + p[in_range], minlength=c * c).reshape(c, c)
    assert np.array_equal(cm.mat[:c].numpy(), expected)
    out_of_range = (t != 255) & (t >= c)
    assert cm.left_out == int(out_of_range.sum()) == 25 + 7

    inter, union, _, area_label = _mmseg_areas(p, t, c)
    with caplog.at_level(logging.WARNING, logger="finetune.metrics"):
        s = cm.scores()
    seen = union > 0
    iou = inter / np.where(seen, union, 1)
    assert s["mIoU"] == pytest.approx(iou[seen].mean())
    assert s["aAcc"] == pytest.approx(inter.sum() / area_label.sum())
    assert s["mAcc"] == pytest.approx((inter / area_label)[area_label > 0].mean())
    for k in range(c):
        assert s[f"IoU.{k}"] == pytest.approx(iou[k])
    warned = [r.getMessage() for r in caplog.records if "data.num_classes" in r.getMessage()]
    assert len(warned) == 1 and "32 pixels" in warned[0] and "data.num_classes - 1 = 3" \
        in warned[0], warned


def test_in_range_validation_labels_log_nothing(caplog):
    from finetune.metrics import ConfusionMatrix

    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 255, 2]]))
    with caplog.at_level(logging.WARNING, logger="finetune.metrics"):
        assert cm.scores()["mIoU"] == pytest.approx(1.0)
    assert cm.left_out == 0 and not caplog.records


@pytest.mark.parametrize("head", [[], M2F], ids=["upernet", "mask2former"])
def test_too_few_classes_ends_the_run_in_one_line(head, cache, tmp_path, capsys):
    """The QA repro at test size: the 4-class demo data with data.num_classes=3 (the
    training raised IndexError: Target 3 is out of bounds, at step 1), for either head."""
    from launch.cli import main

    out = tmp_path / "run"
    code = main(["finetune", "segmentation", "--output-dir", str(out), *TINY, *head,
                 "data.num_classes=3", f"data.cache_dir={cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("internimage finetune: segmentation: ")
    assert "data.num_classes - 1 = 2" in err[-1] and "value 3" in err[-1], err[-1]
