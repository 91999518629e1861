"""The Triton DCNv3 backend, registered as PyTorch custom ops.

``torch.library.custom_op`` (with a fake implementation and a registered autograd
formula) makes the fused kernels opaque to torch.compile, so ``fullgraph=True`` traces
through them, and lets activation checkpointing and DeepSpeed treat them like any aten op.
(``triton_op``/``wrap_triton`` would let Inductor see inside, but they fail under
torch.compile for CPU tensors, which the interpreter-based tests use.)

Importing this module raises ImportError when triton is missing; ``ops.dcnv3.function``
then simply does not offer the ``"triton"`` backend. On import it registers ``"triton"``
and exposes ``dcnv3_softmax``, the variant that takes mask *logits* and applies the
softmax over the K points inside the kernel.

Tensors must be on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set before triton was
first imported (Triton's interpreter; slow, for tests).
"""

from __future__ import annotations

import functools

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ops.dcnv3.triton_backend needs the `triton` package") from exc

import torch

from ops.dcnv3 import triton_kernels as kernels
from ops.dcnv3.registry import check_inputs, register_backend

# Tests set this to fill every output the kernels must fully overwrite with NaN, so that
# an element a kernel forgets to write shows up instead of silently reading as zero.
POISON_OUTPUTS = False


# The oldest NVIDIA GPUs these kernels compile for: the backward's relaxed atomics (no
# fence, as the released op's atomicAdd) are PTX ``.relaxed``, which ptxas refuses below
# sm_70 ("Feature '.relaxed' requires .target sm_70 or higher", Triton 3.6 and 3.8; the
# forward would compile for sm_60, so a Pascal GPU failed at its first backward).
# tests/test_dcnv3_triton.py compiles the backward at both sides of this bound.
MIN_CAPABILITY = (7, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int] | None:
    """Compute capability of CUDA device ``index``; None on ROCm (Triton's own support)."""
    if torch.version.hip is not None:
        return None
    return tuple(torch.cuda.get_device_capability(index))


def supports(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: a CUDA GPU of ``MIN_CAPABILITY`` or newer
    (or a ROCm one), or the CPU under Triton's interpreter."""
    if device.type == "cpu":
        return kernels.INTERPRET
    if device.type != "cuda":
        return False
    capability = _capability(torch.cuda.current_device() if device.index is None
                             else device.index)
    return capability is None or capability >= MIN_CAPABILITY


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        if not supports(t.device):
            have = ".".join(map(str, _capability(t.device.index or 0) or ()))
            need = ".".join(map(str, MIN_CAPABILITY))
            raise RuntimeError(
                f"dcnv3 backend 'triton' needs a GPU of compute capability {need} or "
                f"newer; {t.device} has {have}: use backend='reference'")
        return
    if t.device.type == "cpu" and kernels.INTERPRET:
        return
    hint = ("set TRITON_INTERPRET=1 before importing triton to run on CPU (slow)"
            if t.device.type == "cpu" else "move the tensors to a CUDA device")
    raise RuntimeError(f"dcnv3 backend 'triton' needs CUDA tensors, got device "
                       f"{t.device}; {hint}, or use backend='reference'")


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    # Triton's interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest), which
    # doubles the rounding error; there the kernels write fp32 and torch rounds instead.
    return torch.float32 if kernels.INTERPRET and dtype == torch.bfloat16 else dtype


def _alloc(shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Output buffer the kernel fully overwrites (NaN-filled when POISON_OUTPUTS)."""
    dtype = _kernel_dtype(like.dtype)
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@torch.library.custom_op("internimage::dcnv3_forward", mutates_args=())
def _forward_op(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int,
    stride: int, padding: int, dilation: int, groups: int, offset_scale: float,
    softmax: bool,
) -> torch.Tensor:
    _check_device(input)
    n, ho, wo, _ = offset.shape
    out = _alloc((n, ho, wo, input.shape[-1]), input)
    kernels.dcnv3_forward(input, offset, mask, out, kernel_size, stride, padding, dilation,
                          groups, offset_scale, softmax)
    return out.to(input.dtype)


@_forward_op.register_fake
def _forward_fake(input, offset, mask, kernel_size, stride, padding, dilation, groups,
                  offset_scale, softmax):
    n, ho, wo, _ = offset.shape
    return input.new_empty((n, ho, wo, input.shape[-1]))


@torch.library.custom_op("internimage::dcnv3_backward", mutates_args=())
def _backward_op(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, grad_out: torch.Tensor,
    kernel_size: int, stride: int, padding: int, dilation: int, groups: int,
    offset_scale: float, softmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(input)
    # Atomic adds accumulate in fp32 (fp64 for fp64) and are cast once at the end, so
    # half-precision inputs do not lose the many small contributions per pixel.
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    grad_input = torch.zeros(input.shape, dtype=acc_dtype, device=input.device)
    grad_offset = _alloc(offset.shape, offset)
    grad_mask = _alloc(mask.shape, mask)
    kernels.dcnv3_backward(input, offset, mask, grad_out, grad_input, grad_offset, grad_mask,
                           kernel_size, stride, padding, dilation, groups, offset_scale,
                           softmax)
    return grad_input.to(input.dtype), grad_offset.to(offset.dtype), grad_mask.to(mask.dtype)


@_backward_op.register_fake
def _backward_fake(input, offset, mask, grad_out, kernel_size, stride, padding, dilation,
                   groups, offset_scale, softmax):
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output) -> None:
    input, offset, mask, *params = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.params = params


def _backward(ctx, grad_out):
    input, offset, mask = ctx.saved_tensors
    grads = torch.ops.internimage.dcnv3_backward(input, offset, mask, grad_out.contiguous(),
                                                 *ctx.params)
    return (*grads, None, None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def dcnv3_triton(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_size: int,
    stride: int, padding: int, dilation: int, groups: int, offset_scale: float,
) -> torch.Tensor:
    """Fused DCNv3 (arguments already validated by ``ops.dcnv3.dcnv3``)."""
    return torch.ops.internimage.dcnv3_forward(
        input.contiguous(), offset.contiguous(), mask.contiguous(), kernel_size, stride,
        padding, dilation, groups, float(offset_scale), False)


def dcnv3_softmax(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    groups: int,
    offset_scale: float = 1.0,
) -> torch.Tensor:
    """DCNv3 with the mask softmax fused in: ``mask_logits`` (N, Ho, Wo, G*K) are raw
    logits, normalised over the K points of each group inside the kernel.

    Equal to ``dcnv3(input, offset, softmax(mask_logits per group), ...)`` but never
    materialises the normalised mask (nor its gradient) in memory. Triton only.
    """
    check_inputs(input, offset, mask_logits, kernel_size, stride, padding, dilation, groups)
    return torch.ops.internimage.dcnv3_forward(
        input.contiguous(), offset.contiguous(), mask_logits.contiguous(), kernel_size,
        stride, padding, dilation, groups, float(offset_scale), True)


# The module looks for this attribute on the resolved backend to use the fused softmax.
dcnv3_triton.fused_softmax = dcnv3_softmax  # type: ignore[attr-defined]
# what ``auto`` asks before it takes this backend on a device
dcnv3_triton.supports = supports  # type: ignore[attr-defined]

register_backend("triton", dcnv3_triton)
