"""InternImage family: exact parameter counts, released key layout, loading, features."""

from __future__ import annotations

import functools

import pytest
import timm
import torch

from models import CheckpointError, build_model, load_pretrained
from models.variants import VARIANTS

# The released reference model's parameter counts with 1000 classes (issue 2).
RELEASED_PARAMS = {
    "internimage_t": 29_918_424,
    "internimage_s": 50_079_880,
    "internimage_b": 97_461_832,
    "internimage_l": 223_334_810,
    "internimage_xl": 334_819_780,
    "internimage_h": 1_089_636_760,
}

# The paper's parameter counts (REFERENCE.md section 1 table; InternImage paper, CVPR 2023,
# Table 1 / the released model zoo): a faithful build lands within 1% of them.
PAPER_PARAMS = {
    "internimage_t": 30e6,
    "internimage_s": 50e6,
    "internimage_b": 97e6,
    "internimage_l": 223e6,
    "internimage_xl": 335e6,
    "internimage_h": 1.08e9,
}

TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)

# Architecture of each released model, from the released Hugging Face model folders
# (OpenGVLab/InternImage classification/huggingface/in1k_model/<name>/config.json, commit
# fe6cdd2e): every one says "norm_layer": "LN". level2_post_norm_block_ids is given only
# where "level2_post_norm" is true (H).
HF_CONFIGS = {
    "internimage_t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32),
                          offset_scale=1.0, dw_kernel_size=None, layer_scale=None, post_norm=False,
                          res_post_norm=False, level2_ids=None, center_feature_scale=False,
                          use_clip_projector=False, norm_layer="LN"),
    "internimage_s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40),
                          offset_scale=1.0, dw_kernel_size=None, layer_scale=1e-5, post_norm=True,
                          res_post_norm=False, level2_ids=None, center_feature_scale=False,
                          use_clip_projector=False, norm_layer="LN"),
    "internimage_b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56),
                          offset_scale=1.0, dw_kernel_size=None, layer_scale=1e-5, post_norm=True,
                          res_post_norm=False, level2_ids=None, center_feature_scale=False,
                          use_clip_projector=False, norm_layer="LN"),
    "internimage_l": dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80),
                          offset_scale=2.0, dw_kernel_size=None, layer_scale=1e-5, post_norm=True,
                          res_post_norm=False, level2_ids=None, center_feature_scale=False,
                          use_clip_projector=False, norm_layer="LN"),
    "internimage_xl": dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96),
                           offset_scale=2.0, dw_kernel_size=None, layer_scale=1e-5, post_norm=True,
                           res_post_norm=False, level2_ids=None, center_feature_scale=False,
                           use_clip_projector=False, norm_layer="LN"),
    "internimage_h": dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80),
                          offset_scale=1.0, dw_kernel_size=5, layer_scale=None, post_norm=False,
                          res_post_norm=True, level2_ids=(5, 11, 17, 23, 29),
                          center_feature_scale=True, use_clip_projector=True, norm_layer="LN"),
}

