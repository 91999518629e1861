"""A deliberately plain DCNv3, written from the definition with loops, for the tests.

It shares no code with ops/: positions are computed per output pixel and per point, and
bilinear interpolation reads the four neighbours one by one (zero outside the image, and
no sample at all unless -1 < location < size on both axes, as in the released kernel).
"""

from __future__ import annotations

import math

import torch


def _bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """img: (H, W, C). Bilinear sample at pixel coords (y, x); zeros outside.

    As the released CUDA kernel (dcnv3_im2col_cuda.cuh): nothing is sampled unless
    -1 < y < H and -1 < x < W; inside, each corner outside the image reads zero.
    """
    h, w, c = img.shape
    out = img.new_zeros(c)
    if not (-1 < y < h and -1 < x < w):
        return out
    y0, x0 = math.floor(y), math.floor(x)
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


# --- Hand-computed values of the released op at the image border --------------------------
#
# Source of every number below: the released CUDA kernel, OpenGVLab/InternImage
# classification/ops_dcnv3/src/cuda/dcnv3_im2col_cuda.cuh. Forward (dcnv3_im2col_gpu_kernel)
# and backward (dcnv3_col2im_gpu_kernel*) sample a point only
# `if (loc_h > -1 && loc_w > -1 && loc_h < height_in && loc_w < width_in)`, in pixel
# coordinates of the unpadded input (dcnv3_cuda.cu never pads it). Inside,
# dcnv3_im2col_bilinear / dcnv3_col2im_bilinear take h_low = floor(h), lh = h - h_low,
# hh = 1 - lh (same for w), read corner v1 (h_low, w_low), v2 (h_low, w_high),
# v3 (h_high, w_low), v4 (h_high, w_high) only when that corner is inside the image (else
# 0), and with top_grad_im = top_grad * mask:
#   val         = hh*hw*v1 + hh*lw*v2 + lh*hw*v3 + lh*lw*v4;  output = mask * val
#   grad_mask   = top_grad * val
#   grad_offset = offset_scale * top_grad_im * (x: -hh*v1 + hh*v2 - lh*v3 + lh*v4,
#                                               y: -hw*v1 - lw*v2 + hw*v3 + lw*v4)
#   grad_input  += (w1, w2, w3, w4) * top_grad_im at the four corners.
#
# Set-up: a 1-channel 3x3 image, kernel_size 1, stride 3, padding 0, offset_scale 1: one
# output position p0 = (0, 0) with one point, so the sampling location IS the offset. Each
# case is one batch element with its own offset; mask weight 0.5, upstream gradient 1.

BORDER_IMAGE = ((1.0, 2.0, 4.0), (8.0, 16.0, 32.0), (64.0, 128.0, 256.0))
BORDER_MASK = 0.5
BORDER_PARAMS = dict(kernel_size=1, stride=3, padding=0, dilation=1, groups=1,
                     offset_scale=1.0)
_INF, _NAN = float("inf"), float("nan")

# (loc_x, loc_y), val, grad_offset (x, y), grad_input {(row, col): value}; the image size
# is 3, so the locations -1, 0, 2 and 3 are -1, 0, size-1 and size.
BORDER_CASES = [
    # Sweep y at x = 0.5 (w_low 0, lw = hw = 0.5): row means 1.5 | 12 | 96,
    # column differences x[r,1] - x[r,0]: 1 | 8 | 64.
    ((0.5, -1.0), 0.0, (0.0, 0.0), {}),  # -1 is not > -1: skipped, no gradient at all
    # h_low -1 (v1 = v2 = 0), lh 0.5: val .5*1.5; x: .5*.5*(2-1); y: .5*(.5*1+.5*2)
    ((0.5, -0.5), 0.75, (0.25, 0.75), {(0, 0): 0.125, (0, 1): 0.125}),
    # h_low 0, lh 0: val 1.5; x: .5*(2-1); y: .5*(12-1.5) (one-sided, towards row 1)
    ((0.5, 0.0), 1.5, (0.5, 5.25), {(0, 0): 0.25, (0, 1): 0.25}),
    # h_low 1, lh .25: val .75*12+.25*96; x: .5*(.75*8+.25*64); y: .5*(96-12)
    ((0.5, 1.25), 33.0, (11.0, 42.0),
     {(1, 0): 0.1875, (1, 1): 0.1875, (2, 0): 0.0625, (2, 1): 0.0625}),
    # h_low 2 (= size-1), lh 0, row 3 outside: val 96; x: .5*64; y: .5*(0-96)
    ((0.5, 2.0), 96.0, (32.0, -48.0), {(2, 0): 0.25, (2, 1): 0.25}),
    # h_low 2, lh .5: val .5*96; x: .5*.5*64; y: .5*(0-96)
    ((0.5, 2.5), 48.0, (16.0, -48.0), {(2, 0): 0.125, (2, 1): 0.125}),
    ((0.5, 3.0), 0.0, (0.0, 0.0), {}),  # 3 is not < size: skipped
    # Sweep x at y = 0.5 (h_low 0, lh = hh = 0.5): column means 4.5 | 9 | 18,
    # row differences x[1,c] - x[0,c]: 7 | 14 | 28.
    ((-1.0, 0.5), 0.0, (0.0, 0.0), {}),
    # w_low -1 (v1 = v3 = 0), lw .5: val .5*4.5; x: .5*4.5; y: .5*.5*7
    ((-0.5, 0.5), 2.25, (2.25, 1.75), {(0, 0): 0.125, (1, 0): 0.125}),
    # w_low 0, lw 0: val 4.5; x: .5*(9-4.5); y: .5*7
    ((0.0, 0.5), 4.5, (2.25, 3.5), {(0, 0): 0.25, (1, 0): 0.25}),
    # w_low 1, lw .25: val .75*9+.25*18; x: .5*(18-9); y: .5*(.75*14+.25*28)
    ((1.25, 0.5), 11.25, (4.5, 8.75),
     {(0, 1): 0.1875, (1, 1): 0.1875, (0, 2): 0.0625, (1, 2): 0.0625}),
    # w_low 2 (= size-1), lw 0: val 18; x: .5*(0-18); y: .5*28
    ((2.0, 0.5), 18.0, (-9.0, 14.0), {(0, 2): 0.25, (1, 2): 0.25}),
    # w_low 2, lw .5: val .5*18; x: .5*(0-18); y: .5*.5*28
    ((2.5, 0.5), 9.0, (-9.0, 7.0), {(0, 2): 0.125, (1, 2): 0.125}),
    ((3.0, 0.5), 0.0, (0.0, 0.0), {}),
    # Both axes at -1 (the top-left grid point of a fresh layer's corner output).
    ((-1.0, -1.0), 0.0, (0.0, 0.0), {}),
    # Comparisons with inf / NaN are false: such a point is skipped, nothing is NaN.
    ((_INF, 0.5), 0.0, (0.0, 0.0), {}),
    ((0.5, _NAN), 0.0, (0.0, 0.0), {}),
]


