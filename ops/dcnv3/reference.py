"""Pure-PyTorch DCNv3: the semantics every other backend is tested against.

The released CUDA op's definition (OpenGVLab/InternImage, classification/ops_dcnv3/src/
cuda/dcnv3_im2col_cuda.cuh). For output position p0 of group g, with the K =
kernel_size**2 points of the regular grid p_k:

    y_g(p0) = sum_k mask_gk(p0) * bilinear(x_g, p0 + offset_scale * (p_k + offset_gk(p0)))

in pixel coordinates of the unpadded input, where p0 = (dilation*(kernel_size-1))//2 -
padding + stride * output_index and p_k = dilation * index - (dilation*(kernel_size-1))//2.
Points are ordered x-major as in the released code: point ``k = kx * kernel_size + ky``;
offsets are (x, y) pairs.

Boundary rule (the released kernel's, forward and backward): a point is used only when
its location (x, y) satisfies ``-1 < x < W`` and ``-1 < y < H``; otherwise it contributes
nothing and receives no gradient. A used point is interpolated from its four neighbours
``floor(loc)`` and ``floor(loc) + 1``, each read as zero outside the image. This differs
from plain zero padding only at a location of exactly -1, where the value is 0 either way
but zero padding would give the offset a gradient: a fresh layer (zero offsets, padding 1)
puts the top grid row of every top-row output, and the left grid column of every
left-column output, exactly there. (The released pure-PyTorch fallback,
``dcnv3_core_pytorch``, samples the zero-padded input with ``grid_sample`` and so does
not follow this rule; the CUDA op is the one the released models were trained with.) At
integer locations the offset gradient is the one-sided derivative towards larger
coordinates, as ``floor`` implies.

The bilinear sampling is written out (floor, one gather of the four corners) rather than
through ``grid_sample`` (as the released PyTorch fallback does): its normalised grid does
not round-trip integer pixel locations exactly, which moves samples at 0, size-1 and size
to the other side of a pixel line and flips the one-sided offset gradient there.

Memory: the gathered corner values (4*N*Ho*Wo*K*C numbers) are the big intermediate. The
autograd function below never stores them for backward (it recomputes them chunk by
chunk), and the batch is processed in chunks bounded by ``_CHUNK_ELEMENTS`` so that a
layer never holds more than one chunk of them at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on gathered values materialised at once (elements). 2**26 fp32 = 256 MiB.
_CHUNK_ELEMENTS = 1 << 26
# All four bilinear corners of every point are gathered at once (and kept by autograd
# while a chunk is recomputed for backward): chunks are sized for this many copies.
_CORNERS = 4


def _grid_coords(
    in_size: int, out_size: int, kernel_size: int, stride: int, padding: int, dilation: int,
    offset_scale: float, device: torch.device, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates along one axis: output centres (out_size,) and grid taps (kernel,)."""
    half = (dilation * (kernel_size - 1)) // 2
    centres = torch.arange(out_size, device=device, dtype=dtype) * stride + (half - padding)
    taps = (torch.arange(kernel_size, device=device, dtype=dtype) * dilation - half) * offset_scale
    return centres, taps


