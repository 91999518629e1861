"""DCNv3 on CPU with loops fused by ``torch.compile``: the reference's semantics at a
fraction of its time and memory for large layers.

The op is split into five steps, each one compiled function:

- ``geometry`` (per point): sampling location, the released kernel's border rule (a point
  is used only if -1 < location < size on both axes), the top-left corner's row in the
  input padded by one zero pixel, the fractional parts and the weight;
- ``gather_corners`` (forward): out = sum over points and corners of weight * row;
- ``corner_dots`` (backward): <grad_out, corner row> for every point and corner;
- ``point_grads`` (backward): the offset and mask gradients of every point from those;
- ``scatter_corners`` (backward): the input gradient, weight * grad_out added into the
  four corner rows of every point.

Compiled (Inductor, dynamic shapes: one graph per loop serves every layer shape), each
loop is one vectorised pass over the group channels, so the K-times-larger sampled
values that the released ``grid_sample`` fallback keeps (and that the eager reference
gathers, four corners at a time) never exist. The scatter is compiled single-threaded:
Inductor's parallel scatter adds with per-element atomics, measured several times slower.
Only the op's inputs are kept for backward; the geometry is recomputed. Few, large
kernels also matter on a busy machine: every parallel region waits for its slowest
thread, and the eager per-point part (some 30 small operations) was measured to
dominate there. The same
functions run uncompiled (eager kernels) in the tests, against hand-computed values of
the released kernel, and inside a caller's own ``torch.compile``.

Compiling costs once per process (seconds to a minute; Inductor's on-disk cache shortens
later processes), so ``backend="auto"`` takes this op on CPU only once a layer has at
least ``COMPILE_MIN_SAMPLES`` sampled values; from then on every CPU layer takes it (no
new compile). Where compiling fails (no C++ compiler, unsupported platform) it falls back
to the eager reference, with one warning. Timings: ``benchmarks/dcnv3_cpu.py`` and
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ops.dcnv3.reference import compute_dtype, dcnv3_reference, sampling_locations

log = logging.getLogger(__name__)

# auto compiles a layer on CPU from this many sampled values (N*Ho*Wo*C*K) on: 4M is
# InternImage-T's stage-1 layer (56x56, 64 channels) at batch 3. Smaller layers cost
# little in the eager reference, which needs no compile.
COMPILE_MIN_SAMPLES = 1 << 22
# The torch.compile backend; tests use "eager" (the same Dynamo tracing, no C++ build).
COMPILE_BACKEND = "inductor"

_compiled: Kernels | None = None  # built on first use
_compile_failed = False
_compiled_ran = False  # a compiled call has succeeded in this process


def geometry(x, offset, mask, kernel_size, stride, padding, dilation, groups, offset_scale):
    """Per point (N, Ho, Wo, G, K): the top-left corner's row in the padded (pixel,
    group) table, the location's fractional parts, the weight (the mask where the point
    is used, else 0) and whether it is used (the released kernel's -1 < loc < size)."""
    n, h, w, _ = x.shape
    _, ho, wo, _ = offset.shape
    loc_x, loc_y = sampling_locations(x, offset, kernel_size, stride, padding, dilation,
                                       groups, offset_scale)
    used = (loc_x > -1) & (loc_x < w) & (loc_y > -1) & (loc_y < h)
    weight = torch.where(used, mask.view(n, ho, wo, groups, kernel_size**2), 0.0)
    # Unused points go on at (0, 0) with weight 0: no far-away or NaN index arithmetic.
    loc_x = torch.where(used, loc_x, 0.0)
    loc_y = torch.where(used, loc_y, 0.0)
    x0, y0 = loc_x.floor(), loc_y.floor()
    # A used point's floor is in [-1, size - 1]: padded by one pixel, its corners exist.
    pixel = (torch.arange(n, device=x.device).view(n, 1, 1, 1, 1) * (h + 2)
             + y0.long() + 1) * (w + 2) + x0.long() + 1
    rows = pixel * groups + torch.arange(groups, device=x.device).view(1, 1, 1, groups, 1)
    return rows, loc_x - x0, loc_y - y0, weight, used


def _steps(x: torch.Tensor, groups: int) -> tuple[int, int, int]:
    """Row offsets of the top-right, bottom-left and bottom-right corners."""
    w = x.shape[2]
    return groups, (w + 2) * groups, (w + 3) * groups


def _table(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The input padded by one zero pixel, one row per (pixel, group): (rows, C/G)."""
    n, h, w, c = x.shape
    padded = F.pad(x.view(n, h, w, groups, c // groups), (0, 0, 0, 0, 1, 1, 1, 1))
    return padded.reshape(-1, c // groups)


def _corner_weights(fx, fy, weight):
    return ((1 - fy) * (1 - fx) * weight, (1 - fy) * fx * weight, fy * (1 - fx) * weight,
            fy * fx * weight)


def gather_corners(table, rows, fx, fy, weight, steps):
    """sum_k sum_corners weight * bilinear * table[row]: (N, Ho, Wo, G, C/G).

    The sum over the K points is written out point by point (not as a reduction), so
    that Inductor makes the contiguous channels its inner, vectorised loop.
    """
    w00, w01, w10, w11 = _corner_weights(fx, fy, weight)
    out = None
    for k in range(rows.shape[-1]):
        r = rows[..., k]
        term = (w00[..., k, None] * table[r] + w01[..., k, None] * table[r + steps[0]]
                + w10[..., k, None] * table[r + steps[1]]
                + w11[..., k, None] * table[r + steps[2]])
        out = term if out is None else out + term
    return out


def corner_dots(table, rows, grad_out, steps):
    """<grad_out, corner row> of every point, per corner: 4 x (N, Ho, Wo, G, K)."""
    go = grad_out.unsqueeze(-2)
    return [(table[rows + s] * go).sum(-1) for s in (0, *steps)]


def point_grads(d00, d01, d10, d11, fx, fy, weight, used, offset_scale):
    """Mask and offset gradients (N, Ho, Wo, G, K) and (..., K, 2) from the corner dots.
    At integer locations the offset derivative is one-sided (right), as floor implies."""
    grad_w = (1 - fy) * (1 - fx) * d00 + (1 - fy) * fx * d01 + fy * (1 - fx) * d10 \
        + fy * fx * d11
    gx = weight * ((1 - fy) * (d01 - d00) + fy * (d11 - d10))
    gy = weight * ((1 - fx) * (d10 - d00) + fx * (d11 - d01))
    return torch.where(used, grad_w, 0.0), torch.stack((gx, gy), -1) * offset_scale


def scatter_corners(num_rows, rows, fx, fy, weight, grad_out, steps):
    """The gradient of the padded table: weight * bilinear * grad_out added into each
    corner's row."""
    grad = grad_out.new_zeros(num_rows, grad_out.shape[-1])
    go = grad_out.unsqueeze(-2)
    for s, w in zip((0, *steps), _corner_weights(fx, fy, weight)):
        grad.index_put_((rows + s,), w.unsqueeze(-1) * go, accumulate=True)
    return grad


class Kernels(NamedTuple):
    """The op's five steps, eager or compiled."""

    geometry: object
    gather: object
    dots: object
    point_grads: object
    scatter: object


EAGER = Kernels(geometry, gather_corners, corner_dots, point_grads, scatter_corners)


class _FusedDCNv3(torch.autograd.Function):
    """Forward gathers; backward recomputes the per-point part, keeps only the inputs."""

    @staticmethod
    def forward(ctx, x, offset, mask, kernels, *params):
        ctx.kernels, ctx.params = kernels, params
        ctx.save_for_backward(x, offset, mask)
        n, h, w, c = x.shape
        groups = params[4]
        rows, fx, fy, weight, _ = kernels.geometry(x, offset, mask, *params)
        out = kernels.gather(_table(x, groups), rows, fx, fy, weight, _steps(x, groups))
        return out.reshape(n, offset.shape[1], offset.shape[2], c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, offset, mask = ctx.saved_tensors
        kernels, params = ctx.kernels, ctx.params
        groups = params[4]
        n, h, w, c = x.shape
        _, ho, wo, _ = offset.shape
        rows, fx, fy, weight, used = kernels.geometry(x, offset, mask, *params)
        go = grad_out.reshape(n, ho, wo, groups, c // groups)
        steps = _steps(x, groups)
        grads = [None, None, None]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dots = kernels.dots(_table(x, groups), rows, go, steps)
            grad_mask, grad_offset = kernels.point_grads(*dots, fx, fy, weight, used,
                                                         params[5])
            grads[1] = grad_offset.reshape(offset.shape)
            grads[2] = grad_mask.reshape(mask.shape)
        if ctx.needs_input_grad[0]:
            table = kernels.scatter(n * (h + 2) * (w + 2) * groups, rows, fx, fy, weight,
                                    go, steps)
            grads[0] = table.view(n, h + 2, w + 2, c)[:, 1:-1, 1:-1].contiguous()
        return (*grads, None, *([None] * len(params)))


def dcnv3_fused(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int, offset_scale: float,
    kernels: Kernels = EAGER,
) -> torch.Tensor:
    """DCNv3 through the steps above with the given kernels (eager by default). Half
    types are computed in fp32, as in the reference."""
    params = (kernel_size, stride, padding, dilation, groups, float(offset_scale))
    cd = compute_dtype(x.dtype)
    if cd == x.dtype:
        return _FusedDCNv3.apply(x, offset, mask, kernels, *params)
    return _FusedDCNv3.apply(x.to(cd), offset.to(cd), mask.to(cd), kernels,
                             *params).to(x.dtype)


def _compiled_kernels() -> Kernels:
    global _compiled
    if _compiled is None:
        def compile_(fn, **options):
            return torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND,
                                 options=options or None)

        single_thread = {"cpp.threads": 1} if COMPILE_BACKEND == "inductor" else {}
        _compiled = Kernels(compile_(geometry), compile_(gather_corners),
                            compile_(corner_dots), compile_(point_grads),
                            compile_(scatter_corners, **single_thread))
    return _compiled


class _FallbackKernels:
    """Compiled loops that switch to the eager ones, for good, when a compile fails
    (the backward's loops compile at the first backward, inside autograd)."""

    def __getattr__(self, name):
        def run(*args):
            global _compile_failed, _compiled_ran
            if not _compile_failed:
                try:
                    out = getattr(_compiled_kernels(), name)(*args)
                    _compiled_ran = True
                    return out
                except Exception as exc:  # noqa: BLE001 - any compiler failure: warn once
                    _compile_failed = True
                    log.warning("dcnv3: compiling the fused CPU op failed (%s: %s); using "
                                "the eager reference from now on", type(exc).__name__,
                                str(exc).splitlines()[0] if str(exc) else "")
            return getattr(EAGER, name)(*args)
        return run


_FALLBACK = _FallbackKernels()


def dcnv3_compiled(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int, offset_scale: float,
) -> torch.Tensor:
    """``dcnv3_fused`` with compiled loops (arguments already validated by
    ``ops.dcnv3.dcnv3``); the eager reference once compiling has failed. Tensors not on
    the CPU (meta, as in memory probes) and calls inside a caller's ``torch.compile`` take
    the eager loops: they never reach this module's compiler nor its failure state."""
    params = (kernel_size, stride, padding, dilation, groups, offset_scale)
    if torch.compiler.is_compiling():  # inside a caller's torch.compile: it fuses these
        return dcnv3_fused(x, offset, mask, *params)
    if x.device.type != "cpu":
        # Only CPU code is compiled here. Meta tensors (the dry-run memory probes of
        # models/memory.py) would fail in Inductor and switch compiling off for the
        # process; the eager loops keep the same tensors for backward as compiled ones.
        return dcnv3_fused(x, offset, mask, *params)
    if _compile_failed:
        return dcnv3_reference(x, offset, mask, *params)
    return dcnv3_fused(x, offset, mask, *params, kernels=_FALLBACK)


def worth_compiling(x: torch.Tensor, offset: torch.Tensor, kernel_size: int) -> bool:
    """Whether ``auto`` takes the compiled op for this CPU layer: compiling works and
    either it is compiled already or the layer is large enough to pay for it."""
    if _compile_failed:
        return False
    n, ho, wo, _ = offset.shape
    samples = n * ho * wo * x.shape[-1] * kernel_size * kernel_size
    return _compiled_ran or samples >= COMPILE_MIN_SAMPLES
