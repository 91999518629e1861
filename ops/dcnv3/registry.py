"""The leaf of the DCNv3 op: the backend registry and the argument checks every backend
shares. It imports no backend, so a backend module (``triton_backend``) can register itself
here without importing ``function`` (which imports the backends): no import circle."""

from __future__ import annotations

from collections.abc import Callable

import torch

Backend = Callable[..., torch.Tensor]

# name -> implementation; every backend module adds itself on import (function.py adds
# "reference" and "compiled"; triton_backend.py adds "triton" when Triton imports cleanly).
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Backend) -> None:
    """Make ``fn`` selectable as ``dcnv3(..., backend=name)``."""
    BACKENDS[name] = fn


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """Output length along one axis (the released op's formula)."""
    return (size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1


def check_inputs(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int,
) -> None:
    """Raise a ValueError/TypeError naming the argument when the op's inputs do not fit."""
    for name, t in (("input", x), ("offset", offset), ("mask", mask)):
        if t.dim() != 4:
            raise ValueError(f"dcnv3: {name} must be 4-D channels-last (N,H,W,C), "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"dcnv3: {name} must be floating point, got {t.dtype}")
    if offset.dtype != x.dtype or mask.dtype != x.dtype:
        raise TypeError(f"dcnv3: input, offset and mask must share a dtype, got {x.dtype}, "
                        f"{offset.dtype}, {mask.dtype}")
    if not (offset.device == x.device == mask.device):
        raise ValueError("dcnv3: input, offset and mask must be on the same device")
    for name, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1),
                         ("dilation", dilation, 1), ("padding", padding, 0), ("groups", groups, 1)):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"dcnv3: {name} must be an int >= {low}, got {v!r}")
    n, h, w, c = x.shape
    if c % groups:
        raise ValueError(f"dcnv3: channels ({c}) must be divisible by groups ({groups})")
    ho = output_size(h, kernel_size, stride, padding, dilation)
    wo = output_size(w, kernel_size, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"dcnv3: input {h}x{w} is too small for kernel {kernel_size}, "
                         f"dilation {dilation}, padding {padding}")
    k = kernel_size * kernel_size
    want_offset, want_mask = (n, ho, wo, groups * k * 2), (n, ho, wo, groups * k)
    if tuple(offset.shape) != want_offset:
        raise ValueError(f"dcnv3: offset must have shape {want_offset} (N,Ho,Wo,G*K*2), "
                         f"got {tuple(offset.shape)}")
    if tuple(mask.shape) != want_mask:
        raise ValueError(f"dcnv3: mask must have shape {want_mask} (N,Ho,Wo,G*K), "
                         f"got {tuple(mask.shape)}")
