"""InternImage as a timm feature extractor (``features_only=True``)."""

from __future__ import annotations

import pytest
import timm
import torch

import models  # noqa: F401  (registers the timm names)
from models import VARIANTS, build_model
from models.variants import PRETRAINED_NAMES

TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)
STRIDES = [4, 8, 16, 32]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_gives_four_stage_maps_at_strides_4_to_32(name: str):
    with torch.device("meta"):
        net = timm.create_model(name, features_only=True)
        feats = net(torch.empty(2, 3, 64, 96))
    channels = [VARIANTS[name].channels * 2**i for i in range(4)]
    assert net.feature_info.channels() == channels
    assert net.feature_info.reduction() == STRIDES
    assert net.feature_info.module_name() == [f"levels.{i}" for i in range(4)]
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(channels, STRIDES)]


@pytest.mark.parametrize("name", sorted(PRETRAINED_NAMES))
def test_released_names_declare_the_variant_feature_info(name: str):
    with torch.device("meta"):
        net = timm.create_model(name, features_only=True, out_indices=(1, 2, 3))
    base = VARIANTS[PRETRAINED_NAMES[name][0]].channels
    assert net.feature_info.channels() == [base * 2, base * 4, base * 8]
    assert net.feature_info.reduction() == [8, 16, 32]


@pytest.mark.parametrize("out_indices", [(1, 3), (0, 1, 2), 2])
def test_out_indices_subsets_match_the_full_model(out_indices):
    torch.manual_seed(0)
    full = timm.create_model("internimage_t", **TINY).eval()
    net = timm.create_model("internimage_t", features_only=True, out_indices=out_indices,
                            **TINY).eval()
    net.model.load_state_dict(full.state_dict(), strict=False)
    want = list(range(4))[-out_indices:] if isinstance(out_indices, int) else [
        i % 4 for i in out_indices]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = full.forward_stages(x)  # timm's forward_features is the last map only
        got = net(x)
    assert net.feature_info.reduction() == [STRIDES[i] for i in want]
    assert len(got) == len(want)
    for i, feat in zip(want, got):
        torch.testing.assert_close(feat, ref[i])


def test_features_only_drops_unused_stages_and_head():
    net = timm.create_model("internimage_t", features_only=True, out_indices=(0, 1), **TINY)
    assert len(net.model.levels) == 2 and net.model.levels[-1].downsample is None
    assert not hasattr(net.model, "conv_head")
    full = sum(p.numel() for p in timm.create_model("internimage_t", **TINY).parameters())
    assert sum(p.numel() for p in net.parameters()) < full / 4


def test_pretrained_file_loads_into_the_feature_extractor(tmp_path):
    """A classification checkpoint (with head) loads; the stage maps are the model's."""
    torch.manual_seed(0)
    full = build_model("internimage_t", num_classes=7, **TINY).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": full.state_dict()}, path)
    net = timm.create_model("internimage_t_1k_224", features_only=True, pretrained=True,
                            pretrained_cfg_overlay={"file": str(path)}, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for got, ref in zip(net(x), full.forward_features(x)):
            torch.testing.assert_close(got, ref)


def test_forward_intermediates_follows_timm_contract():
    model = timm.create_model("internimage_t", num_classes=5, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        last, inter = model.forward_intermediates(x, indices=[0, 3])
        nhwc = model.forward_intermediates(x, indices=1, output_fmt="NHWC",
                                           intermediates_only=True)
    assert [t.shape[1] for t in inter] == [16, 128]
    torch.testing.assert_close(last, inter[-1])
    assert tuple(nhwc[0].shape) == (1, 1, 1, 128)
