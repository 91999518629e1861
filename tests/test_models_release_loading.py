"""Loading and evaluating released InternImage checkpoints as the released code does.

Released facts checked here (OpenGVLab/InternImage):

- classification/dataset/build.py (build_transform, eval branch) with classification/
  config.py ``_C.TEST.CROP = True`` (no released config changes it): the evaluation resizes
  the short side to ``int(1.0 * IMG_SIZE)`` and centre-crops ``IMG_SIZE`` at every size.
- detection/mmdet_custom/models/backbones/intern_image.py and segmentation/mmseg_custom/
  models/backbones/intern_image.py (``InternImage.init_weights``): a det/seg checkpoint's
  ``state_dict`` holds the trunk under ``backbone.``, which the backbone strips.
- classification/models/intern_image.py (``InternImageLayer.forward``): with
  ``layer_scale`` set, only the ``post_norm`` and plain pre-norm branches exist;
  ``res_post_norm`` acts only without layer scale (its norms are built either way).
- classification/utils.py (``save_checkpoint``): a training checkpoint pickles the yacs
  config under ``'config'`` next to ``'model'``.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch

import models  # noqa: F401  (registers the timm names)
from models import CheckpointError, build_model, load_pretrained
from models.intern_image import InternImageLayer
from models.variants import PRETRAINED_NAMES, VARIANTS

TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)
TINY_H = dict(channels=32, depths=(1, 1, 6, 1), groups=(1, 2, 4, 8),
              level2_post_norm_block_ids=(1, 3), drop_path_rate=0.0)


def _tiny(name: str) -> dict:
    variant = PRETRAINED_NAMES.get(name, (name, 0))[0]
    return TINY_H if VARIANTS[variant].use_clip_projector else TINY


# ---------------------------------------------------------------- timm eval transform
@pytest.mark.parametrize("name", sorted(PRETRAINED_NAMES) + sorted(VARIANTS))
def test_timm_eval_transform_resizes_to_the_input_size_as_released(name):
    """Released build_transform (TEST.CROP=True): Resize(int(1.0 * IMG_SIZE)) then
    CenterCrop(IMG_SIZE), so crop_pct is 1.0 for every released name (224 px included:
    timm's 0.875 would resize T/S/B to 256 first and score another protocol)."""
    model = timm.create_model(name, pretrained=False, **_tiny(name))
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["crop_pct"] == 1.0
    size = cfg["input_size"][-1]
    if name in PRETRAINED_NAMES:
        assert size == PRETRAINED_NAMES[name][1]
    resize, crop = timm.data.create_transform(**cfg).transforms[:2]
    assert resize.size == size
    assert tuple(crop.size) == (size, size)


# ---------------------------------------------------------------- det/seg checkpoints
def _det_seg_file(tmp_path, trunk: torch.nn.Module) -> tuple:
    """A checkpoint laid out as the released mmdet/mmseg ones: {'state_dict': ...,
    'meta': ...} with the trunk under backbone.* next to a neck and heads."""
    gen = torch.Generator().manual_seed(1)
    state = {f"backbone.{k}": v for k, v in trunk.state_dict().items()}
    others = {"neck.lateral_convs.0.conv.weight": torch.randn(8, 32, 1, 1, generator=gen),
              "decode_head.conv_seg.weight": torch.randn(150, 8, 1, 1, generator=gen),
              "decode_head.conv_seg.bias": torch.randn(150, generator=gen),
              "rpn_head.rpn_cls.weight": torch.randn(3, 8, 1, 1, generator=gen)}
    path = tmp_path / "upernet_internimage_t.pth"
    torch.save({"state_dict": state | others,
                "meta": {"mmseg_version": "0.27.0", "CLASSES": ("wall", "building")}}, path)
    return path, sorted(others)


def test_released_det_seg_checkpoint_loads_its_trunk_with_load_pretrained(tmp_path):
    torch.manual_seed(0)
    src = build_model("internimage_t", num_classes=0, **TINY).eval()
    path, others = _det_seg_file(tmp_path, src)
    dst = build_model("internimage_t", num_classes=0, **TINY).eval()
    report = load_pretrained(dst, path)  # strict: every trunk key found
    assert report.loaded == len(src.state_dict())
    assert not report.missing and not report.unexpected
    assert report.stripped_prefix == "backbone."
    assert sorted(report.dropped) == others
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_released_det_seg_checkpoint_loads_into_the_timm_feature_extractor(tmp_path):
    """README: released weights load through pretrained_cfg_overlay={"file": PATH}; timm
    loads a features_only model non-strictly, so a det/seg file used to load 0 tensors."""
    torch.manual_seed(0)
    src = build_model("internimage_t", num_classes=0, **TINY).eval()
    path, _ = _det_seg_file(tmp_path, src)
    net = timm.create_model("internimage_t_1k_224", features_only=True, pretrained=True,
                            pretrained_cfg_overlay={"file": str(path)}, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for got, ref in zip(net(x), src.forward_features(x), strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_released_t_det_seg_file_keeps_its_layer_scale_through_timm(tmp_path):
    """The released T det/seg backbones are built with layer_scale=1.0 (OpenGVLab/
    InternImage detection/configs/coco/mask_rcnn_internimage_t_fpn_1x_coco.py,
    segmentation/configs/ade20k/upernet_internimage_t_512_160k_ade20k.py: ``layer_scale=
    1.0``), which InternImage-T lacks: their files hold trained gamma1/gamma2. timm's
    non-strict load dropped them with a warning, and every stage's features changed; it is
    refused naming the setting, and with it the features are the source's."""
    torch.manual_seed(0)
    src = build_model("internimage_t", num_classes=0, layer_scale=1.0, **TINY).eval()
    with torch.no_grad():  # trained gammas: far from their built value 1.0
        for name, p in src.named_parameters():
            if name.endswith(("gamma1", "gamma2")):
                p.uniform_(0.2, 2.0)
    path, _ = _det_seg_file(tmp_path, src)
    overlay = {"file": str(path)}
    with pytest.raises(CheckpointError, match=r"gamma1.*set layer_scale=1.0 in "
                                              r"timm.create_model"):
        timm.create_model("internimage_t_1k_224", features_only=True, pretrained=True,
                          pretrained_cfg_overlay=overlay, **TINY)
    net = timm.create_model("internimage_t_1k_224", features_only=True, pretrained=True,
                            pretrained_cfg_overlay=overlay, layer_scale=1.0, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for got, ref in zip(net(x), src.forward_features(x), strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # a feature extractor of the first stages only still loads (the later levels' gammas
    # belong to blocks it does not have)
    timm.create_model("internimage_t_1k_224", features_only=True, out_indices=(0, 1),
                      pretrained=True, pretrained_cfg_overlay=overlay, layer_scale=1.0, **TINY)


def test_a_file_of_another_model_is_refused_even_non_strict(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(4, 3, 7, 7),
                          "fc.bias": torch.zeros(10)}}, path)
    with pytest.raises(CheckpointError, match="none of the model's weights"):
        load_pretrained(build_model("internimage_t", **TINY), path, strict=False)
    with pytest.raises(CheckpointError, match="none of the model's weights"):
        timm.create_model("internimage_t_1k_224", features_only=True, pretrained=True,
                          pretrained_cfg_overlay={"file": str(path)}, **TINY)


# ---------------------------------------------------------------- layer_scale + res_post_norm
def test_layer_scale_takes_precedence_over_res_post_norm_as_released():
    """Released InternImageLayer.forward with layer_scale set and post_norm False:
        x = x + gamma1 * dcn(norm1(x));  x = x + gamma2 * mlp(norm2(x))
    res_post_norm1/2 exist (same state-dict keys as the released layer) but are unused."""
    torch.manual_seed(0)
    layer = InternImageLayer(8, 2, layer_scale=0.5, res_post_norm=True,
                             dcn_backend="reference").double().eval()
    with torch.no_grad():  # non-trivial norms and gammas, so any misplaced one shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    # released build_norm_layer(channels, 'LN'): nn.Sequential(nn.LayerNorm) -> ".0."
    assert {k for k in layer.state_dict() if k.startswith("res_post_norm")} == {
        "res_post_norm1.0.weight", "res_post_norm1.0.bias",
        "res_post_norm2.0.weight", "res_post_norm2.0.bias"}
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        want = x + layer.gamma1 * layer.dcn(layer.norm1(x))
        want = want + layer.gamma2 * layer.mlp(layer.norm2(want))
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- training checkpoints
class CfgNode(dict):
    """Stands in for yacs.config.CfgNode: a dict subclass the weights-only reader refuses."""


def test_a_training_checkpoint_with_a_pickled_config_says_how_to_get_its_weights(
        tmp_path, monkeypatch):
    """Released save_checkpoint writes {'model', 'optimizer', 'lr_scheduler',
    'max_accuracy', 'epoch', 'config' (yacs CfgNode), ...}: torch's weights-only reader
    refuses the config, so the error names it and gives the one-off extraction, which
    then loads."""
    torch.manual_seed(0)
    src = build_model("internimage_t", num_classes=5, **TINY).eval()
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": src.state_dict(), "epoch": 299, "max_accuracy": 83.5,
                "config": CfgNode(MODEL=CfgNode(TYPE="intern_image"))}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(build_model("internimage_t", num_classes=5, **TINY), path)
    message = str(info.value)
    assert "CfgNode" in message and "weights_only=False" in message
    # callers that reword torch's own errors (internimage convert, --init) pass it on
    from finetune.convert import read_source
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_source(path)
    # the extraction the message gives, run as written
    code = re.search(r'python -c "(.+?)"', message).group(1)
    monkeypatch.chdir(tmp_path)
    exec(code, {})  # noqa: S102 - the test's own file
    dst = build_model("internimage_t", num_classes=5, **TINY).eval()
    load_pretrained(dst, tmp_path / "weights.pth")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
