"""Semantic-segmentation test-time protocols shared by every segmentation head.

The paper's multi-scale (MS) numbers rescale each image by factors such as
0.5, 0.75, ..., 1.75, add horizontally flipped copies, resize every score map to the
original image's size and average their class probabilities there; the argmax of the
average is the prediction. As released (OpenGVLab/InternImage ``segmentation/mmseg_custom/
models/segmentors/encoder_decoder_mask2former.py`` and mmseg's ``EncoderDecoder``:
``whole_inference``/``slide_inference`` with ``rescale`` resize each view's logits to
``ori_shape``, ``inference`` takes their softmax, ``aug_test`` averages those): a view
that is confident about one class outweighs one that is unsure, which averaging raw scores
would not do, and logits, not probabilities, are what gets interpolated. Each scaled size
is rounded up to the size divisor, as mmseg's ``ResizeToMultiple`` after the rescale.

``multiscale_flip_scores`` rescales the tensor it is given; evaluation
(``finetune/seg_eval.py``) instead makes every view from the original image, as
mmseg's ``MultiScaleFlipAug`` does (``finetune.seg_data.eval_view``), and averages them
with ``mean_view_probs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def multiscale_flip_scores(score_fn: ScoreFn, images: torch.Tensor,
                           scales: Sequence[float] = MS_SCALES, flip: bool = True,
                           size_divisor: int = 32,
                           out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean class probabilities (softmax of ``score_fn``'s (B, C, h, w) scores, each
    resized to ``out_size`` first: the original image's size, default the input's) over
    rescaled and flipped inputs.

    Each scaled size is rounded up to a multiple of ``size_divisor`` (the backbone's
    stride), so every view is valid input; returns (B, C, *out_size).
    """
    height, width = images.shape[-2:]
    views = (_resize(images, tuple(
        max(1, math.ceil(round(side * scale) / size_divisor)) * size_divisor
        for side in (height, width))) for scale in scales)
    return mean_view_probs(score_fn, views, flip=flip,
                           out_size=out_size if out_size is not None else (height, width))


@torch.no_grad()
def mean_view_probs(score_fn: ScoreFn, views: Iterable[torch.Tensor], flip: bool,
                    out_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, *out_size) mean class probabilities of ``views`` (each also flipped with
    ``flip``): every view's scores, flipped back, are resized to ``out_size`` and then
    soft-maxed (mmseg's ``aug_test`` over ``inference`` with ``rescale``). ``views`` is
    consumed one at a time, so a generator holds one view in memory."""
    out_size = tuple(out_size)
    total = None
    count = 0
    for scaled in views:
        for flipped in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            scores = score_fn(view)
            scores = scores.flip(-1) if flipped else scores
            probs = _resize(scores, out_size).softmax(1)
            total = probs if total is None else total + probs
            count += 1
    return total / count