def sampling_locations(
    x: torch.Tensor, offset: torch.Tensor, kernel_size: int, stride: int, padding: int,
    dilation: int, groups: int, offset_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute sampling positions (x, y) in pixels of every (position, group, point), the
    released op's grid rule; shared by the reference and the CPU fused op."""
    """Pixel coordinates (loc_x, loc_y) of every point, each (N, Ho, Wo, G, K)."""
    n, h, w, _ = x.shape
    _, ho, wo, _ = offset.shape
    k = kernel_size * kernel_size
    cy, ty = _grid_coords(h, ho, kernel_size, stride, padding, dilation, offset_scale,
                          x.device, x.dtype)
    cx, tx = _grid_coords(w, wo, kernel_size, stride, padding, dilation, offset_scale,
                          x.device, x.dtype)
    # x-major point order: k = kx * kernel_size + ky.
    tap_x = tx[:, None].expand(kernel_size, kernel_size).reshape(k)
    tap_y = ty[None, :].expand(kernel_size, kernel_size).reshape(k)
    off = offset.view(n, ho, wo, groups, k, 2) * offset_scale
    loc_x = cx.view(1, 1, wo, 1, 1) + tap_x + off[..., 0]
    loc_y = cy.view(1, ho, 1, 1, 1) + tap_y + off[..., 1]
    return loc_x, loc_y


def _corner_patches(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Every 2x2 neighbourhood of the input padded by one zero pixel, one row each.

    Row ``((n * G + g) * (H + 1) + i) * (W + 1) + j`` holds, for group g, the pixels
    (i-1, j-1), (i-1, j), (i, j-1), (i, j) of the unpadded image (zero outside it), i.e.
    the four bilinear corners of any location whose floor is (i-1, j-1). The table has
    about 4x the input's size, far less than the K-times-larger sampled values.
    """
    n, h, w, c = x.shape
    gc = c // groups
    padded = F.pad(x.view(n, h, w, groups, gc).permute(0, 3, 1, 2, 4), (0, 0, 1, 1, 1, 1))
    corners = (padded[:, :, :-1, :-1], padded[:, :, :-1, 1:],
               padded[:, :, 1:, :-1], padded[:, :, 1:, 1:])
    return torch.stack(corners, -2).reshape(n * groups * (h + 1) * (w + 1), 4 * gc)


def _sample_chunk(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int, offset_scale: float,
) -> torch.Tensor:
    """DCNv3 on one batch chunk, differentiable by autograd (explicit bilinear gathers)."""
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    k = kernel_size * kernel_size
    gc = c // groups
    loc_x, loc_y = sampling_locations(x, offset, kernel_size, stride, padding, dilation,
                                       groups, offset_scale)
    # The released kernel's test before it samples a point (see the module docstring).
    used = (loc_x > -1) & (loc_x < w) & (loc_y > -1) & (loc_y < h)
    # Unused points get weight 0 and a harmless location, so that neither a far-away nor a
    # NaN location reaches the index arithmetic or the gradients.
    weight = torch.where(used, mask.view(n, ho, wo, groups, k), 0.0)
    loc_x = torch.where(used, loc_x, 0.0)
    loc_y = torch.where(used, loc_y, 0.0)
    x0, y0 = loc_x.floor(), loc_y.floor()
    fx, fy = loc_x - x0, loc_y - y0  # floor has zero gradient: d/dloc is one-sided (right)
    # A used point has floor in [-1, size-1]: its patch (floor + 1) always exists.
    image = (torch.arange(n, device=x.device).view(n, 1, 1, 1, 1) * groups
             + torch.arange(groups, device=x.device).view(1, 1, 1, groups, 1))
    rows = (image * (h + 1) + y0.long() + 1) * (w + 1) + x0.long() + 1
    values = _corner_patches(x, groups).index_select(0, rows.reshape(-1))
    coefs = torch.stack(((1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx), -1)
    coefs = coefs * weight[..., None]  # (n, ho, wo, groups, k, 4 corners)
    # One (1 x 4K) @ (4K x gc) product per position and group.
    out = torch.bmm(coefs.reshape(-1, 1, 4 * k), values.view(-1, 4 * k, gc))
    return out.view(n, ho, wo, c)


def _chunks(batch: int, per_sample_elements: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample_elements))
    return [slice(i, min(batch, i + step)) for i in range(0, batch, step)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU ops compute in for inputs of ``dtype``."""
    # Half types are computed in fp32 (as the fused kernels accumulate in fp32).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _DCNv3Reference(torch.autograd.Function):
    """Chunked forward; backward recomputes the sampled values per (smaller) chunk."""

    @staticmethod
    def forward(ctx, x, offset, mask, kernel_size, stride, padding, dilation, groups,
                offset_scale):
        ctx.params = (kernel_size, stride, padding, dilation, groups, offset_scale)
        ctx.save_for_backward(x, offset, mask)
        n, ho, wo, _ = offset.shape
        out = x.new_empty((n, ho, wo, x.shape[-1]))
        if x.is_meta:  # no values to compute: shapes and saved tensors are all a probe sees
            return out
        cd = compute_dtype(x.dtype)
        per_sample = ho * wo * kernel_size * kernel_size * x.shape[-1]
        # in compute_dtype whatever autocast region calls it (an M3I teacher's bf16
        # forward): autocast would otherwise run the bmm below in its 16-bit type
        with torch.autocast(x.device.type, enabled=False):
            for sl in _chunks(n, _CORNERS * per_sample):
                out[sl] = _sample_chunk(x[sl].to(cd), offset[sl].to(cd), mask[sl].to(cd),
                                        *ctx.params).to(x.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, offset, mask = ctx.saved_tensors
        kernel_size = ctx.params[0]
        wants = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(t) if need else None for t, need in zip((x, offset, mask), wants)]
        if x.is_meta:
            return (*grads, None, None, None, None, None, None)
        cd = compute_dtype(x.dtype)
        per_sample = offset.shape[1] * offset.shape[2] * kernel_size**2 * x.shape[-1]
        for sl in _chunks(x.shape[0], _CORNERS * per_sample):
            inputs = [t[sl].detach().to(cd).requires_grad_(need)
                      for t, need in zip((x, offset, mask), wants)]
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                out = _sample_chunk(*inputs, *ctx.params)
                needed = [t for t in inputs if t.requires_grad]
                chunk_grads = iter(torch.autograd.grad(out, needed, grad_out[sl].to(cd)))
            for g, need in zip(grads, wants):
                if need:
                    g[sl] = next(chunk_grads).to(g.dtype)
        return (*grads, None, None, None, None, None, None)


def dcnv3_reference(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int, offset_scale: float,
) -> torch.Tensor:
    """DCNv3 in pure PyTorch (arguments already validated by ``ops.dcnv3.dcnv3``)."""
    return _DCNv3Reference.apply(x, offset, mask, kernel_size, stride, padding, dilation,
                                 groups, offset_scale)
