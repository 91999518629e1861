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

How the code is shaped for the GPU (each point checked in the sm_90 code, see
``benchmarks/dcnv3_sm90_code.py``):

- Every tile has the one shape [BLOCK_P, BLOCK_C] and every global access of a tile has
  its contiguous run along the lanes, so the compiler gives all tiles one layout and the
  point loop needs no layout conversion (each costs shared memory and barriers);
  per-position values are [BLOCK_P] vectors taken from (reduced out of) such tiles.
- A position's offsets (2K contiguous numbers) and weights (K) are loaded as two tiles
  before the point loop (lane j of row r holds number j of position r: BLOCK_C >= 2K),
  which then selects column k with a reduction across the lanes of one warp: no
  offset load stands between one point's corner loads and the next's. The backward
  gathers its mask and offset gradients in tiles of the same form and stores each once.
- The backward's vectors are capped at 4 lanes (``_lanes``), so that its bf16 loads and
  its fp32 atomics get the same layout.
- The backward's atomics are ``sem="relaxed"``: Triton's default (acq_rel) fences every
  atomic and invalidates L1; the released CUDA op's ``atomicAdd`` is relaxed too, and
  nothing in this kernel reads what another program adds.
- The grid is 1-D with the group index fastest: the programs running side by side cover
  all groups of the same positions, so the offset/mask bytes of neighbouring groups that
  share a 32-byte sector are read (and the offset gradients written) together.
- Autotuning is keyed on the group width, kernel size, softmax flag and the position count
  (rounded up to a power of two), so a small late stage does not inherit the choice made
  for a large early one.

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

# (BLOCK_P, num_warps) tried by the autotuner. All compile for sm_90 without register
# spills at InternImage's group widths (16 and 32 channels, fp32 and bf16); see
# benchmarks/RESULTS.md for the register counts.
GPU_CONFIGS = ((32, 4), (64, 4), (64, 8), (128, 8))

# Integer arguments that vary with the layer shape but gain nothing from Triton's
# specialisation on their value (== 1, divisible by 16): leaving them generic keeps one
# binary per dtype and config instead of one per shape. C and GC stay specialised: their
# divisibility by 16 is what lets the corner loads become 16-byte vectors.
_GENERIC_ARGS = ["P", "H", "W", "Ho", "Wo", "G", "stride", "pad", "dilation", "P_BUCKET"]

AUTOTUNE_KEY = ["GC", "KS", "SOFTMAX", "P_BUCKET"]


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_P": bp}, num_warps=w, num_stages=1) for bp, w in GPU_CONFIGS]


def position_bucket(positions: int) -> int:
    """Autotuning bucket of a position count: the next power of two (at least 1)."""
    return triton.next_power_of_2(max(1, positions))


