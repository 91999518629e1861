"""InternImage as a standard timm feature extractor.

timm's ``features_only=True`` wraps a model in ``FeatureGetterNet`` when the model class
declares ``feature_info`` (one dict per stage: ``num_chs``, ``reduction``, ``module``) and
implements ``forward_intermediates`` / ``prune_intermediate_layers``. ``InternImageTimm``
adds exactly those to ``InternImage`` without changing any parameter name, so released
checkpoints load into it unchanged and libraries that accept timm backbones can use it:

    backbone = timm.create_model("internimage_t", features_only=True, out_indices=(1, 2, 3))
    backbone.feature_info.channels()   # [128, 256, 512]
    backbone.feature_info.reduction()  # [8, 16, 32]
    feats = backbone(images)           # list of NCHW maps
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Format
from timm.models._features import feature_take_indices
from torch import nn

from models.intern_image import InternImage
from models.layer_decay import layer_id


def stage_feature_info(model: InternImage) -> list[dict]:
    """timm feature metadata of the stage outputs: strides 4, 8, 16, 32, ..."""
    return [
        {"num_chs": channels, "reduction": 4 * 2**i, "module": f"levels.{i}"}
        for i, channels in enumerate(model.stage_channels)
    ]


class InternImageTimm(InternImage):
    """``InternImage`` with timm's feature-extraction interface (same weights, same keys)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.feature_info = stage_feature_info(self)

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's contract: what ``reset_classifier`` replaces)."""
        return self.head

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's parameter grouping (``timm.optim.create_optimizer_v2(..., layer_decay=)``,
        ``train.py --layer-decay``): parameter name -> ordinal. Fine: the released
        classification rule (models/layer_decay.py), so timm's layer decay gives the scales
        the released optimizer gives (the last block and the head at the full rate, each
        block before one factor less; without it timm grouped by module order: 108 groups,
        T's stem at 0.9**53). Coarse: the stem, then one group per level, then the head."""
        if not coarse:
            depths = self.depths
            return lambda name: layer_id(name, depths, "classification")

        def by_level(name: str) -> int:
            if name.startswith("patch_embed."):
                return 0
            if name.startswith("levels."):
                return 1 + int(name.split(".")[1])
            return 1 + self.num_levels
        return by_level

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's meaning: the one unpooled NCHW map ``forward_head`` pools (N,
        ``num_features``, H/32, W/32; H/16 for InternImage-H). The four stage maps come
        from ``forward_intermediates`` (or ``forward_stages``)."""
        return self.forward_unpooled(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs at ``indices`` (timm's contract; ``norm`` is a no-op).

        Each stage already ends in its own norm, so there is no extra "final norm" to
        apply. With ``intermediates_only=False`` also returns the map the head pools
        (``forward_features``' output; with ``stop_early``, the last stage run), as timm
        models do.
        """
        fmt = Format(output_fmt)
        if fmt not in (Format.NCHW, Format.NHWC):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.levels), indices)
        # Without the head we never need stages past the last requested one.
        last = max_index if (stop_early or intermediates_only) else len(self.levels) - 1
        x = self.pos_drop(self.patch_embed(x))
        intermediates = []
        stages = [x.permute(0, 3, 1, 2)]  # NCHW views of what each stage put out
        for i, level in enumerate(self.levels[: last + 1]):
            x, stage_out = level(x)  # channels-last (N, H, W, C)
            stages.append(stage_out.permute(0, 3, 1, 2))
            if i in take:
                intermediates.append(stage_out if fmt == Format.NHWC else stages[-1])
        if intermediates_only:
            return intermediates
        ran_all = last == len(self.levels) - 1
        return (self.head_input(stages) if ran_all else stages[-1]), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop stages after the last wanted one (and the head); return absolute indices.

        ``FeatureGetterNet`` calls this so a features-only model holds no unused weights.
        """
        take, max_index = feature_take_indices(len(self.levels), indices)
        self.levels = self.levels[: max_index + 1]
        # The last kept stage's downsampling only fed the stages just removed.
        self.levels[-1].downsample = None
        if prune_head:
            for name in ("conv_head", "avgpool", "dcnv3_head_x4", "dcnv3_head_x3",
                         "clip_projector", "fc_norm"):
                if hasattr(self, name):
                    delattr(self, name)
            self.head = nn.Identity()
            self.num_classes = 0
        return take
