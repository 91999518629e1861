"""Segmentation fine-tuning on generated scenes: UperNet shapes, sliding-window logits,
loss falls, mIoU logged, resume; mIoU arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY = ["data.demo_train=16", "data.demo_val=3", "data.demo_size=64", "data.scale_short=64",
        "data.crop_size=[48,48]", "data.test_short=64", "eval.crop=[48,48]",
        "eval.stride=[32,32]", "run.batch_size=4", "run.max_steps=6", "run.eval_every=6",
        "run.log_every=1", "run.num_workers=0", "run.progress=false", "optim.warmup_steps=0",
        "head_channels=32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_upernet_output_shape():
    from finetune.upernet import UperNetHead

    feats = [torch.randn(2, c, 64 // s, 48 // s) for c, s in ((16, 4), (32, 8), (64, 16),
                                                               (128, 32))]
    assert UperNetHead([16, 32, 64, 128], 7, channels=24)(feats).shape == (2, 7, 16, 12)


def test_slide_logits_covers_every_pixel():
    from finetune.segmentation import slide_logits

    def model(x):  # constant logits: the window average must give them back exactly
        return torch.ones(x.shape[0], 3, *x.shape[-2:])

    out = slide_logits(model, torch.zeros(1, 3, 70, 50), 3, (32, 32), (20, 20))
    assert out.shape == (1, 3, 70, 50) and torch.allclose(out, torch.ones_like(out))


def test_train_loss_falls_metrics_and_resume(cache, tmp_path):
    from finetune.segmentation import SegmentationConfig, build_segmentor, train
    from launch.config import load_config

    torch.manual_seed(0)
    cfg = load_config(SegmentationConfig, None, [*TINY, f"data.cache_dir={cache}"])
    x = torch.randn(2, 3, 48, 40)
    assert build_segmentor(cfg)(x).shape == (2, 4, 48, 40)
    out = tmp_path / "run"
    result = train(cfg, out)
    assert "mIoU" in result and any(k.startswith("IoU.") for k in result)
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]
    cfg = load_config(SegmentationConfig, None,
                      [*TINY, f"data.cache_dir={cache}", "run.max_steps=7"])
    train(cfg, out, resume="auto")
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]


def test_miou_arithmetic():
    from finetune.metrics import ConfusionMatrix

    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 255]])
    cm.update(torch.tensor([[0, 1, 1, 1, 2]]), target)
    s = cm.scores(["a", "b", "c"])
    # class a: tp 1, union 2 -> 0.5; class b: tp 2, union 3 -> 2/3; c never in the target
    assert s["IoU.a"] == pytest.approx(0.5) and s["IoU.b"] == pytest.approx(2 / 3)
    assert s["mIoU"] == pytest.approx((0.5 + 2 / 3) / 2) and "IoU.c" not in s


# ---------------------------------------------------------------- head.kind=mask2former
M2F = ["head.kind=mask2former", "head.num_queries=8", "head.hidden_dim=32",
       "head.feature_size=32", "head.mask_feature_size=32", "head.decoder_layers=2",
       "head.num_attention_heads=2", "head.dim_feedforward=64",
       "head.encoder_feedforward_dim=64", "head.train_num_points=256", "run.threads=1",
       "optim.lr=2e-3", "run.max_steps=8", "run.eval_every=8"]


def test_mask2former_trains_through_the_entrypoint_and_stage2_loads_it_whole(cache, tmp_path,
                                                                             capsys):
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.cli import main
    from launch.config import load_config
    from models import CheckpointError

    torch.manual_seed(0)
    out = tmp_path / "m2f"
    args = [*TINY, *M2F, f"data.cache_dir={cache}"]
    assert main(["finetune", "segmentation", "--output-dir", str(out), *args]) == 0
    records = _records(out)
    losses = [r["loss_mask2former"] for r in records if "loss" in r]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0], losses
    assert "mIoU" in records[-1] and any(k.startswith("IoU.") for k in records[-1])

    # stage 2: a segmenter checkpoint of the same head is loaded whole (head included)
    ckpt = out / "checkpoints" / "last.pt"
    cfg = load_config(SegmentationConfig, None, [*args, f"init={ckpt}"])
    model = build_segmentor(cfg, cfg.init)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # ... and one of another head fails with the reason, not a wall of key errors
    upernet = load_config(SegmentationConfig, None, [*TINY, f"init={ckpt}"])
    with pytest.raises(CheckpointError, match="another head"):
        build_segmentor(upernet, upernet.init)
    assert main(["finetune", "segmentation", "--dry-run", *args, f"init={ckpt}"]) == 0
    assert "whole segmenter" in capsys.readouterr().out


def test_multiscale_flip_evaluation_and_backbone_lr_groups(cache):
    from finetune import runtime
    from finetune.segmentation import (
        SegDataset,
        SegmentationConfig,
        _optimizer_and_schedule,
        build_segmentor,
        evaluate,
    )
    from launch.config import load_config

    torch.manual_seed(0)
    cfg = load_config(SegmentationConfig, None, [
        *TINY, *M2F, f"data.cache_dir={cache}", "head.test_scales=[0.75,1.0]",
        "head.test_flip=true", "eval.mode=whole", "optim.backbone_lr_mult=0.1"])
    model = build_segmentor(cfg)
    scores = evaluate(model, SegDataset(cfg.data, False), cfg, runtime.Dist())
    assert 0 <= scores["mIoU"] <= 1
    opt, _ = _optimizer_and_schedule(model, cfg, 10)
    trunk = {id(p) for p in model.backbone.parameters()}
    for group in opt.param_groups:
        in_trunk = {id(p) in trunk for p in group["params"]}
        assert len(in_trunk) == 1
        if in_trunk == {False}:
            assert group["lr_scale"] == 1.0
        else:
            assert group["lr_scale"] <= 0.1 + 1e-9
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_mapillary_kind_maps_labels_to_cityscapes_train_ids(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.datasets.mapillary import VISTAS_TO_CITYSCAPES, VISTAS_V12_CLASSES
    from finetune.segmentation import SegDataset, SegmentationConfig
    from launch.config import load_config

    road = VISTAS_V12_CLASSES.index(next(n for n, c in VISTAS_TO_CITYSCAPES.items()
                                         if c == "road"))
    for split in ("training", "validation"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "labels").mkdir(parents=True)
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / split / "images/a.jpg")
        label = np.zeros((40, 48), np.uint8)  # id 0 (animal--bird): not a Cityscapes class
        label[20:] = road
        Image.fromarray(label).save(tmp_path / split / "labels/a.png")
    cfg = load_config(SegmentationConfig, None, [
        "data.kind=mapillary", f"data.root={tmp_path}", "data.num_classes=19",
        "data.reduce_zero_label=false"])
    _, labels = SegDataset(cfg.data, False)[0]
    assert set(labels[:20].unique().tolist()) == {255} and set(labels[20:].unique().tolist()) == {0}


def test_a_classification_run_checkpoint_is_a_backbone_init_not_a_segmenter(tmp_path):
    from finetune.segmentation import is_segmenter_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"model": {"patch_embed.conv1.weight": torch.zeros(1)}, "step": 3}, path)
    assert not is_segmenter_checkpoint(path)
    torch.save({"model": {"backbone.patch_embed.conv1.weight": torch.zeros(1)}, "step": 3}, path)
    assert is_segmenter_checkpoint(path)
