"""Two differently augmented views of every image, and where each view came from.

A view is a random resized crop of the loaded image, optionally flipped horizontally,
resampled to the loaded image's size. Its geometry (the crop box in the loaded image's
pixel coordinates and the flip) travels with the batch: the decoder's position
embeddings are computed from it (``pos_embed``). Random numbers come from torch's global
generator, which every checkpoint saves per rank, so a resumed run draws the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ViewGeometry:
    """Where a batch of views came from: ``boxes`` (B, 4) as (x0, y0, x1, y1) in the source
    image's pixels, ``flipped`` (B,) bool: the view is the box's content mirrored left-right."""

    boxes: torch.Tensor
    flipped: torch.Tensor

    def index(self, order: torch.Tensor) -> ViewGeometry:
        """The geometry of the views reordered by ``order``."""
        return ViewGeometry(self.boxes[order], self.flipped[order])


def sample_boxes(batch: int, size: int, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random resized crop boxes (torchvision's RandomResizedCrop ranges: area share in
    ``scale``, aspect ratio log-uniform in ``ratio``), clipped to a ``size``-square image."""
    area = torch.empty(batch).uniform_(*scale) * size * size
    log_ratio = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(1.0, size)
    h = (area / aspect).sqrt().clamp(1.0, size)
    x0 = torch.rand(batch) * (size - w)
    y0 = torch.rand(batch) * (size - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def crop_views(images: torch.Tensor, geometry: ViewGeometry) -> torch.Tensor:
    """Resample each image's box (flipped where asked) to the image's own size (bilinear)."""
    b, _, h, w = images.shape
    boxes = geometry.boxes.to(images.device, torch.float32)
    # affine_grid maps output coordinates in [-1, 1] to input ones (align_corners=False:
    # -1 and 1 are the outer pixel edges, as the box's pixel coordinates are)
    sx = (boxes[:, 2] - boxes[:, 0]) / w
    sy = (boxes[:, 3] - boxes[:, 1]) / h
    cx = (boxes[:, 0] + boxes[:, 2]) / w - 1
    cy = (boxes[:, 1] + boxes[:, 3]) / h - 1
    sx = torch.where(geometry.flipped.to(images.device), -sx, sx)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).to(images.dtype)


def two_views(images: torch.Tensor, scale: tuple[float, float], flip_prob: float
              ) -> tuple[torch.Tensor, torch.Tensor, ViewGeometry, ViewGeometry]:
    """(view 1, view 2, geometry 1, geometry 2): independent crops and flips per image."""
    b, size = images.shape[0], images.shape[-1]
    geoms = [ViewGeometry(sample_boxes(b, size, scale), torch.rand(b) < flip_prob)
             for _ in range(2)]
    return crop_views(images, geoms[0]), crop_views(images, geoms[1]), geoms[0], geoms[1]
