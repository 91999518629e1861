"""Building blocks of InternImage: stem, downsampling, MLP, and key-compatible norms.

The released checkpoints wrap every norm in a small ``nn.Sequential`` together with the
permutes it needs, so parameter keys carry an index (``norm1.0.weight``, ``norm.1.bias``).
The helpers here reproduce exactly those positions.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn


def trunc_normal_fp32_(weight: torch.Tensor, std: float = 0.02) -> None:
    """timm's ``trunc_normal_`` (bounds -2..2, absolute) drawn in float32 and copied into
    ``weight`` whatever its dtype.

    Why: under DeepSpeed's ``zero.Init`` with bf16 (the pre-training recipes: ZeRO-3,
    bf16) parameters are created in bf16, and ``trunc_normal_`` run on a bf16 tensor maps
    uniform draws through ``erfinv``, which in bf16 returns +-inf near +-1; the clamp to
    the bounds turns those into +-2.0: about 0.2% of every linear weight at 2.0, 100
    standard deviations out (1,965 of a 1000x1000 tensor; std 0.09 instead of 0.02).
    Drawn in float32 from the same random stream, the weight is the plain float32 build's
    rounded to ``weight``'s dtype."""
    if weight.dtype == torch.float32:
        trunc_normal_(weight, std=std)
        return
    # Tensor.new_empty: zero.Init replaces torch.empty (and zeros, ones, ...) with
    # constructors that cast every floating tensor to its dtype, float32 requests too
    draw = weight.new_empty(weight.shape, dtype=torch.float32)
    trunc_normal_(draw, std=std)
    with torch.no_grad():
        weight.copy_(draw)


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW (a view; no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC (a view; no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def layer_norm(
    channels: int, from_channels_first: bool = False, to_channels_first: bool = False,
    eps: float = 1e-6,
) -> nn.Sequential:
    """LayerNorm over the channel dim, with the permutes its input/output layout needs.

    Channels-last in and out gives ``[LayerNorm]`` (keys ``0.*``); a channels-first input
    adds ``ToChannelsLast`` in front (keys ``1.*``) and a channels-first output adds
    ``ToChannelsFirst`` behind, as ``build_norm_layer(dim, 'LN', in_format, out_format)``
    of the released model does.
    """
    layers: list[nn.Module] = [ToChannelsLast()] if from_channels_first else []
    layers.append(nn.LayerNorm(channels, eps=eps))
    if to_channels_first:
        layers.append(ToChannelsFirst())
    return nn.Sequential(*layers)


def batch_norm(channels: int) -> nn.Sequential:
    """BatchNorm2d on an NCHW tensor, wrapped like the released head's norm (keys ``0.*``)."""
    return nn.Sequential(nn.BatchNorm2d(channels))


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs (C/2 then C), each followed by a LayerNorm; NCHW image in,
    NHWC features out.

    The released models build the stem with ``norm_layer='LN'`` (every released config and
    Hugging Face ``config.json``), so the norms are LayerNorms between permutes with keys
    ``norm1.1.*`` and ``norm2.1.*``; the reference class's BatchNorm default is never used.
    """

    def __init__(self, in_chans: int = 3, out_chans: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = layer_norm(out_chans // 2, from_channels_first=True, to_channels_first=True)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = layer_norm(out_chans, from_channels_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 conv (C -> 2C, no bias) + LayerNorm; NHWC in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = layer_norm(2 * channels, from_channels_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class MLPLayer(nn.Module):
    """Linear -> GELU -> Linear on the channel dim (NHWC)."""

    def __init__(self, channels: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
