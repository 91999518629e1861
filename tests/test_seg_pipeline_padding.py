"""Segmentation training items are padded as the released pipeline pads them: mmseg's
``RandomCrop`` (a window cut to the image, no padding), ``RandomFlip``,
``PhotoMetricDistortion``, ``Normalize``, then ``Pad(size=crop_size, pad_val=0,
seg_pad_val=255)`` (OpenGVLab/InternImage segmentation/configs/_base_/datasets/ade20k.py
and cityscapes.py ``train_pipeline``; the Mask2Former H configs, e.g.
segmentation/configs/ade20k/mask2former_internimage_h_896_80k_cocostuff2ade20k_ss.py, the
same order). So the padding is exactly 0 in the normalised image and 255 in the label, at
the bottom and the right (mmcv ``impad`` keeps the image at the top left). Before, the
crop padded with the mean colour, which the flip could move to the left and the
photometric distortion turned into non-zero values the convolutions and BatchNorm saw."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CROP = (64, 64)
# (height, width) of the two training images: the first is shorter than the crop (padded
# at the bottom, cropped across), the second narrower (padded at the right)
SIZES = {"a_0": (40, 100), "a_1": (100, 40)}


def _dataset(root: Path, **over):
    """A training SegDataset over a two-image ADE20K layout: stored ids 1..3 (no 0, so
    no ignored pixel but the padding), short side 40 kept as is (scale 40, ratio 1)."""
    from finetune.seg_config import SegDataConfig
    from finetune.seg_data import SegDataset

    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for name, (h, w) in SIZES.items():
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            # mostly class 1 (stored 2..4 at the right and bottom edges): most windows
            # are dominated (cat_max_ratio 0.75), some not, so the crop's retries count
            label = np.full((h, w), 1, np.uint8)
            label[:, -(w // 8):] = 2
            label[-(h // 8):, :] = 3
            Image.fromarray(pixels).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    cfg = dict(kind="ade20k", root=str(root), num_classes=4, scale_short=40,
               ratio_range=(1.0, 1.0), crop_size=CROP, photometric=True, hflip=0.5)
    cfg.update(over)
    ds = SegDataset(SegDataConfig(**cfg), True)
    assert [p[0].stem for p in ds.pairs] == list(SIZES)
    return ds


def _content(name: str) -> tuple[int, int]:
    """The size of a training window of image ``name``: min(crop, side) per side."""
    h, w = SIZES[name]
    return min(h, CROP[0]), min(w, CROP[1])


def _assert_padded_bottom_right(img: torch.Tensor, label: torch.Tensor, name: str) -> None:
    h, w = _content(name)
    assert img.shape == (3, *CROP) and label.shape == CROP
    pad = torch.ones(CROP, dtype=torch.bool)
    pad[:h, :w] = False
    assert torch.all(img[:, pad] == 0), f"{name}: padding not exactly 0 in the image"
    assert torch.all(label[pad] == 255), f"{name}: padding not 255 in the label"
    # the window itself, at the top left: labelled everywhere (no stored 0 here)
    assert not torch.any(label[:h, :w] == 255), f"{name}: padding inside the top-left window"


# with the distortion and a coin-flip; every item flipped, no distortion (the flip alone
# moved the old padding to the left)
@pytest.mark.parametrize("hflip,photometric", [(0.5, True), (1.0, False)])
def test_padding_is_zero_and_ignored_at_bottom_right_after_flip_and_photometric(
        tmp_path, hflip, photometric):
    ds = _dataset(tmp_path, hflip=hflip, photometric=photometric)
    for seed in range(12):
        for i, name in enumerate(SIZES):
            random.seed(seed)
            img, label = ds[i]
            _assert_padded_bottom_right(img, label, name)


def test_photometric_distortion_leaves_the_padding_alone(tmp_path):
    # the same draws with and without the distortion: the window differs, the padding not
    on, off = _dataset(tmp_path / "on"), _dataset(tmp_path / "off", photometric=False)
    changed = 0
    for seed in range(8):
        random.seed(seed)
        img_on, label_on = on[0]
        random.seed(seed)
        img_off, _ = off[0]
        h, w = _content("a_0")
        assert torch.equal(img_on[:, h:], img_off[:, h:]) and torch.all(img_on[:, h:] == 0)
        assert torch.all(label_on[h:] == 255)
        changed += not torch.allclose(img_on[:, :h, :w], img_off[:, :h, :w])
    assert changed >= 4  # the distortion did act on the windows


def _mmseg_order(img: torch.Tensor, label: torch.Tensor, cfg) -> tuple[torch.Tensor, ...]:
    """The released train_pipeline written out step by step from the same ``random``
    stream: Resize's ratio draw (ratio 1 here: the image as loaded), RandomCrop
    (mmseg/datasets/pipelines/transforms.py: offset_h then offset_w, each uniform in
    [0, max(side - crop, 0)]; with cat_max_ratio < 1 the window is checked 10 times, a new
    one drawn after each failure, labels != 255 counted), RandomFlip, PhotoMetricDistortion,
    Normalize, Pad to crop_size (image 0, label 255) at the bottom and right."""
    from finetune.photometric import photometric_distortion
    from finetune.seg_data import MEAN, STD

    assert random.uniform(*cfg.ratio_range) == 1.0
    (ch, cw), (h, w) = cfg.crop_size, img.shape[-2:]

    def bbox():
        y = random.randint(0, max(h - ch, 0))
        x = random.randint(0, max(w - cw, 0))
        return y, x

    y, x = bbox()
    for _ in range(10):
        window = label[y:y + ch, x:x + cw]
        _, cnt = torch.unique(window[window != 255], return_counts=True)
        if len(cnt) > 1 and cnt.max() / cnt.sum() < cfg.cat_max_ratio:
            break
        y, x = bbox()
    img, label = img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
    if random.random() < cfg.hflip:
        img, label = img.flip(-1), label.flip(-1)
    img = (photometric_distortion(img) - MEAN) / STD
    out_img = torch.zeros(3, ch, cw)
    out_label = torch.full((ch, cw), 255, dtype=label.dtype)
    out_img[:, :img.shape[1], :img.shape[2]] = img
    out_label[:label.shape[0], :label.shape[1]] = label
    return out_img, out_label


def test_a_training_item_equals_the_mmseg_order_pipeline(tmp_path):
    ds = _dataset(tmp_path, cat_max_ratio=0.75)
    for seed in range(10):
        for i in range(len(SIZES)):
            img, label = ds._load(i)
            random.seed(seed)
            want_img, want_label = _mmseg_order(img, label, ds.cfg)
            random.seed(seed)
            got_img, got_label = ds[i]
            assert torch.equal(got_label, want_label), (seed, i)
            assert torch.allclose(got_img, want_img, atol=1e-5), (seed, i)


def test_random_crop_cuts_to_the_image_and_keeps_the_11th_window_as_mmseg():
    from finetune.seg_data import random_crop

    img = torch.arange(3 * 40 * 100, dtype=torch.float32).view(3, 40, 100)
    label = torch.zeros(40, 100, dtype=torch.long)  # one class: every window dominated
    random.seed(0)
    out_img, out_label = random_crop(img, label, CROP, 0.75)
    assert out_img.shape == (3, 40, 64) and out_label.shape == (40, 64)  # no padding
    # mmseg RandomCrop: checked 10 times, redrawn after each failure: the 11th draw is kept
    random.seed(0)
    draws = [(random.randint(0, 0), random.randint(0, 36)) for _ in range(11)]
    assert torch.equal(out_img, img[:, :, draws[-1][1]:draws[-1][1] + 64])
