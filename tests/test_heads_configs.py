"""Mask2Former segmentation and ImageNet-22K pre-training presets: the recipe facts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.classification import ClassificationConfig
from finetune.segmentation import SegmentationConfig
from launch.config import ConfigError, build

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
COCO_STUFF = "seg_mask2former_internimage_h_896_80k_cocostuff164k.yaml"
ADE = "seg_mask2former_internimage_h_896_80k_cocostuff2ade20k.yaml"
MAPILLARY = "seg_mask2former_internimage_h_896_80k_mapillary.yaml"
CITYSCAPES = "seg_mask2former_internimage_h_1024_80k_cityscapes.yaml"
MS_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _head_config(head: dict):
    from transformers import Mask2FormerConfig

    fields = {k: v for k, v in head.items() if k not in ("kind", "test_scales", "test_flip")}
    return Mask2FormerConfig(**fields)


M2F_PRESETS = [COCO_STUFF, ADE, MAPILLARY, CITYSCAPES]
# head parameters the released Mask2Former recipes train at layer 0's lr scale
LAYER0 = ["transformer_module.queries_embedder", "transformer_module.queries_features",
          "transformer_module.level_embed", "class_predictor", "mask_predictor.mask_embedder"]


@pytest.mark.parametrize("name", M2F_PRESETS)
def test_mask2former_presets_hold_a_valid_head_and_segmentation_run(name: str):
    cfg = _load(name)
    head = cfg.pop("head")
    assert head["kind"] == "mask2former"
    pytest.importorskip("transformers")
    assert _head_config(head).num_queries == head["num_queries"]
    run = build(SegmentationConfig, {**cfg, "head": head})
    assert run.model.name == "internimage_h" and run.head.kind == "mask2former"
    assert run.head.mask2former_kwargs() == {k: v for k, v in head.items()
                                             if k not in ("kind", "test_scales", "test_flip")}
    with pytest.raises(ConfigError, match="head.kind"):
        build(SegmentationConfig, {**cfg, "head": {**head, "kind": "segformer"}})


@pytest.mark.parametrize("name", M2F_PRESETS)
def test_mask2former_presets_name_every_head_field(name: str):
    """SegHeadConfig's defaults are the CPU demo's: a paper preset must not inherit them."""
    import dataclasses

    from finetune.segmentation import SegHeadConfig

    fields = {f.name for f in dataclasses.fields(SegHeadConfig)}
    assert fields == set(_load(name)["head"])


@pytest.mark.parametrize("name", M2F_PRESETS)
def test_mask2former_presets_share_the_released_optimiser_and_augmentation(name: str):
    cfg = build(SegmentationConfig, _load(name))
    o = cfg.optim
    assert (o.weight_decay, o.warmup_steps, o.warmup_ratio, o.layer_decay) == (0.05, 1500,
                                                                               1e-6, 0.95)
    assert (o.dcn_lr_mult, o.backbone_lr_mult, o.min_lr, cfg.poly_power) == (1.0, 1.0, 0.0, 1.0)
    assert o.layer0_params == LAYER0
    d = cfg.data
    assert d.photometric and d.cat_max_ratio == 0.75 and d.hflip == 0.5
    assert tuple(d.ratio_range) == (0.5, 2.0) and cfg.eval.size_divisor == 32
    assert cfg.run.max_steps == 80_000 and cfg.head.decoder_layers == 10


def test_ade20k_mask2former_recipe():
    stuff, ade = build(SegmentationConfig, _load(COCO_STUFF)), build(SegmentationConfig,
                                                                     _load(ADE))
    assert stuff.data.kind == "cocostuff" and stuff.data.num_classes == 171
    assert ade.data.num_classes == 150 and ade.data.reduce_zero_label
    for cfg in (stuff, ade):  # the wide head of the released H configs
        h = cfg.head
        assert (h.num_queries, h.hidden_dim, h.num_attention_heads, h.dim_feedforward) == (
            200, 1024, 32, 4096)
        assert (cfg.data.scale_short, cfg.data.scale_long, cfg.data.crop_size) == (
            896, 3584, (896, 896))
        assert cfg.eval.mode == "whole"
    assert (stuff.optim.lr, stuff.optim.grad_clip, ade.optim.lr, ade.optim.grad_clip) == (
        2e-5, 0.0, 1e-5, 0.1)
    # stage 2 starts from stage 1 whole, except the 171-class predictor
    # stage 1's run directory (its latest checkpoint: tests/test_two_stage_recipes.py)
    assert ade.init == stuff.run.output_dir and not ade.init_strict
    assert ade.head.test_flip and ade.head.test_scales == pytest.approx(
        [768 / 896, 832 / 896, 1.0, 960 / 896, 1024 / 896])


def test_cityscapes_two_stage_recipe():
    stage1, stage2 = _load(MAPILLARY), _load(CITYSCAPES)
    s1, s2 = build(SegmentationConfig, stage1), build(SegmentationConfig, stage2)
    assert s1.data.kind == "mapillary" and s1.data.num_classes == 19
    assert s1.data.train_splits == ["training", "validation"]
    assert (s1.data.val_kind, s1.data.crop_size, s1.optim.lr) == ("cityscapes", (896, 896),
                                                                  2e-5)
    assert s2.data.kind == "cityscapes" and s2.data.num_classes == 19
    assert s2.data.crop_size == (1024, 1024) and s2.optim.lr == 1e-5
    for cfg in (s1, s2):
        assert (cfg.data.scale_short, cfg.data.scale_long) == (1024, 2048)
        assert cfg.eval.mode == "slide" and cfg.eval.stride == (512, 512)
        assert cfg.optim.grad_clip == 0.1
    assert stage2["init"] == stage1["run"]["output_dir"]  # stage 1's run directory
    # Same head in both stages (stage 2 loads stage 1 whole); only the test protocol differs.
    assert stage2["head"] == {**stage1["head"], "test_scales": MS_SCALES, "test_flip": True}


@pytest.mark.parametrize("variant", ["l", "xl"])
def test_imagenet22k_pretraining_presets(variant: str):
    cfg = build(ClassificationConfig, _load(f"cls_internimage_{variant}_22k_192.yaml"))
    assert cfg.model.name == f"internimage_{variant}" and cfg.init is None
    assert cfg.data.num_classes == 21_841 and cfg.data.img_size == 192
    assert cfg.run.epochs == 90
    follow_up = build(ClassificationConfig, _load(f"cls_internimage_{variant}_22kto1k_384.yaml"))
    assert follow_up.data.img_size == 384 and follow_up.model.name == cfg.model.name


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("seg_upernet_*.yaml")))
def test_upernet_presets_follow_the_released_mmseg_recipe(name: str):
    cfg = build(SegmentationConfig, _load(name))
    assert cfg.head.kind == "upernet" and cfg.head_channels == 512 and cfg.aux_weight == 0.4
    assert (cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.warmup_ratio) == (
        0.05, 1500, 1e-6)
    assert cfg.poly_power == 1.0 and cfg.run.max_steps == 160_000
    d = cfg.data
    assert d.photometric and d.cat_max_ratio == 0.75 and tuple(d.ratio_range) == (0.5, 2.0)
    assert d.scale_long == 4 * d.scale_short or d.kind == "cityscapes"
    assert cfg.eval.mode == "whole" and cfg.eval.size_divisor == 32
    large = cfg.model.name in ("internimage_l", "internimage_xl")
    assert (cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.grad_clip) == (
        (2e-5, 0.94, 0.1) if large else (6e-5, 1.0, 0.0))
