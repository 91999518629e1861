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
                 init_temperature: float = 0.07, with_cp: bool = False,
                 decoder: dict | None = None, **model_overrides):
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
        with gathered_for_init(self.image_proj.parameters()):  # a child: zero.Init-safe
            nn.init.normal_(self.image_proj.weight, std=self.visual.embed_dim**-0.5)
        # M3I's image branch (pretrain/m3i/): ``decoder`` = {width, depth, heads}; it
        # predicts the target encoder's unpooled map, as wide as the online one
        self.decoder = None
        if decoder is not None:
            from pretrain.m3i.decoder import MaskTokenDecoder

            features = self.visual.num_features
            self.decoder = MaskTokenDecoder(features, features, decoder["width"],
                                            decoder["depth"], decoder["heads"])

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
        """exp(logit_scale): the inverse temperature of every InfoNCE term.

        Not clamped here: a clamp of the forward value has gradient 0 above its bound, so
        once past it the temperature could never come back. The training loop clamps the
        parameter itself after every optimizer step (``pretrain.engine.clamp_logit_scale``),
        so every forward already sees a bounded value.
        """
        return self.logit_scale.exp()

    def region_pooled(self, unpooled: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) pooled embeddings of each map over its ``region`` (B, h, w) bool:
        the image tower's own pooling restricted to one image's patches of a mix (T..XL:
        the conv head, then the mean over the region; H: attention pooling over the
        region's tokens, the whole batch in one call of the head).

        H needs every region to hold the same number of patches, which mixing guarantees
        (``pretrain.m3i.mixing.block_mask`` marks exactly round(share * h * w), clipped
        to [1, h * w - 1], of every mask); each image's tokens keep their raster order.
        """
        visual = self.visual
        if visual.use_clip_projector:
            counts = region.flatten(1).sum(1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"regions of one batch must hold equal patch counts for "
                                 f"batched attention pooling, got {counts.tolist()}")
            tokens = unpooled.flatten(2)  # (B, C, hw)
            # the region's patch indices of each image, in raster order: (B, k)
            index = region.flatten(1).nonzero()[:, 1].view(region.shape[0], -1)
            index = index.to(tokens.device)[:, None].expand(-1, tokens.shape[1], -1)
            return visual.forward_head(tokens.gather(2, index)[..., None], pre_logits=True)
        mapped = visual.conv_head(unpooled)
        weight = region.to(mapped.dtype)[:, None]
        return (mapped * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1.0)

    def forward_mixed(self, images: torch.Tensor, tokens: torch.Tensor, mix_mask: torch.Tensor,
                      positions_a: torch.Tensor, positions_b: torch.Tensor):
        """The image branch's forward on mixed inputs (``mix_mask`` True: image B's patch).

        (image embeddings (2B, E): rows 0..B-1 image A of each mix, B..2B-1 image B; text
        embeddings; tag embeddings; logit scale; decoder predictions (2B, T, C))."""
        if self.decoder is None:
            raise RuntimeError("mixed inputs need the image branch: objective.image.weight > 0")
        unpooled = self.visual.forward_unpooled(images)
        mix = mix_mask.to(unpooled.device)
        pooled = torch.cat([self.region_pooled(unpooled, ~mix), self.region_pooled(unpooled, mix)])
        image = F.normalize(self.image_proj(pooled), dim=-1)
        predictions = self.decoder(unpooled, mix, positions_a, positions_b)
        return image, self.encode_text(tokens), self.tag_embeddings(), self.scale(), predictions

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, mix_mask=None,
                positions_a=None, positions_b=None):
        """(image embeddings, text embeddings, tag embeddings, logit scale); with a
        ``mix_mask``, :meth:`forward_mixed`'s outputs.

        Everything is derived inside forward on purpose: under ZeRO-3 a parameter is only
        materialised while its module runs, so callers must not read parameters directly.
        """
        if mix_mask is not None:
            return self.forward_mixed(images, tokens, mix_mask, positions_a, positions_b)
        return (self.encode_image(images), self.encode_text(tokens), self.tag_embeddings(),
                self.scale())
