"""The InternImage family: architecture hyper-parameters of each released variant."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class InternImageSpec:
    """Architecture of one variant (REFERENCE.md section 1; the released configs)."""

    channels: int
    depths: tuple[int, ...]
    groups: tuple[int, ...]
    mlp_ratio: float = 4.0
    offset_scale: float = 1.0
    layer_scale: float | None = None
    post_norm: bool = False
    drop_path_rate: float = 0.1
    dw_kernel_size: int | None = None
    res_post_norm: bool = False
    level2_post_norm_block_ids: tuple[int, ...] | None = None
    center_feature_scale: bool = False
    use_clip_projector: bool = False
    cls_scale: float = 1.5
    extra: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        """Constructor arguments of ``InternImage`` (without ``extra``)."""
        out = asdict(self)
        out.pop("extra")
        return out


VARIANTS: dict[str, InternImageSpec] = {
    "internimage_t": InternImageSpec(64, (4, 4, 18, 4), (4, 8, 16, 32), drop_path_rate=0.1),
    "internimage_s": InternImageSpec(80, (4, 4, 21, 4), (5, 10, 20, 40), layer_scale=1e-5,
                                     post_norm=True, drop_path_rate=0.4),
    "internimage_b": InternImageSpec(112, (4, 4, 21, 4), (7, 14, 28, 56), layer_scale=1e-5,
                                     post_norm=True, drop_path_rate=0.5),
    "internimage_l": InternImageSpec(160, (5, 5, 22, 5), (10, 20, 40, 80), offset_scale=2.0,
                                     layer_scale=1e-5, post_norm=True, drop_path_rate=0.1),
    "internimage_xl": InternImageSpec(192, (5, 5, 24, 5), (12, 24, 48, 96), offset_scale=2.0,
                                      layer_scale=1e-5, post_norm=True, drop_path_rate=0.2),
    "internimage_h": InternImageSpec(320, (6, 6, 32, 6), (10, 20, 40, 80), drop_path_rate=0.2,
                                     dw_kernel_size=5, res_post_norm=True,
                                     level2_post_norm_block_ids=(5, 11, 17, 23, 29),
                                     center_feature_scale=True, use_clip_projector=True),
}

# Released checkpoint names (timm-style) -> (variant, default input size).
PRETRAINED_NAMES: dict[str, tuple[str, int]] = {
    "internimage_t_1k_224": ("internimage_t", 224),
    "internimage_s_1k_224": ("internimage_s", 224),
    "internimage_b_1k_224": ("internimage_b", 224),
    "internimage_l_22kto1k_384": ("internimage_l", 384),
    "internimage_xl_22kto1k_384": ("internimage_xl", 384),
    "internimage_h_22kto1k_640": ("internimage_h", 640),
    "internimage_h_jointto1k_640": ("internimage_h", 640),
}