def border_problem(dtype: torch.dtype = torch.float64, device: str = "cpu"):
    """Inputs and released-op results for BORDER_CASES, one case per batch element.

    Returns (x, offset, mask, want) with want = (output, grad_input, grad_offset,
    grad_mask) for an upstream gradient of ones; pass BORDER_PARAMS to ``dcnv3``.
    """
    n = len(BORDER_CASES)
    x = torch.tensor(BORDER_IMAGE, dtype=dtype).view(1, 3, 3, 1).repeat(n, 1, 1, 1)
    offset = torch.tensor([loc for loc, *_ in BORDER_CASES], dtype=dtype).view(n, 1, 1, 2)
    mask = torch.full((n, 1, 1, 1), BORDER_MASK, dtype=dtype)
    out = torch.zeros(n, 1, 1, 1, dtype=dtype)
    grad_input = torch.zeros(n, 3, 3, 1, dtype=dtype)
    grad_offset = torch.zeros(n, 1, 1, 2, dtype=dtype)
    grad_mask = torch.zeros(n, 1, 1, 1, dtype=dtype)
    for i, (_, val, goff, gin) in enumerate(BORDER_CASES):
        out[i] = BORDER_MASK * val
        grad_mask[i] = val
        grad_offset[i, 0, 0] = torch.tensor(goff, dtype=dtype)
        for (r, c), v in gin.items():
            grad_input[i, r, c, 0] = v
    want = (out, grad_input, grad_offset, grad_mask)
    return [t.to(device) for t in (x, offset, mask)], [t.to(device) for t in want]


# A fresh layer at the border: the same image, kernel 3, stride 1, padding 1, zero offsets,
# mask 1/9, upstream gradient 1. Output (i, j) samples point k = kx*3 + ky at (x, y) =
# (j + kx - 1, i + ky - 1). At integer locations every fraction is 0, so by the formulas
# above a used point's offset gradient is (x[y, x+1] - x[y, x], x[y+1, x] - x[y, x]) / 9
# (a neighbour outside the image reads 0) and a skipped point's (location -1 or 3) is 0.
# Rows: k = 0..8, (d/dx, d/dy) * 9.
FRESH_LAYER_PARAMS = dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1,
                          offset_scale=1.0)
FRESH_LAYER_GRAD_OFFSET_X9 = {
    # Top-left output: kx = 0 (x = -1) or ky = 0 (y = -1) skipped; k=4 at (0,0): (2-1,
    # 8-1); k=5 at (0,1): (16-8, 64-8); k=7 at (1,0): (4-2, 16-2); k=8 at (1,1): (32-16,
    # 128-16).
    (0, 0): ((0, 0), (0, 0), (0, 0), (0, 0), (1, 7), (8, 56), (0, 0), (2, 14), (16, 112)),
    # Bottom-right output: kx = 2 (x = 3) or ky = 2 (y = 3) skipped; k=0 at (1,1): (32-16,
    # 128-16); k=1 at (1,2): (256-128, 0-128); k=3 at (2,1): (0-32, 256-32); k=4 at
    # (2,2): (0-256, 0-256).
    (2, 2): ((16, 112), (128, -128), (0, 0), (-32, 224), (-256, -256), (0, 0), (0, 0),
             (0, 0), (0, 0)),
}


def fresh_layer_problem(dtype: torch.dtype = torch.float64, device: str = "cpu"):
    """(x, offset, mask) of a fresh layer on BORDER_IMAGE; pass FRESH_LAYER_PARAMS."""
    x = torch.tensor(BORDER_IMAGE, dtype=dtype, device=device).view(1, 3, 3, 1)
    offset = torch.zeros(1, 3, 3, 18, dtype=dtype, device=device)
    mask = torch.full((1, 3, 3, 9), 1 / 9, dtype=dtype, device=device)
    return x, offset, mask
