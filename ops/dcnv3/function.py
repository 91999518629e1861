"""The public DCNv3 op: argument checks and backend dispatch."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ops.dcnv3.reference import dcnv3_reference

Backend = Callable[..., torch.Tensor]

# name -> implementation; fused backends add themselves when their module imports cleanly.
_BACKENDS: dict[str, Backend] = {"reference": dcnv3_reference}


def register_backend(name: str, fn: Backend) -> None:
    """Make ``fn`` selectable as ``dcnv3(..., backend=name)``."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    """Names accepted by ``dcnv3(backend=...)`` besides ``"auto"``."""
    _load_optional_backends()
    return sorted(_BACKENDS)


def _load_optional_backends() -> None:
    try:  # the Triton backend lands with its own module; absent or broken -> not offered
        import ops.dcnv3.triton_backend  # noqa: F401
    except ImportError:
        pass


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """Output length along one axis (the released op's formula)."""
    return (size + 2 * padding - (dilation * (kernel_size - 1) + 1)) // stride + 1


def _pick_backend(backend: str, device: torch.device) -> Backend:
    if backend == "auto":
        _load_optional_backends()
        if device.type == "cuda" and "triton" in _BACKENDS:
            return _BACKENDS["triton"]
        return _BACKENDS["reference"]
    if backend not in _BACKENDS:
        _load_optional_backends()
    if backend not in _BACKENDS:
        raise ValueError(
            f"dcnv3: unknown backend {backend!r}; available: {['auto', *available_backends()]}"
        )
    return _BACKENDS[backend]


def _check(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, stride: int,
    padding: int, dilation: int, groups: int,
) -> None:
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


def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    groups: int,
    offset_scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Deformable convolution v3 with the released op's exact semantics.

    Args:
        input: (N, H, W, C) channels-last, unpadded.
        offset: (N, Ho, Wo, G*K*2) learned offsets as (x, y) pairs, point-major per group
            (point ``k = kx * kernel_size + ky``).
        mask: (N, Ho, Wo, G*K) sampling weights (already softmax-normalised over K).
        kernel_size, stride, padding, dilation: the regular grid, as in a convolution.
        groups: G; each group of C/G channels shares offsets and weights.
        offset_scale: scales both the regular grid and the learned offsets.
        backend: ``"reference"`` (pure PyTorch), ``"triton"`` (fused, when installed) or
            ``"auto"`` (the best available for the tensor's device).

    Returns:
        (N, Ho, Wo, C) in the input's dtype.
    """
    _check(input, offset, mask, kernel_size, stride, padding, dilation, groups)
    fn = _pick_backend(backend, input.device)
    return fn(input, offset, mask, kernel_size, stride, padding, dilation, groups,
              float(offset_scale))