WB = ("weight", "bias")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _meta(name: str, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


@functools.cache
def _meta_variant(name: str):
    """The full variant on the meta device (no memory), built once per test session."""
    return _meta(name)


def _norm_index(norm_layer: str, in_format: str, out_format: str) -> int:
    """Position of the norm inside ``build_norm_layer``'s nn.Sequential (released
    classification/models/intern_image.py, ``build_norm_layer``): 'LN' is preceded by
    ``to_channels_last`` when the input is channels_first; 'BN' by ``to_channels_first``
    when the input is channels_last. The permute appended after the norm has no keys."""
    if norm_layer == "LN":
        return 1 if in_format == "channels_first" else 0
    return 1 if in_format == "channels_last" else 0


def _norm_keys(prefix: str, norm_layer: str, in_format: str = "channels_last",
               out_format: str = "channels_last") -> set[str]:
    idx = _norm_index(norm_layer, in_format, out_format)
    names = WB if norm_layer == "LN" else BN_KEYS
    return {f"{prefix}.{idx}.{p}" for p in names}


def _linear(prefix: str, bias: bool = True) -> set[str]:
    return {f"{prefix}.weight"} | ({f"{prefix}.bias"} if bias else set())


def released_keys(name: str) -> set[str]:
    """Every state_dict key of the released model, derived from the structure of the
    released definition (OpenGVLab/InternImage classification/models/intern_image.py at
    1f76769c and classification/ops_dcnv3/modules/dcnv3.py) with the HF config above."""
    cfg = HF_CONFIGS[name]
    norm = cfg["norm_layer"]  # InternImage(norm_layer=...) -> StemLayer/DownsampleLayer/DCNv3
    # StemLayer.__init__: conv1, norm1 = build_norm_layer(C//2, norm_layer, 'channels_first',
    # 'channels_first'), conv2, norm2 = build_norm_layer(C, norm_layer, 'channels_first',
    # 'channels_last').
    keys = _linear("patch_embed.conv1") | _linear("patch_embed.conv2")
    keys |= _norm_keys("patch_embed.norm1", norm, "channels_first", "channels_first")
    keys |= _norm_keys("patch_embed.norm2", norm, "channels_first", "channels_last")
    for i, depth in enumerate(cfg["depths"]):
        lvl = f"levels.{i}"
        for j in range(depth):
            blk = f"{lvl}.blocks.{j}"
            # InternImageLayer.__init__: norm1/norm2 = build_norm_layer(channels, 'LN').
            keys |= _norm_keys(f"{blk}.norm1", "LN") | _norm_keys(f"{blk}.norm2", "LN")
            # MLPLayer: fc1, fc2 (Linear with bias).
            keys |= _linear(f"{blk}.mlp.fc1") | _linear(f"{blk}.mlp.fc2")
            # DCNv3.__init__: dw_conv = Sequential(Conv2d (depthwise, bias),
            # build_norm_layer(C, norm_layer, 'channels_first', 'channels_last'), act);
            # offset, mask, input_proj, output_proj are Linear with bias.
            keys |= _linear(f"{blk}.dcn.dw_conv.0")
            keys |= _norm_keys(f"{blk}.dcn.dw_conv.1", norm, "channels_first", "channels_last")
            for lin in ("offset", "mask", "input_proj", "output_proj"):
                keys |= _linear(f"{blk}.dcn.{lin}")
            if cfg["center_feature_scale"]:  # DCNv3: two bare nn.Parameters
                keys |= {f"{blk}.dcn.center_feature_scale_proj_{p}" for p in WB}
            if cfg["layer_scale"] is not None:  # InternImageLayer: gamma1, gamma2
                keys |= {f"{blk}.gamma1", f"{blk}.gamma2"}
            if cfg["res_post_norm"]:  # res_post_norm1/2 = build_norm_layer(channels, 'LN')
                keys |= _norm_keys(f"{blk}.res_post_norm1", "LN")
                keys |= _norm_keys(f"{blk}.res_post_norm2", "LN")
        # InternImageBlock.__init__: `if not self.post_norm or center_feature_scale:
        # self.norm = build_norm_layer(channels, 'LN')`.
        if not cfg["post_norm"] or cfg["center_feature_scale"]:
            keys |= _norm_keys(f"{lvl}.norm", "LN")
        # InternImage.__init__ passes post_norm_block_ids only to level 2 (and only with
        # level2_post_norm); InternImageBlock makes one build_norm_layer per id in post_norms.
        if i == 2 and cfg["level2_ids"]:
            for k in range(len(cfg["level2_ids"])):
                keys |= _norm_keys(f"{lvl}.post_norms.{k}", "LN")
        # DownsampleLayer (all but the last level): conv (bias=False),
        # norm = build_norm_layer(2C, norm_layer, 'channels_first', 'channels_last').
        if i < len(cfg["depths"]) - 1:
            keys |= _linear(f"{lvl}.downsample.conv", bias=False)
            keys |= _norm_keys(f"{lvl}.downsample.norm", norm, "channels_first", "channels_last")
    if cfg["use_clip_projector"]:
        # dcnv3_head_x4 = Sequential(Conv2d (bias), PixelShuffle); dcnv3_head_x3 = Conv2d.
        keys |= _linear("dcnv3_head_x4.0") | _linear("dcnv3_head_x3")
        # AttentionPoolingBlock(qkv_bias=True, norm_layer): norm1_q/k/v =
        # build_norm_layer(dim, norm_layer); CrossAttention: q/k/v Linear(bias=False),
        # q_bias/k_bias/v_bias Parameters, proj Linear.
        for q in "qkv":
            keys |= _norm_keys(f"clip_projector.norm1_{q}", norm)
            keys |= _linear(f"clip_projector.cross_dcn.{q}", bias=False)
            keys.add(f"clip_projector.cross_dcn.{q}_bias")
        keys |= _linear("clip_projector.cross_dcn.proj")
        keys |= _norm_keys("fc_norm", norm)  # fc_norm = build_norm_layer(768, norm_layer)
    else:
        # conv_head = Sequential(Conv2d (bias=False), build_norm_layer(.., 'BN',
        # 'channels_first', 'channels_first'), act): the one BatchNorm, at conv_head.1.0.
        keys |= _linear("conv_head.0", bias=False)
        keys |= _norm_keys("conv_head.1", "BN", "channels_first", "channels_first")
    return keys | _linear("head")


def test_released_stem_keys_are_layer_norms():
    """Item 1 of issue #12: the released stem is LN (keys norm1.1 / norm2.1), never BN."""
    keys = released_keys("internimage_t")
    assert {"patch_embed.norm1.1.weight", "patch_embed.norm1.1.bias",
            "patch_embed.norm2.1.weight", "patch_embed.norm2.1.bias"} <= keys
    assert "conv_head.1.0.running_mean" in keys
    sd = _meta_variant("internimage_t").state_dict()
    assert {k for k in sd if k.startswith("patch_embed.")} == {
        k for k in keys if k.startswith("patch_embed.")}
    # LayerNorm(C//2) then LayerNorm(C) (StemLayer: out_chans // 2, out_chans).
    assert sd["patch_embed.norm1.1.weight"].shape == (32,)
    assert sd["patch_embed.norm2.1.weight"].shape == (64,)


def test_stem_normalises_each_position_over_channels():
    """REFERENCE.md section 1: stem = conv -> LN -> GELU -> conv -> LN, output channels-last.
    A LayerNorm (fresh: weight 1, bias 0, eps 1e-6) leaves every pixel's channel vector with
    mean 0 and variance 1, in training and eval mode alike (a BatchNorm would not)."""
    torch.manual_seed(0)
    stem = build_model("internimage_t", **TINY).patch_embed
    x = torch.randn(2, 3, 32, 48) * 3 + 1
    for train in (True, False):
        out = stem.train(train)(x)
        assert out.shape == (2, 8, 12, 16)  # NHWC, stride 4
        torch.testing.assert_close(out.mean(-1), torch.zeros(2, 8, 12), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 8, 12),
                                   atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_variants_match_released_hf_configs(name):
    spec, cfg = VARIANTS[name], HF_CONFIGS[name]
    got = dict(channels=spec.channels, depths=spec.depths, groups=spec.groups,
               offset_scale=spec.offset_scale, dw_kernel_size=spec.dw_kernel_size,
               layer_scale=spec.layer_scale, post_norm=spec.post_norm,
               res_post_norm=spec.res_post_norm, level2_ids=spec.level2_post_norm_block_ids,
               center_feature_scale=spec.center_feature_scale,
               use_clip_projector=spec.use_clip_projector)
    assert got == {k: v for k, v in cfg.items() if k != "norm_layer"}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_within_one_percent_of_paper(name):
    params = sum(p.numel() for p in _meta_variant(name).parameters())
    assert abs(params / PAPER_PARAMS[name] - 1) < 0.01, params


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_parameter_count_equals_released_model(name):
    model = _meta_variant(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_state_dict_keys_equal_released_layout(name):
    got = set(_meta_variant(name).state_dict())
    want = released_keys(name)
    assert got == want, (sorted(got - want)[:5], sorted(want - got)[:5])


def test_key_shapes_of_h_heads_and_dcn():
    sd = _meta_variant("internimage_h").state_dict()
    assert sd["dcnv3_head_x4.0.weight"].shape == (1024 * 4, 2560, 1, 1)
    assert sd["dcnv3_head_x3.weight"].shape == (1024, 1280, 1, 1)
    assert sd["clip_projector.cross_dcn.proj.weight"].shape == (768, 1024)
    assert sd["head.weight"].shape == (1000, 768)
    assert sd["levels.0.blocks.0.dcn.offset.weight"].shape == (10 * 9 * 2, 320)
    assert sd["levels.0.blocks.0.dcn.dw_conv.0.weight"].shape == (320, 1, 5, 5)
    assert sd["levels.0.blocks.0.dcn.center_feature_scale_proj_weight"].shape == (10, 320)
    t = _meta_variant("internimage_t").state_dict()
    assert t["conv_head.0.weight"].shape == (768, 512, 1, 1)


def test_forward_features_are_four_stages_at_strides_4_to_32():
    model = build_model("internimage_t", **TINY).eval()
    feats = model.forward_features(torch.randn(2, 3, 64, 96))
    assert [f.shape for f in feats] == [
        (2, 16 * 2**i, 64 // 2 ** (i + 2), 96 // 2 ** (i + 2)) for i in range(4)]
    # Channels-last internally: the NCHW outputs are views of NHWC memory.
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1000)


def test_h_style_model_with_clip_projector_runs():
    model = build_model("internimage_h", num_classes=7, channels=32, depths=(1, 1, 6, 1),
                        groups=(1, 2, 4, 8), level2_post_norm_block_ids=(1, 3),
                        drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_pooled(x).shape == (2, 768)
    assert model(x).shape == (2, 7)


def _save_pth(model, path, container=None):
    sd = model.state_dict()
    torch.save({container: sd} if container else sd, path)


@pytest.mark.parametrize("container", [None, "model", "module", "state_dict"])
def test_released_style_pth_loads_strict_with_identical_logits(tmp_path, container):
    torch.manual_seed(0)
    src = build_model("internimage_t", num_classes=10, **TINY).eval()
    _save_pth(src, tmp_path / "ckpt.pth", container)
    dst = build_model("internimage_t", num_classes=10, **TINY).eval()
    report = load_pretrained(dst, tmp_path / "ckpt.pth")
    assert not report.missing and not report.unexpected and not report.dropped
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_safetensors_loads_and_classifier_dropped_for_new_classes(tmp_path):
    from safetensors.torch import save_file

    src = build_model("internimage_t", num_classes=10, **TINY).eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    dst = build_model("internimage_t", num_classes=3, **TINY).eval()
    report = load_pretrained(dst, tmp_path / "w.safetensors")
    assert report.dropped == ["head.weight", "head.bias"]
    assert report.missing == []
    torch.testing.assert_close(dst.forward_pooled(torch.ones(1, 3, 32, 32)),
                               src.forward_pooled(torch.ones(1, 3, 32, 32)))


def test_wrong_variant_and_missing_keys_fail_clearly(tmp_path):
    _save_pth(build_model("internimage_t", **TINY), tmp_path / "t.pth")
    other = build_model("internimage_s", channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
    with pytest.raises(CheckpointError, match="does not match"):
        load_pretrained(other, tmp_path / "t.pth")
    wider = build_model("internimage_t", channels=32, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_pretrained(wider, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(wider, tmp_path / "nope.pth")


def test_file_with_the_old_batchnorm_stem_is_named_as_such(tmp_path):
    """Files written before the stem fix have BatchNorm stem keys (patch_embed.norm1.0.*);
    the error says so instead of listing keys only."""
    sd = build_model("internimage_t", **TINY).state_dict()
    for i, width in ((1, 8), (2, 16)):
        for p in WB:
            del sd[f"patch_embed.norm{i}.1.{p}"]
        bn = torch.nn.BatchNorm2d(width).state_dict()
        sd |= {f"patch_embed.norm{i}.0.{k}": v for k, v in bn.items()}
    torch.save(sd, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="stem is BatchNorm"):
        load_pretrained(build_model("internimage_t", **TINY), tmp_path / "old.pth")


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = build_model("internimage_t", num_classes=5, **TINY)
    ckpt = build_model("internimage_t", num_classes=5, with_cp=True, **TINY)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        m(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_timm_names_create_the_variants():
    model = timm.create_model("internimage_t_1k_224", num_classes=10, **TINY)
    assert model.head.out_features == 10
    with torch.device("meta"):
        h = timm.create_model("internimage_h_22kto1k_640")
    assert sum(p.numel() for p in h.parameters()) == RELEASED_PARAMS["internimage_h"]
    assert "internimage_xl_22kto1k_384" in timm.list_models("internimage*")


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown InternImage model"):
        build_model("internimage_q")
