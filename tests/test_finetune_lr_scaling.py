"""The classification lr follows the run's total batch as the released code scales it.

OpenGVLab/InternImage classification/main.py (before building the optimizer):
``linear_scaled_lr = TRAIN.BASE_LR x DATA.BATCH_SIZE x world_size / 512``, the same for
``TRAIN.WARMUP_LR`` and ``TRAIN.MIN_LR``, each times ``TRAIN.ACCUMULATION_STEPS`` when that
is > 1. Ours: ``optim.lr_batch: 512`` makes ``optim.lr``/``optim.min_lr`` (and the warm-up
start, lr x 1e-3: the released default WARMUP_LR / BASE_LR = 5e-7 / 5e-4,
classification/config.py) per 512 images, scaled to run.batch_size x run.grad_accum x
processes. Before, ``optim.lr`` was absolute: the T preset (4e-3, right at 4096) trained on
8 GPUs at 4x the released lr. The released detection/segmentation configs give an
absolute lr (no ``auto_scale_lr`` in detection/configs/ or segmentation/configs/; mmdet's
train.py scales only with ``--auto-scale-lr`` and a config that has one), so the dense
tasks refuse ``optim.lr_batch``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "finetune"
TINY = ["model.channels=16", "model.depths=[1,1,2,1]", "model.groups=[1,2,4,8]"]
# classification/config.py defaults (the T/S/B files keep them): per 512 images
BASE_LR, WARMUP_LR, MIN_LR = 5e-4, 5e-7, 5e-6


def released_scaled(value: float, batch_per_gpu: int, world_size: int, accum: int) -> float:
    """classification/main.py's linear scaling of BASE_LR / WARMUP_LR / MIN_LR."""
    scaled = value * batch_per_gpu * world_size / 512.0
    if accum > 1:
        scaled *= accum
    return scaled


def _head_lr(opt) -> float:
    return next(g["lr"] for g in opt.param_groups if "head.weight" in g["names"])


def _built(world_size: int, overrides: list[str]):
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier, build_optimizer, build_scheduler
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, [
        *TINY, f"optim.lr={BASE_LR}", f"optim.min_lr={MIN_LR}", "optim.lr_batch=512",
        *overrides])
    with torch.device("meta"):
        model = build_classifier(cfg)
    opt = build_optimizer(model, cfg, world_size=world_size)
    return opt, build_scheduler(opt, cfg, 1000, world_size=world_size)


@pytest.mark.parametrize("world_size, batch, accum", [(1, 64, 1), (2, 64, 1), (2, 32, 2),
                                                      (8, 128, 1)])
def test_peak_min_and_warmup_lr_scale_with_the_total_batch_as_released(world_size, batch,
                                                                       accum):
    run = [f"run.batch_size={batch}", f"run.grad_accum={accum}"]
    peak = released_scaled(BASE_LR, batch, world_size, accum)
    floor = released_scaled(MIN_LR, batch, world_size, accum)
    opt, sched = _built(world_size, [*run, "optim.warmup_steps=0"])
    sched.step_update(0)  # no warm-up: the cosine's start, the peak
    assert _head_lr(opt) == pytest.approx(peak, rel=1e-9)
    sched.step_update(1000)
    assert _head_lr(opt) == pytest.approx(floor, rel=1e-9)
    opt, sched = _built(world_size, [*run, "optim.warmup_steps=10"])
    sched.step_update(0)
    assert _head_lr(opt) == pytest.approx(
        released_scaled(WARMUP_LR, batch, world_size, accum), rel=1e-9)
    # the warm-up ends on the cosine (timm, warmup_prefix False) between the scaled ends
    sched.step_update(10)
    c = 0.5 * (1 + math.cos(math.pi * 10 / 1000))
    assert _head_lr(opt) == pytest.approx(floor + (peak - floor) * c, rel=1e-9)


def test_world_size_two_doubles_the_lr_of_one():
    opt1, sched1 = _built(1, ["optim.warmup_steps=0"])
    opt2, sched2 = _built(2, ["optim.warmup_steps=0"])
    sched1.step_update(0)
    sched2.step_update(0)
    assert _head_lr(opt2) == pytest.approx(2 * _head_lr(opt1), rel=1e-12)


def test_without_lr_batch_the_lr_is_absolute():
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import effective_optim
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, ["optim.lr=3e-3", "optim.min_lr=1e-5"])
    assert cfg.optim.lr_batch is None
    for world in (1, 8):
        o = effective_optim(cfg, world)
        assert (o.lr, o.min_lr) == (3e-3, 1e-5)


# preset -> (GPUs of the total batch its header documents, the absolute lr / min_lr the
# preset held before lr_batch existed, the same values at that batch)
DOCUMENTED = {
    "cls_internimage_t_1k_224": (32, 4e-3, 4e-5),  # 128 x 32 = 4096
    "cls_internimage_s_1k_224": (32, 4e-3, 4e-5),
    "cls_internimage_b_1k_224": (32, 4e-3, 4e-5),
    "cls_internimage_l_22k_192": (32, 1e-3, 1e-5),  # Swin's 22K recipe at 4096
    "cls_internimage_xl_22k_192": (32, 1e-3, 1e-5),
    "cls_internimage_l_22kto1k_384": (32, 2e-5, 0.0),  # 16 x 32 = 512
    "cls_internimage_xl_22kto1k_384": (32, 2e-5, 0.0),
    "cls_internimage_h_jointto1k_224": (16, 3e-5, 3e-7),  # 32 x 16 = 512
    "cls_internimage_h_jointto1k_640": (64, 2e-5, 0.0),  # 8 x 64 = 512
}


