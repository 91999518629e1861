"""The light decoder: mask tokens at target-view positions read one image's patches.

Input: the online encoder's unpooled map of the *mixed* input (B, C, h, w), the mix mask
(True: patch of the second image) and, per role, the positions of the target patches in
the input view's patch coordinates (``pos_embed.relative_positions``). Each mixed input is
decoded twice: as image A (it sees only A's patches; its mask tokens sit at A's own view,
intra-view) and as image B (only B's patches; mask tokens at B's *other* view,
cross-view). Visible patches carry the embedding of their own grid position, mask tokens
that of their target position (Siamese Image Modeling's scheme). Pre-norm transformer
blocks, attention restricted to the role's visible patches and the mask tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import trunc_normal_fp32_
from pretrain.m3i.pos_embed import grid_positions, sincos_embed


class _Block(nn.Module):
    """Pre-norm transformer block whose attention honours a key mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``keys`` (N, L) bool: which tokens every token may attend to."""
        n, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(n, length, width))
        return x + self.mlp(self.norm2(x))


class MaskTokenDecoder(nn.Module):
    """Predicts target features (``out_dim`` wide) at target positions from one image's
    visible patches of the mixed map (``in_dim`` wide)."""

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, heads: int):
        super().__init__()
        self.width = width
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.apply(self._init_weights)  # gathered by DeepSpeed under zero.Init
        with torch.no_grad():
            nn.init.normal_(self.mask_token, std=0.02)  # its own parameter: not a child's

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_fp32_(m.weight, std=0.02)  # bf16 under zero.Init
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, feature_map: torch.Tensor, mix_mask: torch.Tensor,
                positions_a: torch.Tensor, positions_b: torch.Tensor) -> torch.Tensor:
        """(2B, T, out_dim): rows 0..B-1 predict image A's targets at ``positions_a``
        (B, T, 2), rows B..2B-1 image B's at ``positions_b``; ``mix_mask`` (B, h, w)."""
        b, _, h, w = feature_map.shape
        visible = self.embed(feature_map.flatten(2).transpose(1, 2))  # (B, hw, width)
        grid = sincos_embed(grid_positions((h, w)).to(visible.device), self.width)
        visible = (visible + grid.to(visible.dtype)).repeat(2, 1, 1)
        positions = torch.cat([positions_a, positions_b]).to(visible.device)
        queries = self.mask_token.to(visible.dtype) + sincos_embed(
            positions, self.width).to(visible.dtype)
        shows_b = mix_mask.flatten(1).to(visible.device)
        keys = torch.cat([torch.cat([~shows_b, shows_b]),
                          torch.ones(2 * b, queries.shape[1], dtype=torch.bool,
                                     device=visible.device)], dim=1)
        x = torch.cat([visible, queries], dim=1)
        for block in self.blocks:
            x = block(x, keys)
        return self.head(self.norm(x[:, h * w:]))
