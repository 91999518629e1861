"""InternImage: a hierarchical CNN whose core operator is DCNv3.

Module and parameter names follow the released reference model exactly, so released
checkpoints load with ``strict=True``. Features flow channels-last (N, H, W, C) through
the stages; ``forward_stages`` (and, on this class, ``forward_features``) hands the four
stage maps out as NCHW views (their memory stays channels-last), which is what FPN-style
necks expect. The timm-registered subclass (``models.features.InternImageTimm``) gives
``forward_features`` timm's meaning instead: the one unpooled map the head pools.

The model is traceable by ``torch.fx`` (timm's FX feature extraction): the DCNv3 layer is
registered with timm as a leaf module (its backend choice depends on the tensor's device,
which a symbolic trace does not know), and no ``forward`` branches on a traced value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint as cp
from timm.layers import DropPath, register_notrace_module
from torch import nn
from torch.fx import Proxy

from models.clip_projector import EMBED_DIM, NUM_HEADS, TOKEN_DIM, UPSAMPLE, AttentionPoolingBlock
from models.layers import (
    DownsampleLayer,
    MLPLayer,
    StemLayer,
    batch_norm,
    layer_norm,
    trunc_normal_fp32_,
)
from ops.dcnv3 import DCNv3

# FX traces call DCNv3 as one opaque module; its eager forward then picks the backend.
register_notrace_module(DCNv3)


class InternImageLayer(nn.Module):
    """One block: a DCNv3 branch and an MLP branch, each with its residual.

    Norm placement: pre-norm (default), ``post_norm`` (S..XL) or ``res_post_norm`` (H);
    ``layer_scale`` multiplies each branch by a learned per-channel gamma. As in the
    released model, ``post_norm`` wins over ``res_post_norm``, and ``layer_scale`` turns
    ``res_post_norm`` off (its norms are still built; no released config combines them).
    """

    def __init__(
        self, channels: int, groups: int, mlp_ratio: float = 4.0, drop: float = 0.0,
        drop_path: float = 0.0, post_norm: bool = False, layer_scale: float | None = None,
        offset_scale: float = 1.0, with_cp: bool = False, dw_kernel_size: int | None = None,
        res_post_norm: bool = False, center_feature_scale: bool = False,
        dcn_backend: str = "auto",
    ):
        super().__init__()
        self.with_cp = with_cp
        self.post_norm = post_norm
        self.norm1 = layer_norm(channels)
        self.dcn = DCNv3(channels, kernel_size=3, dw_kernel_size=dw_kernel_size, stride=1, pad=1,
                         dilation=1, group=groups, offset_scale=offset_scale,
                         center_feature_scale=center_feature_scale, backend=dcn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(channels)
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(channels))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(channels))
        self.res_post_norm = res_post_norm
        if res_post_norm:
            self.res_post_norm1 = layer_norm(channels)
            self.res_post_norm2 = layer_norm(channels)

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        # The released forward (classification/models/intern_image.py InternImageLayer,
        # same in the det/seg backbones) has res_post_norm only in its no-layer-scale
        # branch: with layer_scale it is post_norm or plain pre-norm, and the
        # res_post_norm1/2 modules (still built, so state dicts match) are unused.
        if self.post_norm:
            dcn, mlp = (lambda t: self.norm1(self.dcn(t))), (lambda t: self.norm2(self.mlp(t)))
        elif self.res_post_norm and not self.layer_scale:
            dcn = lambda t: self.res_post_norm1(self.dcn(self.norm1(t)))  # noqa: E731
            mlp = lambda t: self.res_post_norm2(self.mlp(self.norm2(t)))  # noqa: E731
        else:
            dcn, mlp = (lambda t: self.dcn(self.norm1(t))), (lambda t: self.mlp(self.norm2(t)))
        if self.layer_scale:
            x = x + self.drop_path(self.gamma1 * dcn(x))
            return x + self.drop_path(self.gamma2 * mlp(x))
        x = x + self.drop_path(dcn(x))
        return x + self.drop_path(mlp(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A symbolic trace (torch.fx) sees a Proxy, whose requires_grad cannot be branched
        # on; the traced graph runs the block without recomputation (same values).
        if (self.with_cp and not isinstance(x, Proxy) and x.requires_grad
                and torch.is_grad_enabled()):
            return cp.checkpoint(self._branches, x, use_reentrant=False)
        return self._branches(x)


class InternImageBlock(nn.Module):
    """One stage ("level"): ``depth`` blocks, optional extra norms, optional downsampling."""

    def __init__(
        self, channels: int, depth: int, groups: int, drop_path: Sequence[float],
        downsample: bool, post_norm: bool = False, center_feature_scale: bool = False,
        post_norm_block_ids: Sequence[int] | None = None, **layer_kwargs,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            InternImageLayer(channels, groups, drop_path=drop_path[i], post_norm=post_norm,
                             center_feature_scale=center_feature_scale, **layer_kwargs)
            for i in range(depth)
        )
        # The released model keeps a stage-end norm unless post_norm (H has both).
        self.has_norm = not post_norm or center_feature_scale
        if self.has_norm:
            self.norm = layer_norm(channels)
        self.post_norm_block_ids = list(post_norm_block_ids or [])
        if self.post_norm_block_ids:
            self.post_norms = nn.ModuleList(layer_norm(channels) for _ in self.post_norm_block_ids)
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input of the next stage, this stage's output before downsampling)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.post_norm_block_ids:
                x = self.post_norms[self.post_norm_block_ids.index(i)](x)
        if self.has_norm:
            x = self.norm(x)
        stage_out = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, stage_out


class InternImage(nn.Module):
    """InternImage backbone + classification head (T..XL: conv head; H: CLIP projector).

    timm's naming: ``num_features`` is the width of the unpooled map the head pools
    (``forward_unpooled``: the last stage for T..XL; for H the fused stage-3/4 tokens),
    ``head_hidden_size`` (= ``embed_dim``) the width of the pooled pre-logits embedding,
    ``global_pool`` the pooling (``"avg"`` for T..XL, ``"map"`` attention pooling for H;
    ``""`` skips the whole head and needs ``num_classes=0``).
    """

    def __init__(
        self,
        channels: int = 64,
        depths: Sequence[int] = (4, 4, 18, 4),
        groups: Sequence[int] = (4, 8, 16, 32),
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        post_norm: bool = False,
        cls_scale: float = 1.5,
        with_cp: bool = False,
        dw_kernel_size: int | None = None,
        use_clip_projector: bool = False,
        level2_post_norm_block_ids: Sequence[int] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        in_chans: int = 3,
        dcn_backend: str = "auto",
        global_pool: str | None = None,
    ):
        super().__init__()
        if len(depths) != len(groups):
            raise ValueError(f"depths ({len(depths)}) and groups ({len(groups)}) differ in length")
        self.num_classes = num_classes
        self.depths = list(depths)
        self.num_levels = len(depths)
        self.channels = channels
        self.stage_channels = [int(channels * 2**i) for i in range(self.num_levels)]
        last = self.stage_channels[-1]
        self.use_clip_projector = use_clip_projector
        self.patch_embed = StemLayer(in_chans, channels)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.levels.append(InternImageBlock(
                self.stage_channels[i], depth, groups[i], dpr[start:start + depth],
                downsample=i < self.num_levels - 1, post_norm=post_norm,
                center_feature_scale=center_feature_scale,
                post_norm_block_ids=level2_post_norm_block_ids if i == 2 else None,
                mlp_ratio=mlp_ratio, drop=drop_rate, layer_scale=layer_scale,
                offset_scale=offset_scale, with_cp=with_cp, dw_kernel_size=dw_kernel_size,
                res_post_norm=res_post_norm, dcn_backend=dcn_backend,
            ))
        if use_clip_projector:
            self.dcnv3_head_x4 = nn.Sequential(
                nn.Conv2d(last, TOKEN_DIM * UPSAMPLE**2, 1), nn.PixelShuffle(UPSAMPLE))
            self.dcnv3_head_x3 = nn.Conv2d(self.stage_channels[-2], TOKEN_DIM, 1)
            self.clip_projector = AttentionPoolingBlock(TOKEN_DIM, NUM_HEADS, EMBED_DIM)
            self.fc_norm = layer_norm(EMBED_DIM)
            self.num_features = TOKEN_DIM
            self.embed_dim = EMBED_DIM
        else:
            self.num_features = last
            self.embed_dim = int(last * cls_scale)
            self.conv_head = nn.Sequential(
                nn.Conv2d(last, self.embed_dim, 1, bias=False),
                batch_norm(self.embed_dim), nn.GELU())
            self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_hidden_size = self.embed_dim
        self.global_pool = self._checked_pool(global_pool, num_classes)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.reset_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_fp32_(m.weight, std=0.02)  # bf16 under zero.Init: see there
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block activation checkpointing on or off (timm's convention)."""
        for level in self.levels:
            for block in level.blocks:
                block.with_cp = enable

    def _checked_pool(self, global_pool: str | None, num_classes: int) -> str:
        """``global_pool`` validated: this variant's own pooling (default) or ``""``."""
        native = "map" if self.use_clip_projector else "avg"
        if global_pool is None:
            return native
        if global_pool not in (native, ""):
            raise ValueError(f"global_pool={global_pool!r}: this InternImage pools with "
                             f"{native!r}; choose {native!r} or '' (no pooling, no head)")
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' returns the unpooled map, which has no "
                             f"classifier: set num_classes=0 (got {num_classes})")
        return global_pool

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs as NCHW tensors (channels-last memory), strides 4..32."""
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for level in self.levels:
            x, stage_out = level(x)
            outs.append(stage_out.permute(0, 3, 1, 2))
        return outs

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage maps (``forward_stages``), what the dense-prediction necks take."""
        return self.forward_stages(x)

    def head_input(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """The NCHW map the head pools, from the NCHW stage maps: the last stage (stride 32)
        for T..XL; for H the pixel-shuffled stage 4 plus stage 3 (stride 16)."""
        if self.use_clip_projector:
            x4 = self.dcnv3_head_x4(stages[-1])
            x3 = self.dcnv3_head_x3(stages[-2])
            # Stage 4 is stage 3 at stride 2 (rounded up), so its 2x pixel shuffle is one
            # row/column larger where stage 3's side is odd (224 px: 14, fine; 240, 336,
            # 560 px: 15, 21, 35). The released code adds the two as they are and fails
            # there; the extra trailing row/column lies past stage 3's grid: cropped.
            return x4[:, :, : x3.shape[-2], : x3.shape[-1]] + x3
        return stages[-1]

    def forward_unpooled(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled map the head pools, ``num_features`` wide (``head_input``)."""
        return self.head_input(self.forward_stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool an unpooled map (``forward_unpooled``) and classify it (timm's contract).

        ``pre_logits=True`` returns the pooled embedding (N, ``head_hidden_size``); with
        ``global_pool=""`` the map is returned as it is.
        """
        if not self.global_pool:
            return x
        if self.use_clip_projector:
            x = self.fc_norm(self.clip_projector(x.flatten(2).transpose(1, 2)))
        else:
            x = torch.flatten(self.avgpool(self.conv_head(x)), 1)
        return x if pre_logits else self.head(x)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding before the classifier: (N, ``embed_dim``)."""
        return self.forward_head(self.forward_unpooled(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_unpooled(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (timm's convention) for a new class count; optionally
        change ``global_pool`` (``""``: no pooling, for ``num_classes=0``)."""
        pool = self._checked_pool(self.global_pool if global_pool is None else global_pool,
                                  num_classes)
        self.num_classes = num_classes
        self.global_pool = pool
        device = next(self.parameters()).device
        self.head = (nn.Linear(self.embed_dim, num_classes, device=device)
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            self._init_weights(self.head)
