"""InternImage family: exact parameter counts, released key layout, loading, features."""

from __future__ import annotations

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

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
WB = ("weight", "bias")
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)


def _meta(name: str, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


def released_keys(name: str) -> set[str]:
    """Every state_dict key of the released reference model, enumerated independently from
    its definition (OpenGVLab/InternImage classification/models/intern_image.py)."""
    spec = VARIANTS[name]
    keys = {f"patch_embed.conv{i}.{p}" for i in (1, 2) for p in WB}
    keys |= {f"patch_embed.norm{i}.0.{p}" for i in (1, 2) for p in BN}
    for i, depth in enumerate(spec.depths):
        lvl = f"levels.{i}"
        for j in range(depth):
            blk = f"{lvl}.blocks.{j}"
            keys |= {f"{blk}.norm1.0.{p}" for p in WB} | {f"{blk}.norm2.0.{p}" for p in WB}
            keys |= {f"{blk}.mlp.fc{k}.{p}" for k in (1, 2) for p in WB}
            keys |= {f"{blk}.dcn.{m}.{p}" for m in ("dw_conv.0", "dw_conv.1.1", "offset", "mask",
                                                   "input_proj", "output_proj") for p in WB}
            if spec.center_feature_scale:
                keys |= {f"{blk}.dcn.center_feature_scale_proj_{p}" for p in WB}
            if spec.layer_scale is not None:
                keys |= {f"{blk}.gamma1", f"{blk}.gamma2"}
            if spec.res_post_norm:
                keys |= {f"{blk}.res_post_norm{k}.0.{p}" for k in (1, 2) for p in WB}
        if not spec.post_norm or spec.center_feature_scale:
            keys |= {f"{lvl}.norm.0.{p}" for p in WB}
        if i == 2 and spec.level2_post_norm_block_ids:
            keys |= {f"{lvl}.post_norms.{k}.0.{p}"
                     for k in range(len(spec.level2_post_norm_block_ids)) for p in WB}
        if i < len(spec.depths) - 1:
            keys |= {f"{lvl}.downsample.conv.weight"} | {f"{lvl}.downsample.norm.1.{p}" for p in WB}
    if spec.use_clip_projector:
        keys |= {f"dcnv3_head_x4.0.{p}" for p in WB} | {f"dcnv3_head_x3.{p}" for p in WB}
        cp = "clip_projector"
        keys |= {f"{cp}.norm1_{q}.0.{p}" for q in "qkv" for p in WB}
        keys |= {f"{cp}.cross_dcn.{q}.weight" for q in "qkv"}
        keys |= {f"{cp}.cross_dcn.{q}_bias" for q in "qkv"}
        keys |= {f"{cp}.cross_dcn.proj.{p}" for p in WB} | {f"fc_norm.0.{p}" for p in WB}
    else:
        keys |= {"conv_head.0.weight"} | {f"conv_head.1.0.{p}" for p in BN}
    return keys | {f"head.{p}" for p in WB}


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_parameter_count_equals_released_model(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_state_dict_keys_equal_released_layout(name):
    got = set(_meta(name).state_dict())
    want = released_keys(name)
    assert got == want, (sorted(got - want)[:5], sorted(want - got)[:5])


def test_key_shapes_of_h_heads_and_dcn():
    sd = _meta("internimage_h").state_dict()
    assert sd["dcnv3_head_x4.0.weight"].shape == (1024 * 4, 2560, 1, 1)
    assert sd["dcnv3_head_x3.weight"].shape == (1024, 1280, 1, 1)
    assert sd["clip_projector.cross_dcn.proj.weight"].shape == (768, 1024)
    assert sd["head.weight"].shape == (1000, 768)
    assert sd["levels.0.blocks.0.dcn.offset.weight"].shape == (10 * 9 * 2, 320)
    assert sd["levels.0.blocks.0.dcn.dw_conv.0.weight"].shape == (320, 1, 5, 5)
    assert sd["levels.0.blocks.0.dcn.center_feature_scale_proj_weight"].shape == (10, 320)
    t = _meta("internimage_t").state_dict()
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
