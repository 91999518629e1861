"""The public DCNv3 op: backend dispatch (the registry and checks live in ``registry``)."""

from __future__ import annotations

import torch

from ops.dcnv3.cpu_fused import dcnv3_compiled, worth_compiling
from ops.dcnv3.reference import dcnv3_reference
from ops.dcnv3.registry import BACKENDS as _BACKENDS
from ops.dcnv3.registry import Backend, check_inputs, output_size, register_backend

__all__ = ["available_backends", "dcnv3", "output_size", "register_backend"]

# "reference": eager, keeps only the op's inputs for backward (recomputes the samples);
# "compiled": the same op fused by torch.compile (ops.dcnv3.cpu_fused), made for CPU.
register_backend("reference", dcnv3_reference)
register_backend("compiled", dcnv3_compiled)


def available_backends() -> list[str]:
    """Names accepted by ``dcnv3(backend=...)`` besides ``"auto"``."""
    _load_optional_backends()
    return sorted(_BACKENDS)


def _load_optional_backends() -> None:
    try:  # the Triton backend lands with its own module; absent or broken -> not offered
        import ops.dcnv3.triton_backend  # noqa: F401
    except ImportError:
        pass


def _cpu_auto(
    x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int, *params,
) -> torch.Tensor:
    """``auto`` on CPU: the compiled fused op for large layers (faster than the released
    grid_sample fallback, and leaner), the eager reference for small ones (no compile).
    Inside a caller's ``torch.compile`` every layer takes the fused op, whose loops that
    compile traces and fuses: the reference's backward calls ``torch.autograd.grad``,
    which Dynamo does not trace (``fullgraph=True`` would fail on small layers)."""
    if torch.compiler.is_compiling() or worth_compiling(x, offset, kernel_size):
        return _BACKENDS["compiled"](x, offset, mask, kernel_size, *params)
    return _BACKENDS["reference"](x, offset, mask, kernel_size, *params)


def pick_backend(backend: str, device: torch.device) -> Backend:
    """The backend object ``backend`` ("auto": the fastest available) names on ``device``."""
    if backend == "auto":
        _load_optional_backends()
        if device.type == "cuda" and "triton" in _BACKENDS:
            triton = _BACKENDS["triton"]
            if triton.supports(device):  # else a GPU older than its kernels compile for
                return triton
        if device.type == "cpu":
            return _cpu_auto
        return _BACKENDS["reference"]
    if backend not in _BACKENDS:
        _load_optional_backends()
    if backend not in _BACKENDS:
        raise ValueError(
            f"dcnv3: unknown backend {backend!r}; available: {['auto', *available_backends()]}"
        )
    return _BACKENDS[backend]


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
        backend: ``"reference"`` (pure PyTorch, eager, memory-lean), ``"compiled"`` (the
            same op fused by torch.compile, for CPU), ``"triton"`` (fused GPU kernels,
            when installed) or ``"auto"``: Triton on CUDA GPUs it compiles for
            (``triton_backend.MIN_CAPABILITY`` on; ``"reference"`` on older ones); on CPU
            ``"compiled"`` for layers of at least ``cpu_fused.COMPILE_MIN_SAMPLES``
            sampled values, else ``"reference"``.

    Returns:
        (N, Ho, Wo, C) in the input's dtype.
    """
    check_inputs(input, offset, mask, kernel_size, stride, padding, dilation, groups)
    fn = pick_backend(backend, input.device)
    return fn(input, offset, mask, kernel_size, stride, padding, dilation, groups,
              float(offset_scale))