@triton.jit
def _point_tiles(offset_ptr, mask_ptr, p, pvalid, g, G, Ho, Wo, stride, pad, dilation,
                 offset_scale, c, KS: tl.constexpr, SOFTMAX: tl.constexpr,
                 acc_ty: tl.constexpr):
    """Sampling locations and weights of all K points of each row, as two tiles.

    ``loc``: column 2k holds point k's x location, column 2k + 1 its y (the offsets'
    own interleaved order, so the tile is one contiguous load per row); ``w``: column k
    holds point k's weight (softmax-normalised if SOFTMAX). Needs BLOCK_C >= 2K. Loaded
    once, before the point loop, which then only selects columns and never waits on an
    offset load before issuing its corner loads.
    """
    K: tl.constexpr = KS * KS
    row = p.to(tl.int64)[:, None]
    col = c[None, :]
    off = tl.load(offset_ptr + row * (G * K * 2) + g * (K * 2) + col,
                  mask=pvalid[:, None] & (col < 2 * K), other=0.0).to(acc_ty)
    kcol = col < K
    w = tl.load(mask_ptr + row * (G * K) + g * K + col, mask=pvalid[:, None] & kcol,
                other=0.0).to(acc_ty)
    if SOFTMAX:
        # Padded columns get -inf (weight 0); rows past P hold zeros, so no NaN appears.
        w = tl.where(kcol, w, float("-inf"))
        w = tl.exp(w - tl.max(w, axis=1)[:, None])
        w = w / tl.sum(w, axis=1)[:, None]
    half = (dilation * (KS - 1)) // 2
    is_y = (col % 2) == 1
    point = col // 2
    # Output centre along the column's axis, and the regular grid's tap (x-major order).
    centre = tl.where(is_y, ((p // Wo) % Ho)[:, None], (p % Wo)[:, None])
    tap = tl.where(is_y, point % KS, point // KS)
    loc = ((half - pad + centre * stride).to(acc_ty)
           + offset_scale * ((tap * dilation - half).to(acc_ty) + off))
    return loc, w


@triton.jit
def _column(tile, c, j):
    """Column j of a tile as a per-row vector (exact: one value plus zeros); a reduction
    across the few lanes of a warp that share a row."""
    return tl.sum(tl.where(c[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _point_geometry(px, py, n, H, W):
    """Corner indices, validity and fractions of one point at locations (px, py)."""
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
def _lanes(BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """Channel lanes 0..BLOCK_C-1, vectorised VEC at a time.

    Every global access of a tile gets a layout from its element width and vector
    length; two tiles whose layouts differ need a conversion (shared memory, barriers)
    to meet. The backward adds bf16 products into an fp32 buffer: capping the vectors
    at 4 elements gives bf16 loads and fp32 atomics one layout.
    """
    return tl.max_contiguous(tl.arange(0, BLOCK_C), VEC)


@triton.jit
def _block_of_program(P, G, BLOCK_P: tl.constexpr):
    """(positions, their validity, group) of this program; groups are the fast axis."""
    pid = tl.program_id(0)
    g = pid % G
    p = (pid // G) * BLOCK_P + tl.arange(0, BLOCK_P)
    return p, p < P, g


@triton.autotune(configs=_configs(), key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=_GENERIC_ARGS)
def dcnv3_fwd_kernel(
    x_ptr, offset_ptr, mask_ptr, out_ptr,
    P, H, W, Ho, Wo, C, G, GC,
    stride, pad, dilation, offset_scale, P_BUCKET,
    KS: tl.constexpr, SOFTMAX: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
):
    """out[p, g*GC:(g+1)*GC] = sum_k w_k(p) * bilinear(x, loc_k(p)) for a block of p."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    p, pvalid, g = _block_of_program(P, G, BLOCK_P)
    c = _lanes(BLOCK_C, VEC)
    chan = (g * GC + c)[None, :]
    lane = pvalid[:, None] & (c < GC)[None, :]
    loc, w = _point_tiles(offset_ptr, mask_ptr, p, pvalid, g, G, Ho, Wo, stride, pad,
                          dilation, offset_scale, c, KS, SOFTMAX, acc_ty)
    n = p // (Ho * Wo)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for k in range(K):
        wk = _column(w, c, k)
        pix00, vx0, vx1, vy0, vy1, lx, ly = _point_geometry(
            _column(loc, c, 2 * k), _column(loc, c, 2 * k + 1), n, H, W)
        hx = 1.0 - lx
        hy = 1.0 - ly
        base = x_ptr + pix00[:, None] * C + chan
        v00 = tl.load(base, mask=lane & (vy0 & vx0)[:, None], other=0.0).to(acc_ty)
        v01 = tl.load(base + C, mask=lane & (vy0 & vx1)[:, None], other=0.0).to(acc_ty)
        v10 = tl.load(base + W * C, mask=lane & (vy1 & vx0)[:, None], other=0.0).to(acc_ty)
        v11 = tl.load(base + (W + 1) * C, mask=lane & (vy1 & vx1)[:, None],
                      other=0.0).to(acc_ty)
        acc += ((wk * hy * hx)[:, None] * v00 + (wk * hy * lx)[:, None] * v01
                + (wk * ly * hx)[:, None] * v10 + (wk * ly * lx)[:, None] * v11)
    out = out_ptr + p.to(tl.int64)[:, None] * C + chan
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=lane)


@triton.autotune(configs=_configs(), key=AUTOTUNE_KEY, reset_to_zero=["grad_x_ptr"])
@triton.jit(do_not_specialize=_GENERIC_ARGS)
def dcnv3_bwd_kernel(
    x_ptr, offset_ptr, mask_ptr, grad_out_ptr,
    grad_x_ptr, grad_offset_ptr, grad_mask_ptr,
    P, H, W, Ho, Wo, C, G, GC,
    stride, pad, dilation, offset_scale, P_BUCKET,
    KS: tl.constexpr, SOFTMAX: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
):
    """All three gradients in one pass (grad_x accumulated with atomics, pre-zeroed)."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    p, pvalid, g = _block_of_program(P, G, BLOCK_P)
    c = _lanes(BLOCK_C, VEC)
    chan = (g * GC + c)[None, :]
    lane = pvalid[:, None] & (c < GC)[None, :]
    loc, w = _point_tiles(offset_ptr, mask_ptr, p, pvalid, g, G, Ho, Wo, stride, pad,
                          dilation, offset_scale, c, KS, SOFTMAX, acc_ty)
    n = p // (Ho * Wo)
    go = tl.load(grad_out_ptr + p.to(tl.int64)[:, None] * C + chan, mask=lane,
                 other=0.0).to(acc_ty)
    # Gradients of the weights (column k) and of the offsets (columns 2k, 2k + 1), laid
    # out like ``w`` and ``loc``: tiles of the one shape, hence layout, of every tile
    # here (per-row stores inside the loop would each need a layout conversion).
    grad_w = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    grad_loc = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    gx_ty = grad_x_ptr.dtype.element_ty
    for k in range(K):
        wk = _column(w, c, k)
        pix00, vx0, vx1, vy0, vy1, lx, ly = _point_geometry(
            _column(loc, c, 2 * k), _column(loc, c, 2 * k + 1), n, H, W)
        hx = 1.0 - lx
        hy = 1.0 - ly
        m00 = lane & (vy0 & vx0)[:, None]
        m01 = lane & (vy0 & vx1)[:, None]
        m10 = lane & (vy1 & vx0)[:, None]
        m11 = lane & (vy1 & vx1)[:, None]
        base = x_ptr + pix00[:, None] * C + chan
        # Channel-reduced <grad_out, corner value>: everything the offset and weight
        # gradients need, so corner vectors are never kept beyond this point.
        d00 = tl.sum(go * tl.load(base, mask=m00, other=0.0).to(acc_ty), axis=1)
        d01 = tl.sum(go * tl.load(base + C, mask=m01, other=0.0).to(acc_ty), axis=1)
        d10 = tl.sum(go * tl.load(base + W * C, mask=m10, other=0.0).to(acc_ty), axis=1)
        d11 = tl.sum(go * tl.load(base + (W + 1) * C, mask=m11, other=0.0).to(acc_ty),
                     axis=1)
        gw = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
        grad_w = tl.where(c[None, :] == k, gw[:, None], grad_w)
        gpx = wk * (hy * (d01 - d00) + ly * (d11 - d10))
        gpy = wk * (hx * (d10 - d00) + lx * (d11 - d01))
        grad_loc = tl.where(c[None, :] == 2 * k, gpx[:, None], grad_loc)
        grad_loc = tl.where(c[None, :] == 2 * k + 1, gpy[:, None], grad_loc)
        # Relaxed: no fence or L1 invalidation per atomic (the default is acq_rel);
        # nothing here reads what other programs add, as in the released atomicAdd.
        gbase = grad_x_ptr + pix00[:, None] * C + chan
        tl.atomic_add(gbase, ((wk * hy * hx)[:, None] * go).to(gx_ty), mask=m00,
                      sem="relaxed")
        tl.atomic_add(gbase + C, ((wk * hy * lx)[:, None] * go).to(gx_ty), mask=m01,
                      sem="relaxed")
        tl.atomic_add(gbase + W * C, ((wk * ly * hx)[:, None] * go).to(gx_ty), mask=m10,
                      sem="relaxed")
        tl.atomic_add(gbase + (W + 1) * C, ((wk * ly * lx)[:, None] * go).to(gx_ty),
                      mask=m11, sem="relaxed")
    if SOFTMAX:
        # d logits = w * (g - sum_j w_j g_j), per position (padded columns: w = 0).
        grad_w = w * (grad_w - tl.sum(w * grad_w, axis=1)[:, None])
    row = p.to(tl.int64)[:, None]
    col = c[None, :]
    tl.store(grad_mask_ptr + row * (G * K) + g * K + col,
             grad_w.to(grad_mask_ptr.dtype.element_ty), mask=pvalid[:, None] & (col < K))
    # d loc / d offset = offset_scale on both axes.
    tl.store(grad_offset_ptr + row * (G * K * 2) + g * (K * 2) + col,
             (grad_loc * offset_scale).to(grad_offset_ptr.dtype.element_ty),
             mask=pvalid[:, None] & (col < 2 * K))


def launch_args(
    x_shape: tuple[int, ...], offset_shape: tuple[int, ...], groups: int, kernel_size: int,
    stride: int, padding: int, dilation: int, offset_scale: float,
) -> tuple[tuple, int]:
    """Scalar arguments (P .. P_BUCKET) and BLOCK_C of a launch, from the shapes.

    BLOCK_C covers both the group's channels and the 2K offsets of a position (the point
    tiles use the channel lanes as columns); a group narrower than 2K channels (16 for
    a 3x3 kernel, InternImage-T..XL) leaves lanes idle.
    """
    n, h, w, c = x_shape
    ho, wo = offset_shape[1], offset_shape[2]
    gc = c // groups
    p = n * ho * wo
    scalars = (p, h, w, ho, wo, c, groups, gc, stride, padding, dilation,
               float(offset_scale), position_bucket(p))
    block_c = max(triton.next_power_of_2(gc), triton.next_power_of_2(2 * kernel_size**2))
    return scalars, block_c


def vector_width(dtype: torch.dtype, backward: bool, block_c: int) -> int:
    """VEC: elements per vector access. 16 bytes of the tensors' dtype in the forward; in
    the backward, what one 16-byte atomic of the fp32 (fp64) accumulator holds, so that
    loads and atomics share one layout (see ``_lanes``)."""
    elem = dtype.itemsize
    if backward:
        elem = max(elem, 4)
    return max(1, min(block_c, 16 // elem))


def _on_device(t: torch.Tensor):
    # Triton launches on the *current* CUDA device; make that the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _grid(p: int, groups: int):
    # 1-D: program id = position block * groups + group (groups fastest).
    return lambda meta: (triton.cdiv(p, meta["BLOCK_P"]) * groups,)


def dcnv3_forward(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
    kernel_size: int, stride: int, padding: int, dilation: int, groups: int,
    offset_scale: float, softmax: bool,
) -> torch.Tensor:
    """Launch the forward kernel into ``out`` (N, Ho, Wo, C); all tensors contiguous."""
    if out.numel() == 0:  # a zero-sized grid is not launchable
        return out
    scalars, block_c = launch_args(x.shape, offset.shape, groups, kernel_size, stride,
                                   padding, dilation, offset_scale)
    with _on_device(x):
        dcnv3_fwd_kernel[_grid(scalars[0], groups)](
            x, offset, mask, out, *scalars, KS=kernel_size, SOFTMAX=softmax,
            ACC_F64=x.dtype == torch.float64, BLOCK_C=block_c,
            VEC=vector_width(x.dtype, False, block_c))
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
    scalars, block_c = launch_args(x.shape, offset.shape, groups, kernel_size, stride,
                                   padding, dilation, offset_scale)
    with _on_device(x):
        dcnv3_bwd_kernel[_grid(scalars[0], groups)](
            x, offset, mask, grad_out, grad_x, grad_offset, grad_mask, *scalars,
            KS=kernel_size, SOFTMAX=softmax, ACC_F64=x.dtype == torch.float64,
            BLOCK_C=block_c, VEC=vector_width(x.dtype, True, block_c))
