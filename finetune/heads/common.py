"""Pieces the dense heads share, written to match the released mmdet/mmseg code.

- ``rank_mean``: a target count averaged over the ranks, the loss normaliser of both
  released heads (mmdet 2.28 ``reduce_mean``, then ``max(., 1)``).
- ``SinePositionEmbedding``: mmdet 2.28's ``SinePositionalEncoding`` (normalised) in
  transformers' position-embedding call signature, always computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.dist import mean_over_ranks


def rank_mean(count: float) -> float:
    """``count`` (this rank's number of targets) averaged over the ranks of the default
    process group, at least 1: the normaliser the released DINO and Mask2Former heads divide
    their summed per-target losses by (``max(reduce_mean(count), 1)``). Every rank must
    call it the same number of times (it is a collective when a group is initialised)."""
    return max(mean_over_ranks([float(count)])[0], 1.0)


class SinePositionEmbedding(nn.Module):
    """Normalised 2-D sine position embedding of mmdet 2.28 ``SinePositionalEncoding``
    (``mmdet/models/utils/positional_encoding.py``; ``normalize=True``, ``offset=0.``,
    ``eps=1e-6``, ``scale=2 * pi``), which the released DINO and Mask2Former heads use.

    Per pixel, ``y`` / ``x`` = the cumulative count of real (not padded) pixels down the
    column / along the row, normalised as ``y / (y_last + eps) * 2 * pi``; channels are
    ``num_feats`` interleaved sin/cos features of ``y / temperature ** (2 * (i // 2) /
    num_feats)`` followed by the same of ``x``. transformers' Deformable DETR embedding
    instead subtracts 0.5 before normalising, and both transformers embeddings compute in
    the features' dtype: in bfloat16 neighbouring positions of a large map collide. This
    one computes in float32 and casts the result to ``dtype`` at the end.

    Called as transformers' embeddings are: ``(shape, device, dtype, mask=None)`` with
    ``shape`` the features' (B, C, H, W) and ``mask`` (B, H, W) true/1 at real pixels
    (transformers' ``pixel_mask`` convention; mmdet's mask is the opposite). It has no
    parameters or buffers, so a state dict is the same with it or transformers' one.
    """

    def __init__(self, num_feats: int, temperature: float = 10000):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature

    def forward(self, shape: torch.Size, device: torch.device, dtype: torch.dtype,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2 * num_feats, H, W) embedding in ``dtype``."""
        batch, _, height, width = shape
        # float32 throughout; none of these ops is one autocast lowers, so an autocast
        # region does not change them either
        if mask is None:
            valid = torch.ones(batch, height, width, dtype=torch.float32, device=device)
        else:
            valid = mask.to(device=device, dtype=torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        eps, scale = 1e-6, 2 * math.pi
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
        steps = torch.arange(self.num_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(steps, 2, rounding_mode="floor")
                                     / self.num_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), 4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), 4).flatten(3)
        pos = torch.cat((pos_y, pos_x), 3).permute(0, 3, 1, 2)
        return pos.to(dtype)
