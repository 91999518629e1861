"""The pure-PyTorch DCNv3 op computes half-precision inputs in fp32 (ops/dcnv3/reference.py
``compute_dtype``, as the released CUDA kernel accumulates in fp32) also inside an autocast
region: the M3I teacher runs its forward under torch.autocast (pretrain/m3i/ema.py), which
would otherwise run the op's inner bmm in bf16."""

from __future__ import annotations

import torch

from ops.dcnv3.reference import dcnv3_reference

ARGS = (3, 1, 1, 1, 2, 1.0)  # kernel 3, stride 1, pad 1, dilation 1, 2 groups, scale 1


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 9, 32, generator=g).bfloat16().requires_grad_()
    offset = (torch.randn(2, 9, 9, 2 * 9 * 2, generator=g) * 2).bfloat16().requires_grad_()
    mask = torch.rand(2, 9, 9, 2 * 9, generator=g).bfloat16().requires_grad_()
    return x, offset, mask


def _run(autocast: bool):
    x, offset, mask = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = dcnv3_reference(x, offset, mask, *ARGS)
    out.float().square().sum().backward()
    return out, x.grad, offset.grad, mask.grad


def test_autocast_does_not_change_the_reference_op():
    for plain, cast in zip(_run(False), _run(True)):
        assert cast.dtype == torch.bfloat16
        torch.testing.assert_close(cast, plain, rtol=0, atol=0)
