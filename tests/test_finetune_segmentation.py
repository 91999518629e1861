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
