"""A deliberately plain DCNv3, written from the definition with loops, for the tests.

It shares no code with ops/: positions are computed per output pixel and per point, and
bilinear interpolation reads the four neighbours one by one (zero outside the image).
"""

from __future__ import annotations

import math

import torch


def _bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """img: (H, W, C). Bilinear sample at pixel coords (y, x); zeros outside."""
    h, w, c = img.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = img.new_zeros(c)
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            weight = (1 - abs(y - yy)) * (1 - abs(x - xx))
            out = out + weight * img[yy, xx]
    return out


def dcnv3_naive(x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale):
    """Loop implementation; float64 recommended."""
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    gc = c // groups
    k = kernel_size * kernel_size
    half = (dilation * (kernel_size - 1)) // 2
    out = x.new_zeros(n, ho, wo, c)
    off = offset.reshape(n, ho, wo, groups, k, 2)
    msk = mask.reshape(n, ho, wo, groups, k)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                cy = half - padding + i * stride
                cx = half - padding + j * stride
                for g in range(groups):
                    acc = x.new_zeros(gc)
                    for kx in range(kernel_size):
                        for ky in range(kernel_size):
                            p = kx * kernel_size + ky  # x-major, as the released op
                            dx, dy = off[b, i, j, g, p].tolist()
                            px = cx + offset_scale * (kx * dilation - half + dx)
                            py = cy + offset_scale * (ky * dilation - half + dy)
                            sample = _bilinear(x[b, :, :, g * gc:(g + 1) * gc], py, px)
                            acc = acc + msk[b, i, j, g, p] * sample
                    out[b, i, j, g * gc:(g + 1) * gc] = acc
    return out
