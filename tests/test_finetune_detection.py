"""Detection fine-tuning on generated shapes: loss falls, COCO metrics logged, resume;
COCOeval of a perfect prediction is AP 1.0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY = ["data.demo_train=16", "data.demo_val=4", "data.demo_size=64", "run.batch_size=4",
        "detector.train_sizes=[64]", "detector.test_size=64", "detector.max_size=64",
        "run.max_steps=6", "run.eval_every=6", "run.log_every=1", "run.num_workers=0",
        "run.progress=false", "optim.warmup_steps=0"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_loss_falls_metrics_and_resume(cache, tmp_path):
    from finetune.detection import DetectionConfig, train
    from launch.config import load_config

    torch.manual_seed(0)
    cfg = load_config(DetectionConfig, None, [*TINY, f"data.cache_dir={cache}"])
    out = tmp_path / "run"
    result = train(cfg, out)
    assert {"bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP"} <= set(result)
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]
    cfg = load_config(DetectionConfig, None,
                      [*TINY, f"data.cache_dir={cache}", "run.max_steps=7"])
    train(cfg, out, resume="auto")
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]


def test_coco_eval_of_perfect_prediction_is_one(cache):
    from pycocotools.coco import COCO

    from finetune.demo_data import ensure_shapes_coco
    from finetune.metrics import coco_evaluate

    root = ensure_shapes_coco(cache, 16, 4, 64)
    gt = COCO(str(root / "annotations" / "instances_val.json"))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "segmentation": a["segmentation"], "score": 1.0} for a in gt.dataset["annotations"]]
    scores = coco_evaluate(gt, results)
    assert scores["bbox_AP"] == pytest.approx(1.0) and scores["segm_AP"] == pytest.approx(1.0)
    assert scores["bbox_AP50"] == pytest.approx(1.0)
    # a wrong class everywhere scores 0
    wrong = [{**r, "category_id": r["category_id"] % 3 + 1} for r in results]
    assert coco_evaluate(gt, wrong)["bbox_AP"] == pytest.approx(0.0)


DINO = ["head.kind=dino", "head.num_queries=20", "head.decoder_layers=2", "head.ffn_dim=128",
        "head.num_dn_queries=10", "head.train_sizes=[64]", "head.test_size=64",
        "head.max_size=64", "run.threads=1", "optim.lr=1e-3", "optim.grad_clip=0.1",
        "data.hflip=0", "run.max_steps=16", "run.eval_every=16"]


def test_dino_trains_through_the_entrypoint(cache, tmp_path, capsys):
    from finetune.detection import DetectionConfig, build_model, optimizer_and_schedule
    from launch.cli import main
    from launch.config import load_config

    torch.manual_seed(0)
    out = tmp_path / "dino"
    args = [*TINY, *DINO, f"data.cache_dir={cache}"]
    assert main(["finetune", "detection", "--output-dir", str(out), *args]) == 0
    records = _records(out)
    losses = [r["loss"] for r in records if "loss" in r]
    # DINO's loss is noisy step to step (CDN noise, a new batch each step): compare means
    assert len(losses) == 16 and sum(losses[-4:]) < 0.95 * sum(losses[:4]), losses
    assert {"bbox_AP", "bbox_AP50", "bbox_AP75"} <= set(records[-1])
    assert "segm_AP" not in records[-1]  # DINO predicts boxes only

    cfg = load_config(DetectionConfig, None, [*args, "optim.backbone_lr_mult=0.5"])
    model = build_model(cfg, 3)
    assert model.class_embed.out_features == 3  # C classes, no background slot
    opt, _ = optimizer_and_schedule(model, cfg, 10)
    trunk = {id(p) for p in model.backbone.parameters()}
    assert all(g["lr_scale"] <= 0.5 for g in opt.param_groups
               if any(id(p) in trunk for p in g["params"]))
    assert main(["finetune", "detection", "--dry-run", *args]) == 0
    assert "DINO(20 queries" in capsys.readouterr().out


def test_mask_rcnn_proposals_and_roi_align_follow_mmdets_base():
    """mmdet's _base_/models/mask_rcnn_r50_fpn.py (the released Mask R-CNN base): 1000 RPN
    proposals after NMS in training (torchvision's default 2000), 1000 at test; RoIAlign
    sampling_ratio=0 for the 7x7 box and 14x14 mask features (torchvision's default 2)."""
    from finetune.detection import DetectionConfig, build_model
    from launch.config import ConfigError, load_config

    model = build_model(load_config(DetectionConfig, None, []), 3)
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}  # mmdet nms_pre
    for pool, size in ((model.roi_heads.box_roi_pool, (7, 7)),
                       (model.roi_heads.mask_roi_pool, (14, 14))):
        assert pool.sampling_ratio == 0 and pool.output_size == size
        assert pool.featmap_names == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match="detector.roi_sampling_ratio"):
        load_config(DetectionConfig, None, ["detector.roi_sampling_ratio=-1"])


def test_step_schedule_milestones_are_not_shifted_by_the_warmup():
    """mmdet's step policy (the released 1x/3x configs): the lr drops at the milestone
    fraction of the run, the warm-up overlaying the first steps rather than delaying it."""
    from finetune.detection import DetectionConfig, build_model, optimizer_and_schedule
    from launch.config import load_config

    cfg = load_config(DetectionConfig, None, ["schedule.kind=step", "schedule.milestones=[0.5]",
                                              "optim.warmup_steps=10", "optim.lr=1e-3"])
    opt, sched = optimizer_and_schedule(build_model(cfg, 3), cfg, 100)

    def lr(step: int) -> float:
        sched.step_update(step)
        return max(g["lr"] for g in opt.param_groups)

    assert lr(0) == pytest.approx(1e-6)
    assert lr(40) == pytest.approx(1e-3)
    assert lr(55) == pytest.approx(1e-4)  # a warm-up prefix would hold 1e-3 until step 60


def test_steps_per_epoch_are_the_steps_each_ranks_loader_yields():
    """Detection and segmentation count an epoch's optimizer steps from the loader they
    train on. torch's DistributedSampler (``drop_last=False``) pads the set so each of W
    ranks draws ceil(N / W) samples (torch.utils.data.distributed.DistributedSampler docs),
    so with 17 images on 2 ranks an epoch of batch 1 is 9 steps, not 17 // 2 = 8: the
    schedule's epochs must end where the loader's do, as a mid-epoch resume assumes."""
    from finetune.dense_data import train_batches
    from runtime.dist import DistInfo

    data = list(range(17))  # map-style: what a loader and a sampler need
    # (world size, batch, grad_accum) -> steps per epoch: whole steps of ceil(17 / world)
    cases = {(2, 1, 1): 9, (2, 3, 1): 3, (2, 2, 2): 2, (2, 4, 2): 1, (1, 4, 1): 4}
    for (world, batch, accum), steps in cases.items():
        drawn = set()
        for rank in range(world):
            batches, got = train_batches(data, DistInfo(rank=rank, world_size=world),
                                         batch_size=batch, grad_accum=accum, seed=0,
                                         num_workers=0)
            assert got == steps, (world, batch, accum)
            for epoch in (0, 1):
                loader = list(batches(epoch))
                assert len(loader) // accum == steps, (world, batch, accum, rank, epoch)
                drawn |= {int(i) for b in loader for i in b} if epoch == 0 else set()
        if batch == 1:  # every image is trained on in an epoch
            assert drawn == set(range(17))
