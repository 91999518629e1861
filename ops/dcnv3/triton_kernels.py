"""Fused DCNv3 kernels in Triton: forward and a single-pass backward.

Layout (all contiguous, channels-last): input (N, H, W, C); offset (P, G*K*2) and mask
(P, G*K) with P = N*Ho*Wo output positions; output (P, C). One program handles a block of
``BLOCK_P`` output positions of one group; its ``BLOCK_C`` channel lanes run along the
contiguous group-channel dimension, so every corner load is one vector load per position.

Semantics are those of ``ops.dcnv3.reference`` (sampling location, x-major point order,
zeros outside the image, and the released kernel's rule that a point is skipped unless
-1 < location < size on both axes). The mask may arrive as softmax-normalised weights
or, with ``SOFTMAX=True``, as raw logits that are normalised over the K points inside
the kernel.

Backward computes grad_input (atomic adds into an fp32/fp64 buffer), grad_offset and
grad_mask in one pass: for each point the four corner vectors are loaded once and reduced
against the upstream gradient tile, which gives the mask gradient and both bilinear
derivatives without a second sweep over the input.

Under ``TRITON_INTERPRET=1`` (CPU tests) autotuning is pointless and slow, so a single
config is used; the variable must be set before triton is imported.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": bp}, num_warps=w, num_stages=1)
        for bp, w in ((16, 2), (32, 2), (32, 4), (64, 4), (128, 4), (128, 8))
    ]


@triton.jit
def _point_geometry(p, k, offset_ptr, G, g, pvalid, H, W, Ho, Wo, stride, pad, dilation,
                    offset_scale, KS: tl.constexpr, ACC_F64: tl.constexpr):
    """Sampling location of point k for positions p: corner indices, validity, fractions."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    half = (dilation * (KS - 1)) // 2
    wo = p % Wo
    t = p // Wo
    ho = t % Ho
    n = t // Ho
    kx = k // KS
    ky = k % KS
    off = offset_ptr + p.to(tl.int64) * (G * K * 2) + (g * K + k) * 2
    dx = tl.load(off, mask=pvalid, other=0.0).to(acc_ty)
    dy = tl.load(off + 1, mask=pvalid, other=0.0).to(acc_ty)
    px = (half - pad + wo * stride).to(acc_ty) + offset_scale * ((kx * dilation - half) + dx)
    py = (half - pad + ho * stride).to(acc_ty) + offset_scale * ((ky * dilation - half) + dy)
    # The released kernel samples a point only if -1 < loc < size on both axes; at
    # exactly -1 zero padding would still give the offset a gradient (from row/column 0).
    used = (px > -1.0) & (px < W) & (py > -1.0) & (py < H)
    # A skipped point goes on at (0, 0) with its corners masked off below, so neither a
    # far-away (int overflow) nor an inf/NaN location reaches the arithmetic.
    px = tl.where(used, px, 0.0)
    py = tl.where(used, py, 0.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    lx = px - x0f
    ly = py - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    # Every corner mask takes one of vy0/vy1, so folding `used` in there drops the point.
    vy0 = used & (y0 >= 0) & (y0 < H)
    vy1 = used & (y0 + 1 >= 0) & (y0 + 1 < H)
    # Pixel index of the top-left corner; int64 because N*H*W*C can exceed 2**31.
    pix00 = ((n * H + y0) * W + x0).to(tl.int64)
    return pix00, vx0, vx1, vy0, vy1, lx, ly


@triton.jit
def _load_weights(mask_ptr, p, g, G, pvalid, cols, K: tl.constexpr, SOFTMAX: tl.constexpr,
                  ACC_F64: tl.constexpr):
    """The (BLOCK_P, BLOCK_K) tile of point weights, softmax-normalised if SOFTMAX."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    kvalid = cols < K
    ptrs = mask_ptr + p.to(tl.int64)[:, None] * (G * K) + g * K + cols[None, :]
    m = tl.load(ptrs, mask=pvalid[:, None] & kvalid[None, :], other=0.0).to(acc_ty)
    if SOFTMAX:
        # Rows past P load zeros (finite), padded columns get -inf, so no NaN appears.
        m = tl.where(kvalid[None, :], m, float("-inf"))
        e = tl.exp(m - tl.max(m, axis=1)[:, None])
        m = e / tl.sum(e, axis=1)[:, None]
    return m


@triton.jit
def _sample_point(p, k, offset_ptr, G, g, pvalid, lane, cols, weights, H, W, Ho, Wo, stride,
                  pad, dilation, offset_scale, KS: tl.constexpr, ACC_F64: tl.constexpr):
    """Point k of a block, as both kernels use it: top-left pixel index, its weight, the
    bilinear fractions and complements, and the (BLOCK_P, BLOCK_C) masks of the 4 corners."""
    pix00, vx0, vx1, vy0, vy1, lx, ly = _point_geometry(
        p, k, offset_ptr, G, g, pvalid, H, W, Ho, Wo, stride, pad, dilation, offset_scale,
        KS, ACC_F64)
    wk = tl.sum(tl.where(cols[None, :] == k, weights, 0.0), axis=1)
    m00 = lane & (vy0 & vx0)[:, None]
    m01 = lane & (vy0 & vx1)[:, None]
    m10 = lane & (vy1 & vx0)[:, None]
    m11 = lane & (vy1 & vx1)[:, None]
    return pix00, wk, lx, ly, 1.0 - lx, 1.0 - ly, m00, m01, m10, m11


@triton.autotune(configs=_configs(), key=["GC", "KS"])
@triton.jit
def dcnv3_fwd_kernel(
    x_ptr, offset_ptr, mask_ptr, out_ptr,
    P, H, W, Ho, Wo, C, G, GC,
    stride, pad, dilation, offset_scale,
    KS: tl.constexpr, SOFTMAX: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[p, g*GC:(g+1)*GC] = sum_k w_k(p) * bilinear(x, loc_k(p)) for a block of p."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    g = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pvalid = p < P
    c = tl.arange(0, BLOCK_C)
    cvalid = c < GC
    chan = (g * GC + c)[None, :]
    cols = tl.arange(0, BLOCK_K)
    weights = _load_weights(mask_ptr, p, g, G, pvalid, cols, K, SOFTMAX, ACC_F64)
    lane = pvalid[:, None] & cvalid[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for k in range(K):
        pix00, wk, lx, ly, hx, hy, m00, m01, m10, m11 = _sample_point(
            p, k, offset_ptr, G, g, pvalid, lane, cols, weights, H, W, Ho, Wo, stride, pad,
            dilation, offset_scale, KS, ACC_F64)
        base = x_ptr + pix00[:, None] * C + chan
        v00 = tl.load(base, mask=m00, other=0.0).to(acc_ty)
        v01 = tl.load(base + C, mask=m01, other=0.0).to(acc_ty)
        v10 = tl.load(base + W * C, mask=m10, other=0.0).to(acc_ty)
        v11 = tl.load(base + (W + 1) * C, mask=m11, other=0.0).to(acc_ty)
        acc += ((wk * hy * hx)[:, None] * v00 + (wk * hy * lx)[:, None] * v01
                + (wk * ly * hx)[:, None] * v10 + (wk * ly * lx)[:, None] * v11)
    out = out_ptr + p.to(tl.int64)[:, None] * C + chan
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pvalid[:, None] & cvalid[None, :])


@triton.autotune(configs=_configs(), key=["GC", "KS"], reset_to_zero=["grad_x_ptr"])
@triton.jit
def dcnv3_bwd_kernel(
    x_ptr, offset_ptr, mask_ptr, grad_out_ptr,
    grad_x_ptr, grad_offset_ptr, grad_mask_ptr,
    P, H, W, Ho, Wo, C, G, GC,
    stride, pad, dilation, offset_scale,
    KS: tl.constexpr, SOFTMAX: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All three gradients in one pass (grad_x accumulated with atomics, pre-zeroed)."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    g = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pvalid = p < P
    c = tl.arange(0, BLOCK_C)
    cvalid = c < GC
    chan = (g * GC + c)[None, :]
    lane = pvalid[:, None] & cvalid[None, :]
    cols = tl.arange(0, BLOCK_K)
    weights = _load_weights(mask_ptr, p, g, G, pvalid, cols, K, SOFTMAX, ACC_F64)
    go = tl.load(grad_out_ptr + p.to(tl.int64)[:, None] * C + chan, mask=lane,
                 other=0.0).to(acc_ty)
    # d loss / d weight_k, gathered into a tile so the softmax backward can see all K.
    grad_w = tl.zeros([BLOCK_P, BLOCK_K], dtype=acc_ty)
    goff = grad_offset_ptr + p.to(tl.int64) * (G * K * 2) + g * K * 2
    for k in range(K):
        pix00, wk, lx, ly, hx, hy, m00, m01, m10, m11 = _sample_point(
            p, k, offset_ptr, G, g, pvalid, lane, cols, weights, H, W, Ho, Wo, stride, pad,
            dilation, offset_scale, KS, ACC_F64)
        base = x_ptr + pix00[:, None] * C + chan
        # Channel-reduced <grad_out, corner value>: everything the offset and weight
        # gradients need, so corner vectors are never kept beyond this point.
        d00 = tl.sum(go * tl.load(base, mask=m00, other=0.0).to(acc_ty), axis=1)
        d01 = tl.sum(go * tl.load(base + C, mask=m01, other=0.0).to(acc_ty), axis=1)
        d10 = tl.sum(go * tl.load(base + W * C, mask=m10, other=0.0).to(acc_ty), axis=1)
        d11 = tl.sum(go * tl.load(base + (W + 1) * C, mask=m11, other=0.0).to(acc_ty),
                     axis=1)
        gw = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
        grad_w += tl.where(cols[None, :] == k, gw[:, None], 0.0)
        gpx = wk * (hy * (d01 - d00) + ly * (d11 - d10)) * offset_scale
        gpy = wk * (hx * (d10 - d00) + lx * (d11 - d01)) * offset_scale
        tl.store(goff + 2 * k, gpx.to(grad_offset_ptr.dtype.element_ty), mask=pvalid)
        tl.store(goff + 2 * k + 1, gpy.to(grad_offset_ptr.dtype.element_ty), mask=pvalid)
        gbase = grad_x_ptr + pix00[:, None] * C + chan
        gx_ty = grad_x_ptr.dtype.element_ty
        tl.atomic_add(gbase, ((wk * hy * hx)[:, None] * go).to(gx_ty), mask=m00)
        tl.atomic_add(gbase + C, ((wk * hy * lx)[:, None] * go).to(gx_ty), mask=m01)
        tl.atomic_add(gbase + W * C, ((wk * ly * hx)[:, None] * go).to(gx_ty), mask=m10)
        tl.atomic_add(gbase + (W + 1) * C, ((wk * ly * lx)[:, None] * go).to(gx_ty),
                      mask=m11)
    if SOFTMAX:
        # d logits = p * (g - sum_j p_j g_j), per position.
        grad_w = weights * (grad_w - tl.sum(weights * grad_w, axis=1)[:, None])
    gm = grad_mask_ptr + p.to(tl.int64)[:, None] * (G * K) + g * K + cols[None, :]
    tl.store(gm, grad_w.to(grad_mask_ptr.dtype.element_ty),
             mask=pvalid[:, None] & (cols < K)[None, :])


def _launch_shape(x: torch.Tensor, offset: torch.Tensor, groups: int, kernel_size: int):
    n, h, w, c = x.shape
    ho, wo = offset.shape[1], offset.shape[2]
    gc = c // groups
    blocks = dict(BLOCK_C=max(triton.next_power_of_2(gc), 2),
                  BLOCK_K=max(triton.next_power_of_2(kernel_size * kernel_size), 2))
    return (n * ho * wo, h, w, ho, wo, c, groups, gc), blocks


def _on_device(t: torch.Tensor):
    # Triton launches on the *current* CUDA device; make that the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _grid(p: int, groups: int):
    return lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), groups)


def dcnv3_forward(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
    kernel_size: int, stride: int, padding: int, dilation: int, groups: int,
    offset_scale: float, softmax: bool,
) -> torch.Tensor:
    """Launch the forward kernel into ``out`` (N, Ho, Wo, C); all tensors contiguous."""
    if out.numel() == 0:  # a zero-sized grid is not launchable
        return out
    dims, blocks = _launch_shape(x, offset, groups, kernel_size)
    with _on_device(x):
        dcnv3_fwd_kernel[_grid(dims[0], groups)](
            x, offset, mask, out, *dims, stride, padding, dilation, float(offset_scale),
            KS=kernel_size, SOFTMAX=softmax, ACC_F64=x.dtype == torch.float64, **blocks)
    return out


def dcnv3_backward(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor,
    grad_x: torch.Tensor, grad_offset: torch.Tensor, grad_mask: torch.Tensor,
    kernel_size: int, stride: int, padding: int, dilation: int, groups: int,
    offset_scale: float, softmax: bool,
) -> None:
    """Launch the backward kernel. ``grad_x`` must be zeroed (atomics add into it);
    ``grad_offset``/``grad_mask`` are fully overwritten."""
    if grad_out.numel() == 0:
        grad_offset.zero_()
        grad_mask.zero_()
        return
    dims, blocks = _launch_shape(x, offset, groups, kernel_size)
    with _on_device(x):
        dcnv3_bwd_kernel[_grid(dims[0], groups)](
            x, offset, mask, grad_out, grad_x, grad_offset, grad_mask, *dims, stride,
            padding, dilation, float(offset_scale), KS=kernel_size, SOFTMAX=softmax,
            ACC_F64=x.dtype == torch.float64, **blocks)
