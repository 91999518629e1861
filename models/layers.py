"""Building blocks of InternImage: stem, downsampling, MLP, and key-compatible norms.

The released checkpoints wrap every norm in a small ``nn.Sequential`` together with the
permutes it needs, so parameter keys carry an index (``norm1.0.weight``, ``norm.1.bias``).
The helpers here reproduce exactly those positions.
"""

from __future__ import annotations

import torch
from torch import nn


class ToChannelsFirst(nn.Module):
    """NHWC -> NCHW (a view; no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToChannelsLast(nn.Module):
    """NCHW -> NHWC (a view; no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def layer_norm(
    channels: int, from_channels_first: bool = False, eps: float = 1e-6
) -> nn.Sequential:
    """LayerNorm over the channel dim of an NHWC tensor (optionally permuting NCHW in first)."""
    layers: list[nn.Module] = [ToChannelsLast()] if from_channels_first else []
    return nn.Sequential(*layers, nn.LayerNorm(channels, eps=eps))


def batch_norm(channels: int, to_channels_last: bool = False) -> nn.Sequential:
    """BatchNorm2d on an NCHW tensor (optionally permuting the result to NHWC)."""
    layers: list[nn.Module] = [nn.BatchNorm2d(channels)]
    if to_channels_last:
        layers.append(ToChannelsLast())
    return nn.Sequential(*layers)


class StemLayer(nn.Module):
    """Two stride-2 3x3 convs (C/2 then C) with BN; NCHW image in, NHWC features out."""

    def __init__(self, in_chans: int = 3, out_chans: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = batch_norm(out_chans // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = batch_norm(out_chans, to_channels_last=True)

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
