"""The pre-training network: InternImage image tower, text tower, projections, tag embeddings.

M3I casts image-text and weakly supervised pre-training as one family of InfoNCE losses
between an image representation and its target's representation; this module produces the
normalised embeddings and the learnable temperature those losses need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import nn

from models import build_model
from pretrain.zero_init import gathered_for_init


class _TextTower(TextTransformer):
    """open_clip's text transformer whose weight init also works under zero.Init: its
    ``init_parameters`` re-initialises child modules' weights (embedding, attention, MLP),
    which must be gathered there (see pretrain/zero_init.py)."""

    def init_parameters(self) -> None:
        with gathered_for_init(self.parameters()):
            super().init_parameters()
            # nn.MultiheadAttention zeroes its child out_proj's bias in its own __init__:
            # lost under zero.Init, so done again here (no random draw: same weights)
            for block in self.transformer.resblocks:
                if isinstance(block.attn, nn.MultiheadAttention):
                    nn.init.zeros_(block.attn.out_proj.bias)


class M3IModel(nn.Module):
    """Image tower + projection, text tower, tag embeddings and a learnable logit scale."""

    def __init__(self, model_name: str, embed_dim: int, context_length: int, text_width: int,
                 text_heads: int, text_layers: int, vocab_size: int, num_tags: int,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 with_cp: bool = False, **model_overrides):
        super().__init__()
        self.visual = build_model(model_name, num_classes=0, with_cp=with_cp, **model_overrides)
        self.image_proj = nn.Linear(self.visual.embed_dim, embed_dim, bias=False)
        self.text = _TextTower(context_length=context_length, vocab_size=vocab_size,
                               width=text_width, heads=text_heads, layers=text_layers,
                               output_dim=embed_dim)
        # One learnable embedding per tag of the vocabulary (the weak-label targets).
        self.tag_embed = nn.Parameter(torch.randn(max(num_tags, 1), embed_dim) / embed_dim**0.5)
        # shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
        self.max_logit_scale = max_logit_scale
        with gathered_for_init(self.image_proj.parameters()):  # a child: zero.Init-safe
            nn.init.normal_(self.image_proj.weight, std=self.visual.embed_dim**-0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, embed_dim)."""
        return F.normalize(self.image_proj(self.visual.forward_pooled(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, embed_dim)."""
        return F.normalize(self.text(tokens), dim=-1)

    def tag_embeddings(self) -> torch.Tensor:
        """L2-normalised tag embeddings (V, embed_dim)."""
        return F.normalize(self.tag_embed, dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped: the inverse temperature of every InfoNCE term."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """(image embeddings, text embeddings, tag embeddings, logit scale).

        Everything is derived inside forward on purpose: under ZeRO-3 a parameter is only
        materialised while its module runs, so callers must not read parameters directly.
        """
        return (self.encode_image(images), self.encode_text(tokens), self.tag_embeddings(),
                self.scale())
