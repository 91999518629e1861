"""Mask2Former segmentation and ImageNet-22K pre-training presets: the recipe facts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.classification import ClassificationConfig
from finetune.segmentation import SegmentationConfig
from launch.config import ConfigError, build

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
ADE = "seg_mask2former_internimage_h_896_160k_ade20k.yaml"
MAPILLARY = "seg_mask2former_internimage_h_896_80k_mapillary.yaml"
CITYSCAPES = "seg_mask2former_internimage_h_1024_80k_cityscapes.yaml"
MS_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _head_config(head: dict):
    from transformers import Mask2FormerConfig

    fields = {k: v for k, v in head.items() if k not in ("kind", "test_scales", "test_flip")}
    return Mask2FormerConfig(**fields)


@pytest.mark.parametrize("name", [ADE, MAPILLARY, CITYSCAPES])
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


@pytest.mark.parametrize("name", [ADE, MAPILLARY, CITYSCAPES])
def test_mask2former_presets_name_every_head_field(name: str):
    """SegHeadConfig's defaults are the CPU demo's: a paper preset must not inherit them."""
    import dataclasses

    from finetune.segmentation import SegHeadConfig

    fields = {f.name for f in dataclasses.fields(SegHeadConfig)}
    assert fields == set(_load(name)["head"])


def test_ade20k_mask2former_recipe():
    cfg = _load(ADE)
    assert cfg["data"]["num_classes"] == 150 and cfg["data"]["reduce_zero_label"]
    assert cfg["run"]["max_steps"] == 160_000
    assert cfg["head"]["test_scales"] == MS_SCALES and cfg["head"]["test_flip"]


def test_cityscapes_two_stage_recipe():
    stage1, stage2 = _load(MAPILLARY), _load(CITYSCAPES)
    assert stage1["data"]["kind"] == "mapillary" and stage1["data"]["num_classes"] == 19
    assert stage2["data"]["kind"] == "cityscapes" and stage2["data"]["num_classes"] == 19
    assert stage2["run"]["max_steps"] == 80_000
    assert stage2["data"]["crop_size"] == [1024, 1024]
    assert stage2["init"].startswith(stage1["run"]["output_dir"] + "/checkpoints/")
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
