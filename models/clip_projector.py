"""InternImage-H's "CLIP projector": attention pooling of the last stages' tokens.

One query (the mean token) attends over all tokens; the result is projected to the CLIP
embedding width. Parameter names follow the released checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import layer_norm


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over ``k``/``v`` with separate q/k/v biases."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.k_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.proj = nn.Linear(dim, out_dim)

    def _heads(self, x: torch.Tensor, lin: nn.Linear, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        return F.linear(x, lin.weight, bias).view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._heads(x, self.q, self.q_bias)
        k = self._heads(k, self.k, self.k_bias)
        v = self._heads(v, self.v, self.v_bias)
        out = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim ** -0.5
        return self.proj(out.transpose(1, 2).flatten(2))


class AttentionPoolingBlock(nn.Module):
    """Pools (B, N, dim) tokens into one (B, out_dim) embedding."""

    def __init__(self, dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.norm1_q = layer_norm(dim)
        self.norm1_k = layer_norm(dim)
        self.norm1_v = layer_norm(dim)
        self.cross_dcn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.norm1_q(x.mean(1, keepdim=True))
        return self.cross_dcn(query, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


# Widths of the released InternImage-H projector.
TOKEN_DIM = 1024  # token width after fusing stages 3 and 4
EMBED_DIM = 768  # CLIP embedding width
NUM_HEADS = 16
UPSAMPLE = 2  # stage 4 is pixel-shuffled up to stage 3's resolution
