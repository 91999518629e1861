"""Pure-PyTorch DCNv3: the semantics every other backend is tested against.

The released op's definition, written with ``grid_sample``. For output position p0 of
group g, with the K = kernel_size**2 points of the regular grid p_k:

    y_g(p0) = sum_k mask_gk(p0) * bilinear(x_g, p0 + offset_scale * (p_k + offset_gk(p0)))

in pixel coordinates of the unpadded input, where p0 = (dilation*(kernel_size-1))//2 -
padding + stride * output_index and p_k = dilation * index - (dilation*(kernel_size-1))//2.
Bilinear sampling sees zeros outside the image (the released op pads with zeros first,
which is the same thing). Points are ordered x-major as in the released code: point
``k = kx * kernel_size + ky``; offsets are (x, y) pairs.

Memory: the sampled values (N*Ho*Wo*K*C numbers) are the big intermediate. The autograd
function below never stores them for backward (it recomputes them chunk by chunk), and the
forward processes the batch in chunks bounded by ``_CHUNK_ELEMENTS`` so that a layer never
holds more than one chunk of sampled values at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on sampled values materialised at once (elements). 2**26 fp32 = 256 MiB.
_CHUNK_ELEMENTS = 1 << 26


def _grid_coords(
    in_size: int, out_size: int, kernel_size: int, stride: int, padding: int, dilation: int,
    offset_scale: float, device: torch.device, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates along one axis: output centres (out_size,) and grid taps (kernel,)."""
    half = (dilation * (kernel_size - 1)) // 2
    centres = torch.arange(out_size, device=device, dtype=dtype) * stride + (half - padding)
    taps = (torch.arange(kernel_size, device=device, dtype=dtype) * dilation - half) * offset_scale
    return centres, taps


def _sample_chunk(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int, offset_scale: float,
) -> torch.Tensor:
    """DCNv3 on one batch chunk, differentiable through ``grid_sample``."""
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    k = kernel_size * kernel_size
    gc = c // groups
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
    # grid_sample(align_corners=False): pixel i covers [i, i+1) in units of 1/size.
    grid = torch.stack(((loc_x + 0.5) * (2.0 / w) - 1.0, (loc_y + 0.5) * (2.0 / h) - 1.0), -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * groups, ho * wo, k, 2)
    value = x.permute(0, 3, 1, 2).reshape(n * groups, gc, h, w)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (n*g, gc, ho*wo, k)
    weights = mask.view(n, ho * wo, groups, k).permute(0, 2, 1, 3).reshape(n * groups, ho * wo, k)
    out = torch.einsum("bcpk,bpk->bpc", sampled, weights)  # (n*g, ho*wo, gc)
    return out.view(n, groups, ho, wo, gc).permute(0, 2, 3, 1, 4).reshape(n, ho, wo, c)


def _chunks(batch: int, per_sample_elements: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample_elements))
    return [slice(i, min(batch, i + step)) for i in range(0, batch, step)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are computed in fp32 (as the fused kernels accumulate in fp32).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _DCNv3Reference(torch.autograd.Function):
    """Chunked forward; backward recomputes the sampled values per chunk."""

    @staticmethod
    def forward(ctx, x, offset, mask, kernel_size, stride, padding, dilation, groups,
                offset_scale):
        ctx.params = (kernel_size, stride, padding, dilation, groups, offset_scale)
        ctx.save_for_backward(x, offset, mask)
        n, ho, wo, _ = offset.shape
        out = x.new_empty((n, ho, wo, x.shape[-1]))
        cd = _compute_dtype(x.dtype)
        per_sample = ho * wo * kernel_size * kernel_size * x.shape[-1]
        for sl in _chunks(n, per_sample):
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
        cd = _compute_dtype(x.dtype)
        per_sample = offset.shape[1] * offset.shape[2] * kernel_size**2 * x.shape[-1]
        for sl in _chunks(x.shape[0], per_sample):
            inputs = [t[sl].detach().to(cd).requires_grad_(need)
                      for t, need in zip((x, offset, mask), wants)]
            with torch.enable_grad():
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
