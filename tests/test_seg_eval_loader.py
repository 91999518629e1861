"""The segmentation evaluation reads its validation pairs through a DataLoader with
``run.num_workers`` loader processes, as detection's evaluation does (the one mechanism,
finetune/eval_loader.py), so the images and label maps are decoded while the model runs
(before: ``val_set[i]`` one after the other in the evaluating process; ADE20K's 2000
validation pairs, Cityscapes' 500 2048 x 1024 PNGs). Each rank's forward passes (windows,
scales, flips, one original image at a time) are those it ran before, so the scores do
not depend on ``run.num_workers``, and an image or label map that cannot be read still
ends the evaluation with its own error naming the file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.test_finetune_segmentation import TINY


class Recorder(nn.Module):
    """A stand-in segmenter: a fixed 1x1 convolution (the demo's hues say much of the
    class); records every input it is given."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return self.conv(x)


def _demo(cache: Path, *overrides: str):
    from finetune.seg_data import SegDataset
    from finetune.segmentation import SegmentationConfig
    from launch.config import load_config

    cfg = load_config(SegmentationConfig, None, [
        *TINY, f"data.cache_dir={cache}", "data.demo_val=5", *overrides])
    return cfg, SegDataset(cfg.data, False)


def _old_inputs(val_set, cfg, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """The forward passes' inputs the evaluation gave the model before: ``val_set[i]``
    over this rank's share, one original image at a time, each image's views."""
    from finetune.seg_eval import _scores

    model = Recorder(cfg.data.num_classes)
    for i in range(rank, len(val_set), world):
        img, label = val_set[i]
        _scores(model, img, cfg, tuple(label.shape))
    return model.inputs


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("mode", ["eval.mode=slide", "eval.mode=whole"])
def test_scores_and_forward_passes_do_not_depend_on_the_loader_workers(cache, mode):
    from finetune.seg_eval import evaluate
    from runtime.dist import DistInfo

    scores = {}
    for workers in (0, 2):
        cfg, val_set = _demo(cache, mode, f"run.num_workers={workers}")
        model = Recorder()
        scores[workers] = evaluate(model, val_set, cfg, DistInfo())
        _same(model.inputs, _old_inputs(val_set, cfg))
        assert model.training  # given back in training mode
    if mode == "eval.mode=slide":  # 64 x 64 images, 48 x 48 windows at a stride of 32
        assert len(model.inputs) == 4 * len(val_set)
    assert scores[2] == scores[0]
    assert any(k.startswith("IoU.") for k in scores[0])
    assert scores[0]["mIoU"] > 0  # some class was segmented: a meaningful compare


def test_each_ranks_forward_passes_are_its_share_in_order(cache, monkeypatch):
    from finetune import seg_eval
    from runtime.dist import DistInfo

    # no process group: each rank's evaluation alone (the sum over ranks is not the point)
    monkeypatch.setattr(seg_eval, "all_reduce_sum", lambda t, d: t)
    cfg, val_set = _demo(cache, "run.num_workers=2", "head.test_scales=[0.75,1.0]",
                         "head.test_flip=true")
    for rank in (0, 1):  # 5 images: rank 0 holds 3, rank 1 holds 2
        model = Recorder()
        seg_eval.evaluate(model, val_set, cfg, DistInfo(rank=rank, world_size=2))
        want = _old_inputs(val_set, cfg, rank, 2)
        assert len(want) == 4 * 4 * (3 - rank)  # 2 scales x 2 flips x 4 windows an image
        _same(model.inputs, want)


def test_the_pairs_are_read_in_the_loader_workers(cache, tmp_path, monkeypatch):
    """run.num_workers=2: no image is decoded in the evaluating process; 0: all are."""
    from finetune import seg_data
    from finetune.seg_eval import evaluate
    from runtime.dist import DistInfo
    from tests.reader_pids import log_reader_pids

    log = tmp_path / "pids"
    log_reader_pids(monkeypatch, seg_data, "read_image", log)
    for workers in (2, 0):
        log.unlink(missing_ok=True)
        cfg, val_set = _demo(cache, f"run.num_workers={workers}")
        evaluate(Recorder(), val_set, cfg, DistInfo())
        pids = log.read_text().split()
        assert len(pids) == len(val_set)
        assert (str(os.getpid()) in pids) == (workers == 0), (workers, pids)


def _ade20k(root: Path, n_val: int = 3) -> None:
    """An ADE20K layout of 16 x 16 pairs: one training pair, ``n_val`` validation pairs
    named 0, 1, ..."""
    for split, count in (("training", 1), ("validation", n_val)):
        for d in ("images", "annotations"):
            (root / d / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(
                root / "images" / split / f"{i}.jpg")
            Image.fromarray(np.full((16, 16), i + 1, np.uint8)).save(
                root / "annotations" / split / f"{i}.png")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damaged", ["annotations", "images"])
def test_an_unreadable_val_pair_ends_the_evaluation_naming_its_file(tmp_path, workers,
                                                                     damaged):
    """Its own message, whichever process read it (not torch's ``Caught ... in DataLoader
    worker process`` text around the worker's traceback); the pair before it was
    evaluated, none after it."""
    from finetune.data_files import UnreadableFile
    from finetune.seg_data import SegDataset
    from finetune.seg_eval import evaluate
    from finetune.segmentation import SegmentationConfig
    from launch.config import load_config
    from runtime.dist import DistInfo

    _ade20k(tmp_path / "ade")
    folder = tmp_path / "ade" / damaged / "validation"
    bad = folder / ("1.png" if damaged == "annotations" else "1.jpg")
    data = bad.read_bytes()
    bad.write_bytes(data[:data.index(b"IDAT") + 8] if damaged == "annotations" else b"")
    cfg = load_config(SegmentationConfig, None, [
        "data.kind=ade20k", f"data.root={tmp_path / 'ade'}", "data.num_classes=4",
        "data.test_short=16", "eval.mode=whole", "eval.size_divisor=0",
        f"run.num_workers={workers}"])
    model = Recorder(4)
    with pytest.raises(UnreadableFile) as err:
        evaluate(model, SegDataset(cfg.data, False), cfg, DistInfo())
    what = "label map" if damaged == "annotations" else "image"
    assert re.fullmatch(rf"cannot read {what} {re.escape(str(bad))} \(.+\)", str(err.value))
    assert len(model.inputs) == 1  # pair 0, whole-image: one forward pass
