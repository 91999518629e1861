"""Segmentation test views as the released protocol makes them: every (multi-scale) view
is a rescale of the ORIGINAL image, sized by mmcv's rule.

References (read, not copied): OpenGVLab/InternImage ``segmentation/configs/ade20k/
upernet_internimage_t_512_160k_ade20k.py`` (``MultiScaleFlipAug(img_scale=(2048, 512),
img_ratios=[0.5, ..., 1.75])`` over ``Resize(keep_ratio=True)``, ``ResizeToMultiple(32)``)
and ``mask2former_internimage_h_896_80k_cocostuff2ade20k_ms.py`` (``img_scale=(3584, 896)``,
``img_ratios=[768./896., ..., 1024./896.]``); mmseg 0.27 ``datasets/pipelines/
test_time_aug.py`` (mode 2: ``(int(img_scale[0] * r), int(img_scale[1] * r))`` per ratio,
each applied to the loaded image's copy), ``transforms.py`` (``Resize`` with keep_ratio:
``mmcv.imrescale``); mmcv 1.5 ``mmcv/image/geometric.py`` (``rescale_size``: factor
``min(max_long / max(h, w), max_short / min(h, w))``, ``_scale_size``: ``int(x * f + 0.5)``;
``imresize``: cv2 bilinear); mmseg's ``ResizeToMultiple`` (``imresize_to_multiple`` with
``scale_factor=1``: each side rounded up to the divisor, a second bilinear resize).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
ROOT = Path(__file__).resolve().parents[1]


def mmcv_rescaled_size(h: int, w: int, img_scale: tuple[int, int], ratio: float):
    """The documented rule, written out: MultiScaleFlipAug's scale for ``ratio`` (each side
    truncated), then mmcv's ``rescale_size`` with half-up rounding of each side."""
    max_long, max_short = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    factor = min(max_long / max(h, w), max_short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def to_multiple(size: tuple[int, int], divisor: int = 32) -> tuple[int, int]:
    return tuple(math.ceil(s / divisor) * divisor for s in size)


class Recorder(torch.nn.Module):
    """A 2-class "model" that keeps every input it is given."""

    def __init__(self):
        super().__init__()
        self.views: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.views.append(x.clone())
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


def _evaluate_one(original: torch.Tensor, overrides: list[str]) -> list[torch.Tensor]:
    """The views ``evaluate`` feeds the model for one original (C, H, W) image."""
    from finetune.segmentation import SegmentationConfig, evaluate
    from launch.config import load_config
    from runtime.dist import DistInfo

    cfg = load_config(SegmentationConfig, None, [
        "data.num_classes=2", "data.class_names=[a,b]", "data.test_short=512",
        "data.test_long=2048", "eval.mode=whole", "eval.size_divisor=32", *overrides])
    label = torch.zeros(original.shape[-2:], dtype=torch.long)
    model = Recorder()
    evaluate(model, [(original, label)], cfg, DistInfo())
    return model.views


def test_multiscale_views_are_rescaled_from_the_original_with_mmcvs_sizes():
    """A 375 x 500 original at img_scale (2048, 512), ratios 0.5..1.75: the views have the
    sizes mmcv's rule gives (before the stretch to 32: 256x341, 384x512, 512x683, 640x853,
    768x1024, 896x1195), and their pixels are a bilinear resize of the original, stretched
    up to a multiple of 32. Before, each view was a rescale of the test-size image (512 x
    704 after its own stretch): 1.25 x 704 = 880 -> 896 wide instead of 853 -> 864, and at
    0.5 a resize of a resize (same size, other pixels)."""
    torch.manual_seed(0)
    h, w = 375, 500
    original = torch.randn(3, h, w)
    views = _evaluate_one(original, [f"head.test_scales={RATIOS}", "head.test_flip=false"])
    rescaled = [mmcv_rescaled_size(h, w, (2048, 512), r) for r in RATIOS]
    assert rescaled == [(256, 341), (384, 512), (512, 683), (640, 853), (768, 1024),
                        (896, 1195)]
    assert [tuple(v.shape[-2:]) for v in views] == [to_multiple(s) for s in rescaled]
    for view, size in zip(views, rescaled):
        expected = F.interpolate(original[None], size, mode="bilinear", align_corners=False)
        if to_multiple(size) != size:
            expected = F.interpolate(expected, to_multiple(size), mode="bilinear",
                                     align_corners=False)
        torch.testing.assert_close(view, expected)
    # made from the test-size image instead, the 0.5 view has the same size, other pixels
    test_size = F.interpolate(F.interpolate(original[None], (512, 683), mode="bilinear",
                                            align_corners=False),
                              (512, 704), mode="bilinear", align_corners=False)
    second_hand = F.interpolate(test_size, (256, 352), mode="bilinear", align_corners=False)
    assert (views[0] - second_hand).abs().max() > 0.1


def test_single_scale_view_rounds_halves_up_as_mmcv():
    """1024 x 1025 at (2048, 512): factor 0.5, width 512.5 -> 513 by mmcv's
    ``int(x + 0.5)`` (Python's round gives 512), stretched to 544; the single-scale view
    and the multi-scale view at ratio 1.0 are the same tensor."""
    torch.manual_seed(0)
    original = torch.randn(3, 1024, 1025)
    assert mmcv_rescaled_size(1024, 1025, (2048, 512), 1.0) == (512, 513)
    (single,) = _evaluate_one(original, [])
    assert tuple(single.shape[-2:]) == (512, 544)
    (multi,) = _evaluate_one(original, ["head.test_scales=[1.0]", "head.test_flip=true"])[:1]
    torch.testing.assert_close(single, multi)


def test_eval_view_follows_multiscaleflipaug_modes():
    """``eval_view``: mode 2 (a test scale times the ratio, sides truncated) and, with no
    test scale (``test_short`` 0), mode 1 (the image's own sides times the ratio); no cap on
    the long side when ``test_long`` is 0 (our extension; the short side rules)."""
    from finetune.seg_data import eval_view

    img = torch.zeros(3, 683, 512)
    for r in RATIOS:
        assert tuple(eval_view(img, 512, 2048, 0, r).shape[-2:]) == \
            mmcv_rescaled_size(683, 512, (2048, 512), r)
        assert tuple(eval_view(img, 0, 0, 0, r).shape[-2:]) == \
            mmcv_rescaled_size(683, 512, (int(683 * r), int(512 * r)), 1.0)
    assert tuple(eval_view(img, 512, 0, 0, 1.0).shape[-2:]) == (683, 512)
    assert eval_view(img, 0, 0, 0, 1.0).shape == (1, 3, 683, 512)


def test_ade20k_ms_preset_ratios_give_the_released_scales():
    """The _ms config's ``img_ratios=[768./896., ...]`` are doubles; truncating
    3584 x 768./896. gives 3072. The preset writes them out in full: 9-digit decimals
    (0.857142857) truncated to (3071, 767) and (3839, 959)."""
    from finetune.segmentation import SegmentationConfig
    from launch.config import load_config

    cfg = load_config(SegmentationConfig, str(
        ROOT / "configs/finetune/seg_mask2former_internimage_h_896_80k_cocostuff2ade20k.yaml"),
        [])
    long, short = cfg.data.test_long, cfg.data.test_short
    assert [(int(long * r), int(short * r)) for r in cfg.head.test_scales] == [
        (int(3584 * n / 896.), int(896 * n / 896.)) for n in (768, 832, 896, 960, 1024)] == [
        (3072, 768), (3328, 832), (3584, 896), (3840, 960), (4096, 1024)]


def test_slide_windows_further_apart_than_their_size_are_refused():
    """eval.stride 100 with eval.crop 80 left a 20-pixel band between windows that no
    window scored: its logits were 0/0 (NaN), argmax'ed to class 0 into the mIoU. mmseg's
    slide inference asserts that every pixel is covered (count_mat == 0 nowhere); the
    config refuses it, naming the key."""
    from finetune.seg_config import SegEvalConfig
    from finetune.seg_eval import slide_logits

    with pytest.raises(ValueError, match=r"eval.stride.*\[100, 100\] must be <= eval.crop"):
        SegEvalConfig(mode="slide", crop=(80, 80), stride=(100, 100))
    with pytest.raises(ValueError, match="eval.crop"):
        SegEvalConfig(mode="slide", crop=(0, 80), stride=(1, 1))
    SegEvalConfig(mode="whole", crop=(80, 80), stride=(100, 100))  # whole: not used
    # at the bound every pixel is scored: no NaN
    cfg = SegEvalConfig(mode="slide", crop=(80, 80), stride=(80, 80))
    logits = slide_logits(lambda x: x[:, :3], torch.randn(1, 3, 200, 170), 3, cfg.crop,
                          cfg.stride)
    assert not torch.isnan(logits).any()
