"""The DCNv3 layer InternImage uses (parameter names match the released checkpoints)."""

from __future__ import annotations

from contextlib import nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ops.dcnv3.function import dcnv3, pick_backend

# reset_parameters re-initialises its child Linears, which needs their whole tensors. A
# wrapper that partitions parameters as modules are built (DeepSpeed's zero.Init, entered
# by pretrain/) sets a factory here: params -> context in which they are whole. ops/ never
# imports DeepSpeed; unset, re-initialisation runs as plain PyTorch.
INIT_GATHER: ContextVar = ContextVar("dcnv3_init_gather", default=None)


class _ChannelsFirstToLastLayerNorm(nn.Sequential):
    """Permute NCHW -> NHWC, then LayerNorm; keys ``1.weight``/``1.bias`` as released."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(_ToChannelsLast(), nn.LayerNorm(channels, eps=eps))


class _ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class DCNv3(nn.Module):
    """DCNv3 layer: input projection, learned offsets and softmax weights, sampled sum,
    optional centre-feature gate, output projection. Channels-last in and out.

    Offsets and mask logits are computed from the un-projected input through a depthwise
    conv -> LayerNorm -> GELU; the sampled sum runs over the projected input.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        center_feature_scale: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if channels % group:
            raise ValueError(f"DCNv3: channels ({channels}) must be divisible by group ({group})")
        dw_kernel_size = dw_kernel_size or kernel_size
        self.channels, self.group, self.group_channels = channels, group, channels // group
        self.kernel_size, self.stride, self.pad, self.dilation = kernel_size, stride, pad, dilation
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.backend = backend
        points = kernel_size * kernel_size
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
                      groups=channels),
            _ChannelsFirstToLastLayerNorm(channels),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero offsets and mask logits: a fresh layer samples the regular grid uniformly."""
        linears = (self.offset, self.mask, self.input_proj, self.output_proj)
        gather = INIT_GATHER.get()
        with gather([p for lin in linears for p in lin.parameters()]) if gather else nullcontext():
            for lin in (self.offset, self.mask):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            for lin in (self.input_proj, self.output_proj):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = x.shape
        x_proj = self.input_proj(x)
        feat = self.dw_conv(x.permute(0, 3, 1, 2))
        offset = self.offset(feat)
        # The Triton backend can normalise the mask inside its kernel (attribute set by
        # ops.dcnv3.triton_backend); that skips materialising the mask and its gradient.
        fused_softmax = getattr(pick_backend(self.backend, x.device), "fused_softmax", None)
        if fused_softmax is not None:
            logits = self.mask(feat).reshape(n, h, w, -1).to(x_proj.dtype)
            out = fused_softmax(x_proj, offset.to(x_proj.dtype), logits,
                                kernel_size=self.kernel_size, stride=self.stride,
                                padding=self.pad, dilation=self.dilation, groups=self.group,
                                offset_scale=self.offset_scale)
        else:
            mask = F.softmax(self.mask(feat).view(n, h, w, self.group, -1), dim=-1)
            mask = mask.reshape(n, h, w, -1).to(x_proj.dtype)
            out = dcnv3(x_proj, offset.to(x_proj.dtype), mask, kernel_size=self.kernel_size,
                        stride=self.stride, padding=self.pad, dilation=self.dilation,
                        groups=self.group, offset_scale=self.offset_scale,
                        backend=self.backend)
        if self.center_feature_scale:
            gate = torch.sigmoid(F.linear(feat, self.center_feature_scale_proj_weight,
                                          self.center_feature_scale_proj_bias))
            gate = gate.repeat_interleave(self.group_channels, dim=-1)
            out = out * (1 - gate) + x_proj * gate
        return self.output_proj(out)
