"""Semantic-segmentation test-time protocols shared by every segmentation head.

The paper's multi-scale (MS) numbers rescale each image by factors such as
0.5, 0.75, ..., 1.75, add horizontally flipped copies, resize every score map back to the
input size and average them; the argmax of the average is the prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def multiscale_flip_scores(score_fn: ScoreFn, images: torch.Tensor,
                           scales: Sequence[float] = MS_SCALES, flip: bool = True,
                           size_divisor: int = 32) -> torch.Tensor:
    """Average of ``score_fn`` (B, C, h, w scores) over rescaled and flipped inputs.

    Each scaled size is rounded to a multiple of ``size_divisor`` (the backbone's stride),
    so every view is valid input; returns (B, C, H, W) at the input size.
    """
    height, width = images.shape[-2:]
    total = None
    views = 0
    for scale in scales:
        size = (max(size_divisor, round(height * scale / size_divisor) * size_divisor),
                max(size_divisor, round(width * scale / size_divisor) * size_divisor))
        scaled = _resize(images, size)
        for flipped in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if flipped else scaled
            scores = score_fn(view)
            scores = scores.flip(-1) if flipped else scores
            scores = _resize(scores, (height, width))
            total = scores if total is None else total + scores
            views += 1
    return total / views
