"""The pre-training network: InternImage image tower, text tower, projections, tag embeddings.

M3I casts image-text and weakly supervised pre-training as one family of InfoNCE losses
between an image representation and its target's representation; this module produces the
normalised embeddings and the learnable temperature those losses need.
"""

from __future__ import annotations

import math
from typing import Literal

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


class _BertTextTower(nn.Module):
    """BERT-Base's architecture as the text tower (M3I's text target encoder: "a 12-layer
    Transformer with BERT-Base's architecture"): transformers' ``BertModel`` without its
    pooler, built from a config and trained from scratch, then our projection to the joint
    embedding.

    BERT's blocks as they are: bidirectional self-attention, post-LayerNorm, GELU, learned
    absolute positions (``context_length`` of them), token-type embeddings (all type 0),
    dropout 0.1, an FFN 4x the width (3072 at BERT-Base's 768). The text is represented by
    the final hidden state of the first position, BERT's [CLS] position: the CLIP tokenizer
    starts every sequence with <start_of_text>, which takes [CLS]'s place. Not BERT's
    pooler (dense + tanh, trained by next-sentence prediction): the projection that follows
    already maps the [CLS] state into the joint space, as the CLIP tower's does its pooled
    state.

    The one difference from BERT-Base: the vocabulary is open_clip's CLIP BPE (the run's
    tokenizer, ``vocab_size`` ids) rather than BERT's WordPiece, which the training data
    pipeline does not use. Padding follows that tokenizer: every position after the first
    end-of-text token (the vocabulary's last id, as open_clip's own argmax pooling assumes)
    is masked out of attention; id 0 is a real BPE token ('!'), so it is not a pad id here.
    """

    def __init__(self, context_length: int, vocab_size: int, width: int, heads: int,
                 layers: int, output_dim: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * width,
                            max_position_embeddings=context_length, hidden_act="gelu",
                            attn_implementation="sdpa",
                            # BertConfig's default pad id 0 would freeze the embedding of
                            # CLIP's '!' at zero (nn.Embedding's padding_idx)
                            pad_token_id=None)
        self.eot_token_id = vocab_size - 1
        # BertModel initialises itself in its __init__ (post_init) by walking its children;
        # under zero.Init they are already partitioned there, so those draws land nowhere
        # and the random stream would differ from a plain build's. Whatever construction
        # draws is thrown away and every weight is drawn by init_parameters instead.
        with torch.random.fork_rng(devices=[]):
            self.bert = BertModel(config, add_pooling_layer=False)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.init_std = config.initializer_range
        self.init_parameters()

    def init_parameters(self) -> None:
        """BERT's initialisation (normal, std ``initializer_range`` 0.02; zero biases;
        LayerNorm 1/0) and the CLIP tower's projection init (std width^-0.5), gathered
        under zero.Init (see pretrain/zero_init.py)."""
        with gathered_for_init(self.parameters()):
            for module in self.bert.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=self.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            nn.init.normal_(self.text_projection, std=self.text_projection.shape[0]**-0.5)

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True up to and including each row's first end-of-text token, False
        after it (a row without one: all True; the tokenizer's truncation ends on one)."""
        is_eot = tokens == self.eot_token_id
        last = torch.where(is_eot.any(-1), is_eot.int().argmax(-1), tokens.shape[1] - 1)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return positions[None] <= last[:, None]

    def token_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, width) final hidden states of every position."""
        # Given as the (B, 1, 1, L) mask SDPA reads: from a (B, L) one, transformers first
        # asks whether anything is masked at all (a host sync per forward, and impossible
        # on the meta device, where the --dry-run memory plan runs the tower)
        mask = self.attention_mask(tokens)[:, None, None, :]
        return self.bert(input_ids=tokens, attention_mask=mask).last_hidden_state

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, output_dim) projected final hidden state of the first ([CLS]) position."""
        return self.token_states(tokens)[:, 0] @ self.text_projection


TEXT_TOWERS = {"clip": _TextTower, "bert": _BertTextTower}


class M3IModel(nn.Module):
    """Image tower + projection, text tower, tag embeddings and a learnable logit scale.

    ``text_arch``: ``"clip"`` (open_clip's causal pre-norm transformer, pooled at the
    end-of-text token) or ``"bert"`` (BERT-Base's architecture, :class:`_BertTextTower`).
    """

    def __init__(self, model_name: str, embed_dim: int, context_length: int, text_width: int,
                 text_heads: int, text_layers: int, vocab_size: int, num_tags: int,
                 init_temperature: float = 0.07, with_cp: bool = False,
                 decoder: dict | None = None, text_arch: Literal["clip", "bert"] = "clip",
                 **model_overrides):
        super().__init__()
        self.visual = build_model(model_name, num_classes=0, with_cp=with_cp, **model_overrides)
        self.image_proj = nn.Linear(self.visual.embed_dim, embed_dim, bias=False)
        # text_arch: see TextConfig.arch (pretrain/config.py)
        self.text = TEXT_TOWERS[text_arch](context_length=context_length, vocab_size=vocab_size,
                                           width=text_width, heads=text_heads,
                                           layers=text_layers, output_dim=embed_dim)
        # One learnable embedding per tag of the vocabulary (the weak-label targets).
        self.tag_embed = nn.Parameter(torch.randn(max(num_tags, 1), embed_dim) / embed_dim**0.5)
        # shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
        # The fp32 master's value of logit_scale where the parameter is a 16-bit copy (set
        # after each step by pretrain.engine.clamp_logit_scale; None: the parameter is it)
        self.exact_logit_scale: torch.Tensor | None = None
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

        In fp32 from the fp32 master's value (``exact_logit_scale``) when the parameter is
        a 16-bit copy: bf16 rounds ln 100 to 4.594 (a scale of 98.9 at the bound), and
        above e^4 it moves the scale only in steps of ~3% where the master moves smoothly
        (open_clip keeps the parameter in fp32). The gradient still flows into the
        parameter, as d exp(v)/dv at the exact value.
        """
        value = self.logit_scale.float()
        exact = self.exact_logit_scale
        if exact is not None:
            value = value + (exact.to(value.device) - value).detach()
        return value.exp()

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