def _preset(stem: str):
    from finetune.classification import ClassificationConfig
    from launch.config import load_config

    return load_config(ClassificationConfig, PRESETS / f"{stem}.yaml", ["init=null"])


def test_every_classification_preset_is_listed():
    assert {p.stem for p in PRESETS.glob("cls_*.yaml")} == set(DOCUMENTED)


@pytest.mark.parametrize("stem", sorted(DOCUMENTED))
def test_preset_trains_at_its_former_lr_at_its_documented_batch(stem):
    from finetune.cls_build import effective_optim

    gpus, lr, min_lr = DOCUMENTED[stem]
    cfg = _preset(stem)
    assert cfg.optim.lr_batch == 512
    o = effective_optim(cfg, gpus)
    assert o.lr == pytest.approx(lr, rel=1e-12) and o.min_lr == pytest.approx(min_lr, rel=1e-12)
    # and the released formula at any other GPU count (per 512 images)
    for world in (1, 8):
        want = released_scaled(cfg.optim.lr, cfg.run.batch_size, world, cfg.run.grad_accum)
        assert effective_optim(cfg, world).lr == pytest.approx(want, rel=1e-12)


def test_t_preset_on_8_gpus_trains_at_the_released_lr_not_4x():
    """classification/configs/without_lr_decay/internimage_t_1k_224.yaml: BASE_LR 5e-4 at
    128 per GPU x 8 GPUs = 1024 images: 1e-3 (the preset's former absolute 4e-3 is 4x)."""
    from finetune.cls_build import effective_optim

    cfg = _preset("cls_internimage_t_1k_224")
    assert cfg.run.batch_size == 128
    o = effective_optim(cfg, 8)
    assert o.lr == pytest.approx(1e-3) and o.min_lr == pytest.approx(1e-5)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_tasks_refuse_lr_batch(task):
    from launch.commands.finetune import task_entry
    from launch.config import load_config

    with pytest.raises(ValueError, match=r"optim\.lr_batch: is for classification only"):
        load_config(task_entry(task)[0], None, ["optim.lr_batch=512"])


def test_lr_batch_below_one_is_refused():
    from finetune.classification import ClassificationConfig
    from launch.config import load_config

    with pytest.raises(ValueError, match=r"optim\.lr_batch: must be >= 1"):
        load_config(ClassificationConfig, None, ["optim.lr_batch=0"])


def test_dry_run_shows_total_batch_and_effective_lr(capsys, monkeypatch):
    from launch.cli import main

    args = ["finetune", "classification", "--dry-run", "run.batch_size=128",
            f"optim.lr={BASE_LR}", f"optim.min_lr={MIN_LR}", "optim.lr_batch=512"]
    monkeypatch.setenv("WORLD_SIZE", "8")  # what the launcher would start
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1024 on 8 GPUs" in out and "0.001 on 8 GPUs" in out, out
    monkeypatch.delenv("WORLD_SIZE")
    assert main(args) == 0  # no world size known: a few GPU counts
    out = capsys.readouterr().out
    assert "128 on 1 GPU, 1024 on 8 GPUs, 4096 on 32 GPUs" in out, out
    assert "0.000125 on 1 GPU, 0.001 on 8 GPUs, 0.004 on 32 GPUs" in out, out


@pytest.mark.slow
def test_a_run_logs_and_trains_at_the_scaled_lr(cache, tmp_path, caplog):
    """One process, batch 16 x grad_accum 2 = 32 images per step, lr 2e-3 per 512 and a
    flat schedule (min_lr = lr): every step trains at 2e-3 x 32 / 512 = 1.25e-4 (the
    metrics' ``lr`` is the largest group's, the head's)."""
    import json

    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config

    threads = torch.get_num_threads()
    cfg = load_config(ClassificationConfig, None, [
        f"data.cache_dir={cache}", "run.batch_size=16", "run.grad_accum=2",
        "run.max_steps=2", "run.eval_every=2", "run.log_every=1", "run.num_workers=0",
        "run.progress=false", "run.tensorboard=false", "run.threads=1",
        "optim.lr=2e-3", "optim.min_lr=2e-3", "optim.lr_batch=512", "optim.warmup_steps=0",
        "ema.enabled=false"])
    try:
        with caplog.at_level(logging.INFO, logger="finetune.zero"):
            train(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    want = released_scaled(2e-3, 16, 1, 2)
    assert "total batch 32" in caplog.text and f"lr {want:.4g}" in caplog.text, caplog.text
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    assert len(lrs) == 2 and all(lr == pytest.approx(want, rel=1e-9) for lr in lrs)
