"""Fused DCNv3 kernels in Triton: forward and a single-pass backward.

Layout (all contiguous, channels-last): input (N, H, W, C); offset (P, G*K*2) and mask
(P, G*K) with P = N*Ho*Wo output positions; output (P, C). One program handles a block of
``BLOCK_P`` output positions of one group; its ``BLOCK_C`` channel lanes run along the
contiguous group-channel dimension, so every corner load is one vector load per position.
A group is one tile (``NCH = 1``) or ``NCH = 2`` chunks of BLOCK_C channels handled by
the same lanes, whichever an H200 ran faster (``tile_constants``).

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
- A position's 2K offsets (as stored, x and y interleaved) and K weights are loaded
  as tiles before the point loop, each load contiguous along the lanes (lane j of row r
  holds value j of position r; BLOCK_C >= K), and the loop selects point k's columns
  with a reduction across the lanes of one warp: no offset load stands between one
  point's corner loads and the next's. The backward gathers its mask and offset
  gradients in tiles of the same form and stores each once. (A strided load, e.g. only
  the x offsets, gets a layout of its own from Triton 3.6, the GPU machine's, which
  then converts between the two at every point: checked with both compilers.)
- The forward is not bound by DRAM bandwidth (bf16 runs barely faster than fp32, sm_90
  instruction counts against H200 timings, benchmarks/RESULTS.md): per point and lane
  it computes the geometry and selects the point's column, and each corner adds into
  the accumulator with one fused multiply-add per channel. bf16 corners are widened to fp32
  by two integer instructions per pair (``_widen``), and the autotuner may also pick the
  fully unrolled point loop (``offered_configs``), where the column selections fold.
  The corner masks are per row where the group's channels fill the tile (``FULL``,
  every InternImage width), with the row's own validity folded
  into the point's; each corner tests one bound per axis.
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
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_P, num_warps) tried by the autotuner, per kernel, each with the point loop as a
# loop and fully unrolled where that fits (``offered_configs``). Compiled for sm_90 at
# InternImage's group widths (16 and 32 channels, fp32 and bf16) none spills in its point
# loop with Triton 3.6 or 3.8 (ptxas under 3.8 keeps one value of the split fp32 forward
# at 128x8 in local memory outside it), and each covers its tile without idle warps: a
# warp spans 32 / (BLOCK_C / VEC) rows (see tile_constants). Registers and timings:
# benchmarks/RESULTS.md.
GPU_CONFIGS = {"fwd": ((32, 2), (64, 4), (128, 8)),
               "bwd": ((32, 4), (64, 4), (64, 8))}
# Largest input element (bytes) whose kernel is also offered with the point loop fully
# unrolled: the unrolled forward spills registers from 4-byte inputs on (sm_90 code);
# the unrolled backward (one 32-lane tile) spills at 64x4 and ran slower at every
# config on an H200, so it is not offered.
UNROLL_MAX_ITEMSIZE = {"fwd": 2, "bwd": 0}

# Integer arguments that vary with the layer shape but gain nothing from Triton's
# specialisation on their value (== 1, divisible by 16): leaving them generic keeps one
# binary per dtype and config instead of one per shape. C and GC stay specialised: their
# divisibility by 16 is what lets the corner loads become 16-byte vectors.
_GENERIC_ARGS = ["P", "H", "W", "Ho", "Wo", "G", "stride", "pad", "dilation", "P_BUCKET"]

AUTOTUNE_KEY = ["GC", "KS", "SOFTMAX", "P_BUCKET"]


def offered_configs(kernel: str, dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """(BLOCK_P, num_warps, UNROLL) the autotuner tries for ``kernel`` ("fwd"/"bwd") on
    inputs of ``dtype``. UNROLL=1 unrolls the K-point loop: the column selections fold
    to constants and the next points' loads can start early (about a fifth fewer
    instructions issued, more registers), so it is offered where it does not spill."""
    unrolls = (0, 1) if dtype.itemsize <= UNROLL_MAX_ITEMSIZE[kernel] else (0,)
    return [(bp, w, u) for bp, w in GPU_CONFIGS[kernel] for u in unrolls]


def _configs(kernel: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    """Every config of ``GPU_CONFIGS[kernel]``, as a loop and, where any dtype may take
    it, unrolled (the autotuner's pruning keeps what ``offered_configs`` allows for the
    launch's dtype); one config under the interpreter."""
    if interpret:
        return [triton.Config({"BLOCK_P": 32, "UNROLL": 0}, num_warps=4)]
    unrolls = (0, 1) if UNROLL_MAX_ITEMSIZE[kernel] else (0,)
    return [triton.Config({"BLOCK_P": bp, "UNROLL": u}, num_warps=w, num_stages=1)
            for bp, w in GPU_CONFIGS[kernel] for u in unrolls]


def prune_configs(kernel: str, configs: list[triton.Config], named_args: dict,
                  **kwargs) -> list[triton.Config]:
    """The autotuner's ``early_config_prune``: the configs ``offered_configs`` gives for
    the dtype of the launch's input (``x_ptr``)."""
    offered = set(offered_configs(kernel, named_args["x_ptr"].dtype))
    return [c for c in configs
            if (c.kwargs["BLOCK_P"], c.num_warps, c.kwargs["UNROLL"]) in offered]


def _pruner(kernel: str) -> dict | None:
    # Under the interpreter there is one config and nothing to prune.
    return None if INTERPRET else {"early_config_prune": functools.partial(prune_configs,
                                                                           kernel)}


def position_bucket(positions: int) -> int:
    """Autotuning bucket of a position count: the next power of two (at least 1)."""
    return triton.next_power_of_2(max(1, positions))


@triton.jit
def _located(off, i, centre_x, centre_y, half, dilation, offset_scale, KS: tl.constexpr,
             acc_ty: tl.constexpr):
    """Locations from the offsets ``off`` at interleaved indices ``i`` (even: x, odd: y
    of point i // 2): grid centre + offset_scale * (grid tap + offset). x-major order:
    point k = a * KS + b has x tap a and y tap b."""
    k = i // 2
    is_x = (i % 2) == 0
    tap = (tl.where(is_x, k // KS, k % KS) * dilation - half).to(acc_ty)
    return tl.where(is_x, centre_x, centre_y) + offset_scale * (tap + off)


@triton.jit
def _point_tiles(offset_ptr, mask_ptr, p, pvalid, g, G, Ho, Wo, stride, pad, dilation,
                 offset_scale, c, KS: tl.constexpr, SOFTMAX: tl.constexpr,
                 acc_ty: tl.constexpr):
    """Sampling locations and weights of all K points of each row, as tiles, made before
    the point loop (which then only selects columns and never waits on an offset load).

    ``la`` and ``lb``: the group's 2K locations in the offsets' own order, (x, y)
    interleaved per point, lanes 0..BLOCK_C-1 and BLOCK_C..2K-1 (``_point_location``
    picks point k's pair); ``w``: column k holds point k's weight (softmax-normalised if
    SOFTMAX). Needs BLOCK_C >= K. Every load runs contiguously along the lanes, like the
    corner loads: a strided one gets a layout of its own from Triton 3.6, and converting
    between the two inside the loop costs shared memory and barriers at every point.
    """
    K: tl.constexpr = KS * KS
    BLOCK_C: tl.constexpr = c.shape[0]
    row = p.to(tl.int64)[:, None]
    col = c[None, :]
    obase = offset_ptr + row * (G * K * 2) + g * (K * 2) + col
    la = tl.load(obase, mask=pvalid[:, None] & (col < 2 * K), other=0.0).to(acc_ty)
    lb = tl.load(obase + BLOCK_C, mask=pvalid[:, None] & (col + BLOCK_C < 2 * K),
                 other=0.0).to(acc_ty)
    half = (dilation * (KS - 1)) // 2
    centre_x = (half - pad + (p % Wo) * stride).to(acc_ty)[:, None]
    centre_y = (half - pad + ((p // Wo) % Ho) * stride).to(acc_ty)[:, None]
    la = _located(la, col, centre_x, centre_y, half, dilation, offset_scale, KS, acc_ty)
    lb = _located(lb, col + BLOCK_C, centre_x, centre_y, half, dilation, offset_scale, KS,
                  acc_ty)
    kcol = col < K
    w = tl.load(mask_ptr + row * (G * K) + g * K + col, mask=pvalid[:, None] & kcol,
                other=0.0).to(acc_ty)
    if SOFTMAX:
        # Padded columns get -inf (weight 0); rows past P hold zeros, so no NaN appears.
        w = tl.where(kcol, w, float("-inf"))
        w = tl.exp(w - tl.max(w, axis=1)[:, None])
        w = w / tl.sum(w, axis=1)[:, None]
    return la, lb, w


@triton.jit
def _column(tile, c, j):
    """Column j of a tile as a per-row vector (exact: one value plus zeros); a reduction
    across the few lanes of a warp that share a row."""
    return tl.sum(tl.where(c[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _point_location(la, lb, c, k):
    """Sampling location (x, y) of point k of each row (tiles from ``_point_tiles``)."""
    BLOCK_C: tl.constexpr = c.shape[0]
    # One return after the branch: returning from inside it led Triton 3.8 to lay the
    # tiles out apart and convert between them at every point (sm_90 code).
    if 2 * k < BLOCK_C:  # one tile holds the pair (BLOCK_C is even)
        px = _column(la, c, 2 * k)
        py = _column(la, c, 2 * k + 1)
    else:
        px = _column(lb, c, 2 * k - BLOCK_C)
        py = _column(lb, c, 2 * k + 1 - BLOCK_C)
    return px, py


@triton.jit
def _set_pair(tile, c, j, x, y):
    """``tile`` with columns j and j + 1 of each row set to x and y (per-row vectors)."""
    col = c[None, :]
    return tl.where(col == j, x[:, None], tl.where(col == j + 1, y[:, None], tile))


@triton.jit
def _point_geometry(px, py, n, H, W, pvalid):
    """Corner indices, validity and fractions of one point at locations (px, py) of
    each row (rows that are not ``pvalid`` sample nothing), and whether it is used."""
    # The released kernel samples a point only if -1 < loc < size on both axes; at
    # exactly -1 zero padding would still give the offset a gradient (from row/column 0).
    used = pvalid & (px > -1.0) & (px < W) & (py > -1.0) & (py < H)
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
    # -1 < loc < size puts the top-left corner in [-1, size-1], so each corner needs one
    # bound per axis (a skipped point, at 0, is dropped by vy0/vy1 below).
    vx0 = x0 >= 0
    vx1 = x0 < W - 1
    # Every corner mask takes one of vy0/vy1, so folding `used` in there drops the point.
    vy0 = used & (y0 >= 0)
    vy1 = used & (y0 < H - 1)
    # Pixel index of the top-left corner; int64 because N*H*W*C can exceed 2**31.
    pix00 = ((n * H + y0) * W + x0).to(tl.int64)
    return pix00, vx0, vx1, vy0, vy1, lx, ly, used


@triton.jit
def _corner_weights(wk, lx, ly):
    """Weight of each corner (top-left, top-right, bottom-left, bottom-right): the
    point's weight times its bilinear factor."""
    hx = 1.0 - lx
    hy = 1.0 - ly
    return wk * hy * hx, wk * hy * lx, wk * ly * hx, wk * ly * lx


@triton.jit
def _corner_masks(chan_ok, vx0, vx1, vy0, vy1, FULL: tl.constexpr):
    """Load masks of the four corners (top-left, top-right, bottom-left, bottom-right).
    With FULL (every lane of the chunk is a channel of the group, as at every
    InternImage width) a mask is per row, shared by the chunks; else the lanes past
    the group's channels (``chan_ok`` false) are masked too."""
    if FULL:
        return ((vy0 & vx0)[:, None], (vy0 & vx1)[:, None], (vy1 & vx0)[:, None],
                (vy1 & vx1)[:, None])
    else:
        return (chan_ok & (vy0 & vx0)[:, None], chan_ok & (vy0 & vx1)[:, None],
                chan_ok & (vy1 & vx0)[:, None], chan_ok & (vy1 & vx1)[:, None])


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
def _channels(g, GC, pvalid, BLOCK_C: tl.constexpr, VEC: tl.constexpr):
    """The lanes ``c`` of this program's group ``g`` and what the kernels index and mask
    with: ``chan`` (the first chunk's channel of each lane; the second's is chan +
    BLOCK_C), ``chan0``/``chan1`` (the lane is a channel of the group in chunk 0 / 1) and
    ``lane``/``lane1`` (that, on a valid row: the masks of the per-position tiles)."""
    c = _lanes(BLOCK_C, VEC)
    chan0 = (c < GC)[None, :]
    chan1 = (c + BLOCK_C < GC)[None, :]
    return (c, (g * GC + c)[None, :], chan0, chan1, pvalid[:, None] & chan0,
            pvalid[:, None] & chan1)


@triton.jit
def _block_of_program(P, G, BLOCK_P: tl.constexpr):
    """(positions, their validity, group) of this program; groups are the fast axis."""
    pid = tl.program_id(0)
    g = pid % G
    p = (pid // G) * BLOCK_P + tl.arange(0, BLOCK_P)
    return p, p < P, g


@triton.jit
def _widen(v, acc_ty: tl.constexpr, WIDEN_ASM: tl.constexpr):
    """v in the accumulator's type. bf16 is the top half of an fp32, so with WIDEN_ASM
    (bf16 on an NVIDIA GPU) each 32-bit register of two bf16 becomes two fp32 by one
    shift and one mask; the compiler's own conversion spends three instructions on the
    pair. Element order in the packed register (the lower address in the low half, as
    loaded) was checked in the LLVM IR Triton emits for sm_90: output 0 is element 0."""
    if WIDEN_ASM:
        return tl.inline_asm_elementwise(
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [v],
            dtype=tl.float32, is_pure=True, pack=2)
    else:
        return v.to(acc_ty)


@triton.jit
def _bilinear_add(acc, base, C, W, m00, m01, m10, m11, a00, a01, a10, a11,
                  acc_ty: tl.constexpr, WIDEN_ASM: tl.constexpr):
    """acc + the four corners at ``base`` (top-left) weighted a00..a11 (per row); one
    fused multiply-add per corner and channel."""
    v00 = _widen(tl.load(base, mask=m00, other=0.0), acc_ty, WIDEN_ASM)
    acc = acc + a00[:, None] * v00
    v01 = _widen(tl.load(base + C, mask=m01, other=0.0), acc_ty, WIDEN_ASM)
    acc = acc + a01[:, None] * v01
    v10 = _widen(tl.load(base + W * C, mask=m10, other=0.0), acc_ty, WIDEN_ASM)
    acc = acc + a10[:, None] * v10
    v11 = _widen(tl.load(base + (W + 1) * C, mask=m11, other=0.0), acc_ty, WIDEN_ASM)
    return acc + a11[:, None] * v11


@triton.autotune(configs=_configs("fwd"), key=AUTOTUNE_KEY, prune_configs_by=_pruner("fwd"))
@triton.jit(do_not_specialize=_GENERIC_ARGS)
def dcnv3_fwd_kernel(
    x_ptr, offset_ptr, mask_ptr, out_ptr,
    P, H, W, Ho, Wo, C, G, GC,
    stride, pad, dilation, offset_scale, P_BUCKET,
    KS: tl.constexpr, SOFTMAX: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NCH: tl.constexpr, VEC: tl.constexpr,
    FULL: tl.constexpr, WIDEN_ASM: tl.constexpr, UNROLL: tl.constexpr,
):
    """out[p, g*GC:(g+1)*GC] = sum_k w_k(p) * bilinear(x, loc_k(p)) for a block of p.

    The group's channels are NCH (1 or 2) chunks of BLOCK_C, each its own tile: one
    point's geometry serves both, so a lane computes it once per 2 * VEC channels."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    p, pvalid, g = _block_of_program(P, G, BLOCK_P)
    c, chan, chan0, chan1, lane, lane1 = _channels(g, GC, pvalid, BLOCK_C, VEC)
    la, lb, w = _point_tiles(offset_ptr, mask_ptr, p, pvalid, g, G, Ho, Wo, stride, pad,
                             dilation, offset_scale, c, KS, SOFTMAX, acc_ty)
    n = p // (Ho * Wo)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    acc1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for k in tl.range(0, K, loop_unroll_factor=1 + (K - 1) * UNROLL):
        wk = _column(w, c, k)
        px, py = _point_location(la, lb, c, k)
        pix00, vx0, vx1, vy0, vy1, lx, ly, used = _point_geometry(px, py, n, H, W, pvalid)
        # the released kernel never reads a skipped point's weight: a NaN/inf one must
        # not reach 0 * weight in the corner sums
        wk = tl.where(used, wk, 0.0)
        a00, a01, a10, a11 = _corner_weights(wk, lx, ly)
        base = x_ptr + pix00[:, None] * C + chan
        m00, m01, m10, m11 = _corner_masks(chan0, vx0, vx1, vy0, vy1, FULL)
        acc = _bilinear_add(acc, base, C, W, m00, m01, m10, m11, a00, a01, a10, a11,
                            acc_ty, WIDEN_ASM)
        if NCH == 2:
            m00, m01, m10, m11 = _corner_masks(chan1, vx0, vx1, vy0, vy1, FULL)
            acc1 = _bilinear_add(acc1, base + BLOCK_C, C, W, m00, m01, m10, m11,
                                 a00, a01, a10, a11, acc_ty, WIDEN_ASM)
    out = out_ptr + p.to(tl.int64)[:, None] * C + chan
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=lane)
    if NCH == 2:
        tl.store(out + BLOCK_C, acc1.to(out_ptr.dtype.element_ty), mask=lane1)


@triton.jit
def _plus(acc, v):
    """acc + v, or v where acc is None (adding to 0.0 would cost an add: x + 0.0 is not
    x for x = -0.0, so the compiler keeps it)."""
    if acc is None:
        return v
    else:
        return acc + v


@triton.jit
def _corner_grads(x_ptr, grad_x_ptr, pix00, chan, C, W, go, m00, m01, m10, m11,
                  a00, a01, a10, a11, d00, d01, d10, d11, acc_ty: tl.constexpr,
                  WIDEN_ASM: tl.constexpr):
    """One channel chunk's share of a point's backward: atomically adds a_ij * go into
    grad_x at the four corners and returns d_ij + go * (corner value) per lane (d_ij
    None: the first chunk). Summed over the group's channels, these are all the offset
    and weight gradients need; the chunks accumulate lane-wise, so each corner is
    reduced across the lanes once."""
    base = x_ptr + pix00[:, None] * C + chan
    d00 = _plus(d00, go * _widen(tl.load(base, mask=m00, other=0.0), acc_ty, WIDEN_ASM))
    d01 = _plus(d01, go * _widen(tl.load(base + C, mask=m01, other=0.0), acc_ty, WIDEN_ASM))
    d10 = _plus(d10, go * _widen(tl.load(base + W * C, mask=m10, other=0.0), acc_ty,
                                 WIDEN_ASM))
    d11 = _plus(d11, go * _widen(tl.load(base + (W + 1) * C, mask=m11, other=0.0), acc_ty,
                                 WIDEN_ASM))
    # Relaxed: no fence or L1 invalidation per atomic (the default is acq_rel);
    # nothing here reads what other programs add, as in the released atomicAdd.
    gx_ty: tl.constexpr = grad_x_ptr.dtype.element_ty
    gbase = grad_x_ptr + pix00[:, None] * C + chan
    tl.atomic_add(gbase, (a00[:, None] * go).to(gx_ty), mask=m00, sem="relaxed")
    tl.atomic_add(gbase + C, (a01[:, None] * go).to(gx_ty), mask=m01, sem="relaxed")
    tl.atomic_add(gbase + W * C, (a10[:, None] * go).to(gx_ty), mask=m10, sem="relaxed")
    tl.atomic_add(gbase + (W + 1) * C, (a11[:, None] * go).to(gx_ty), mask=m11,
                  sem="relaxed")
    return d00, d01, d10, d11


@triton.autotune(configs=_configs("bwd"), key=AUTOTUNE_KEY, prune_configs_by=_pruner("bwd"),
                  reset_to_zero=["grad_x_ptr"])
@triton.jit(do_not_specialize=_GENERIC_ARGS)
def dcnv3_bwd_kernel(
    x_ptr, offset_ptr, mask_ptr, grad_out_ptr,
    grad_x_ptr, grad_offset_ptr, grad_mask_ptr,
    P, H, W, Ho, Wo, C, G, GC,
    stride, pad, dilation, offset_scale, P_BUCKET,
    KS: tl.constexpr, SOFTMAX: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NCH: tl.constexpr, VEC: tl.constexpr,
    FULL: tl.constexpr, WIDEN_ASM: tl.constexpr, UNROLL: tl.constexpr,
):
    """All three gradients in one pass (grad_x accumulated with atomics, pre-zeroed);
    channels in NCH chunks of BLOCK_C as in the forward."""
    acc_ty: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    K: tl.constexpr = KS * KS
    p, pvalid, g = _block_of_program(P, G, BLOCK_P)
    c, chan, chan0, chan1, lane, lane1 = _channels(g, GC, pvalid, BLOCK_C, VEC)
    la, lb, w = _point_tiles(offset_ptr, mask_ptr, p, pvalid, g, G, Ho, Wo, stride, pad,
                             dilation, offset_scale, c, KS, SOFTMAX, acc_ty)
    n = p // (Ho * Wo)
    go_ptr = grad_out_ptr + p.to(tl.int64)[:, None] * C + chan
    go = tl.load(go_ptr, mask=lane, other=0.0).to(acc_ty)
    go1 = tl.load(go_ptr + BLOCK_C, mask=lane1, other=0.0).to(acc_ty)  # NCH == 1: none
    # Gradients of the weights (column k = point k, like ``w``) and of the locations
    # (interleaved as stored, like ``la``/``lb``): tiles of the one shape, hence layout,
    # of every tile here (per-row stores inside the loop would each need a layout
    # conversion).
    grad_w = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    grad_oa = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    grad_ob = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for k in tl.range(0, K, loop_unroll_factor=1 + (K - 1) * UNROLL):
        wk = _column(w, c, k)
        px, py = _point_location(la, lb, c, k)
        pix00, vx0, vx1, vy0, vy1, lx, ly, used = _point_geometry(px, py, n, H, W, pvalid)
        # the released kernel never reads a skipped point's weight: a NaN/inf one must
        # not reach 0 * weight in the corner sums
        wk = tl.where(used, wk, 0.0)
        hx = 1.0 - lx
        hy = 1.0 - ly
        a00, a01, a10, a11 = _corner_weights(wk, lx, ly)
        m00, m01, m10, m11 = _corner_masks(chan0, vx0, vx1, vy0, vy1, FULL)
        d00, d01, d10, d11 = _corner_grads(
            x_ptr, grad_x_ptr, pix00, chan, C, W, go, m00, m01, m10, m11,
            a00, a01, a10, a11, None, None, None, None, acc_ty, WIDEN_ASM)
        if NCH == 2:
            m00, m01, m10, m11 = _corner_masks(chan1, vx0, vx1, vy0, vy1, FULL)
            d00, d01, d10, d11 = _corner_grads(
                x_ptr, grad_x_ptr, pix00, chan + BLOCK_C, C, W, go1, m00, m01, m10, m11,
                a00, a01, a10, a11, d00, d01, d10, d11, acc_ty, WIDEN_ASM)
        d00 = tl.sum(d00, axis=1)
        d01 = tl.sum(d01, axis=1)
        d10 = tl.sum(d10, axis=1)
        d11 = tl.sum(d11, axis=1)
        at_k = c[None, :] == k
        gw = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11
        grad_w = tl.where(at_k, gw[:, None], grad_w)
        gpx = wk * (hy * (d01 - d00) + ly * (d11 - d10))
        gpy = wk * (hx * (d10 - d00) + lx * (d11 - d01))
        if 2 * k < BLOCK_C:
            grad_oa = _set_pair(grad_oa, c, 2 * k, gpx, gpy)
        else:
            grad_ob = _set_pair(grad_ob, c, 2 * k - BLOCK_C, gpx, gpy)
    if SOFTMAX:
        # d logits = w * (g - sum_j w_j g_j), per position (padded columns: w = 0).
        grad_w = w * (grad_w - tl.sum(w * grad_w, axis=1)[:, None])
    row = p.to(tl.int64)[:, None]
    col = c[None, :]
    tl.store(grad_mask_ptr + row * (G * K) + g * K + col,
             grad_w.to(grad_mask_ptr.dtype.element_ty), mask=pvalid[:, None] & (col < K))
    # d loc / d offset = offset_scale on both axes.
    gof_ty: tl.constexpr = grad_offset_ptr.dtype.element_ty
    gof = grad_offset_ptr + row * (G * K * 2) + g * (K * 2) + col
    tl.store(gof, (grad_oa * offset_scale).to(gof_ty), mask=pvalid[:, None] & (col < 2 * K))
    tl.store(gof + BLOCK_C, (grad_ob * offset_scale).to(gof_ty),
             mask=pvalid[:, None] & (col + BLOCK_C < 2 * K))


def launch_args(
    x_shape: tuple[int, ...], offset_shape: tuple[int, ...], groups: int, kernel_size: int,
    stride: int, padding: int, dilation: int, offset_scale: float,
) -> tuple:
    """Scalar arguments (P .. P_BUCKET) of a launch, from the shapes."""
    n, h, w, c = x_shape
    ho, wo = offset_shape[1], offset_shape[2]
    p = n * ho * wo
    return (p, h, w, ho, wo, c, groups, c // groups, stride, padding, dilation,
            float(offset_scale), position_bucket(p))


def tile_constants(dtype: torch.dtype, backward: bool, group_channels: int,
                   kernel_size: int, split: bool | None = None) -> dict:
    """BLOCK_C, NCH, VEC, FULL and WIDEN_ASM of a launch.

    A tile is BLOCK_C lanes wide; the point tiles use the lanes as columns, so BLOCK_C
    >= K. A group is either one tile of its (power-of-two) width, at least K lanes
    (NCH = 1; InternImage-H: 32 lanes, T..XL: 16), or, split, NCH = 2 chunks of half
    its width (only for groups at least twice as wide as K), each a tile of its own
    handled by the same lanes, so that a lane computes each point's geometry once for
    twice the channels. ``split`` None takes the layout an H200 ran faster at H's
    32-channel groups (2026-12-04, ``benchmarks/dcnv3_sweep.py --layouts``): one tile
    for the backward (split took 19-21% longer) and for 16-bit forwards (5-13% longer);
    split for the forward from 4-byte inputs (equal at stage 1, 9% faster at stage 4,
    and the one tile spills two registers under Triton 3.6). VEC: elements per vector
    access, 16 bytes of the tensors' dtype in the forward; in the backward what one
    16-byte atomic of the fp32 (fp64) accumulator holds, so that loads and atomics share
    one layout (see ``_lanes``). FULL: the group's channels fill the NCH chunks exactly
    (no lane to mask in the point loop). WIDEN_ASM: bf16 widened by inline PTX
    (``_widen``), on NVIDIA GPUs only (not the interpreter, not ROCm).
    """
    if split is None:
        split = not backward and dtype.itemsize >= 4
    k_width = triton.next_power_of_2(kernel_size**2)
    width = triton.next_power_of_2(group_channels)
    nch = 2 if split and width >= 2 * k_width else 1
    # At least 2 lanes: a point's (x, y) offset pair never straddles two tiles.
    block_c = width // 2 if nch == 2 else max(width, k_width, 2)
    elem = dtype.itemsize
    if backward:
        elem = max(elem, 4)
    widen_asm = dtype == torch.bfloat16 and not INTERPRET and torch.version.hip is None
    return {"BLOCK_C": block_c, "NCH": nch, "VEC": max(1, min(block_c, 16 // elem)),
            "FULL": group_channels == nch * block_c, "WIDEN_ASM": widen_asm}


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
    scalars = launch_args(x.shape, offset.shape, groups, kernel_size, stride, padding,
                          dilation, offset_scale)
    tiles = tile_constants(x.dtype, False, scalars[7], kernel_size)
    with _on_device(x):
        dcnv3_fwd_kernel[_grid(scalars[0], groups)](
            x, offset, mask, out, *scalars, KS=kernel_size, SOFTMAX=softmax,
            ACC_F64=x.dtype == torch.float64, **tiles)
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
    scalars = launch_args(x.shape, offset.shape, groups, kernel_size, stride, padding,
                          dilation, offset_scale)
    tiles = tile_constants(x.dtype, True, scalars[7], kernel_size)
    with _on_device(x):
        dcnv3_bwd_kernel[_grid(scalars[0], groups)](
            x, offset, mask, grad_out, grad_x, grad_offset, grad_mask, *scalars,
            KS=kernel_size, SOFTMAX=softmax, ACC_F64=x.dtype == torch.float64, **tiles)
