"""Segmentation evaluation: sliding-window / whole-image logits, optional multi-scale +
flip, mIoU and per-class IoU."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from finetune.datasets.base import IGNORE_INDEX
from finetune.eval_loader import share_batches
from finetune.seg_config import NINETEEN_CLASS_KINDS, SegmentationConfig
from finetune.seg_data import SegDataset, eval_view
from runtime.dist import DistInfo, all_reduce_sum
from runtime.lockstep import lockstep


def slide_logits(model: nn.Module, img: torch.Tensor, num_classes: int,
                 crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits (1, C, H, W) of one image from overlapping ``crop`` windows, averaged."""
    _, _, h, w = img.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(1, math.ceil((h - ch) / sh) + 1)
    cols = max(1, math.ceil((w - cw) / sw) + 1)
    logits = img.new_zeros(1, num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, h - ch), min(c * sw, w - cw)
            logits[:, :, y0:y0 + ch, x0:x0 + cw] += model(img[:, :, y0:y0 + ch, x0:x0 + cw])
            count[:, :, y0:y0 + ch, x0:x0 + cw] += 1
    return logits / count


@torch.no_grad()
def evaluate(model: nn.Module, val_set: SegDataset, cfg: SegmentationConfig,
             d: DistInfo) -> dict[str, float]:
    """mIoU (+ per-class IoU) over the val set; each rank a slice, matrices summed.

    Every forward pass (window, scale, flip) runs in lock-step with the other ranks
    (runtime/lockstep.py), so a ZeRO-3 model evaluates whatever each rank's slice holds.
    The pairs are read by ``run.num_workers`` loader processes while the model runs
    (:func:`finetune.eval_loader.share_batches`), one original image at a time, in the
    order of this rank's share, so each rank's forward passes do not depend on
    ``run.num_workers``; an image or label map that cannot be read ends the evaluation
    with its :class:`~finetune.data_files.UnreadableFile` (naming it), whichever process
    read it.
    """
    from finetune.metrics import ConfusionMatrix

    core = model
    core.eval()
    conf = ConfusionMatrix(cfg.data.num_classes, IGNORE_INDEX)
    crop = tuple(cfg.data.crop_size)  # a training crop: a valid input for every head

    def dummy_args() -> tuple[torch.Tensor]:
        return (torch.zeros(1, 3, *crop, device=d.device),)

    with lockstep(core, dummy_args, d.device) as forward:
        # one original image at a time: its views are made from it (_scores)
        for [(img, label)] in share_batches(val_set, d, 1, cfg.run.num_workers):
            scores = _scores(forward, img.to(d.device), cfg, tuple(label.shape))
            conf.update(scores.argmax(1)[0].cpu(), label)
    conf.mat = all_reduce_sum(conf.mat.to(d.device), d).cpu()
    core.train()
    return conf.scores(_class_names(cfg))


def _scores(core: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor,
            cfg: SegmentationConfig, out_size: tuple[int, int]) -> torch.Tensor:
    """(1, C, *out_size) scores of one original (C, H, W) image at ``out_size`` (the
    label's): slide / whole logits resized bilinearly, or under multi-scale + flip the mean
    probabilities (each view's logits resized before its softmax).

    Every view, the single-scale one included, is made from the original image by
    ``eval_view`` (mmseg's ``MultiScaleFlipAug``: ``img_scale`` x ratio bounds a rescale of
    the loaded image, then ``ResizeToMultiple``), one view at a time."""
    def single(view: torch.Tensor) -> torch.Tensor:
        if cfg.eval.mode == "slide":
            return slide_logits(core, view, cfg.data.num_classes, cfg.eval.crop,
                                cfg.eval.stride)
        return core(view)

    short, long = cfg.data.test_short, cfg.data.test_long
    if not cfg.head.multiscale:
        x = eval_view(img, short, long, cfg.eval.size_divisor)
        return F.interpolate(single(x), out_size, mode="bilinear", align_corners=False)
    from finetune.heads.seg_inference import mean_view_probs

    # 0 (no stretching): the backbone's stride still applies
    divisor = cfg.eval.size_divisor or 32
    views = (eval_view(img, short, long, divisor, ratio)
             for ratio in list(cfg.head.test_scales) or [1.0])
    return mean_view_probs(single, views, flip=cfg.head.test_flip, out_size=out_size)


def _class_names(cfg: SegmentationConfig) -> list[str] | None:
    if cfg.data.class_names:
        return list(cfg.data.class_names)
    if cfg.data.eval_kind in NINETEEN_CLASS_KINDS:
        from finetune.datasets import CITYSCAPES_CLASSES

        return list(CITYSCAPES_CLASSES)
    if cfg.data.kind == "cocostuff":
        from finetune.datasets import COCO_STUFF_CLASSES

        return list(COCO_STUFF_CLASSES)
    return _demo_names(cfg)


def _demo_names(cfg: SegmentationConfig) -> list[str] | None:
    if cfg.data.kind != "demo":
        return None
    from finetune.demo_data import ensure_shapes_ade

    root = ensure_shapes_ade(cfg.data.cache_dir, cfg.data.demo_train, cfg.data.demo_val,
                             cfg.data.demo_size)
    return json.loads((root / "classes.json").read_text())
