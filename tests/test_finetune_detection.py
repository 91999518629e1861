"""Detection fine-tuning on generated shapes: loss falls, COCO metrics logged, resume;
COCOeval of a perfect prediction is AP 1.0."""

from __future__ import annotations

import contextlib
import io
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


def test_coco_eval_counts_detections_as_mmdet_does():
    """mmdet 2.x (the released detection code) evaluates with maxDets (100, 300, 1000):
    pycocotools' summary reports AP at 100 detections per image, AP50/AP75 and the size
    APs at 1000. One image of 120 objects found perfectly: AP50 is 1.0 (at pycocotools'
    default maxDets, 100, it was 0.83), AP itself is taken at 100."""
    from pycocotools.coco import COCO

    from finetune.metrics import coco_evaluate

    boxes = [[10.0 * (i % 12), 10.0 * (i // 12), 8.0, 8.0] for i in range(120)]
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 200, "height": 200}],
                  "categories": [{"id": 1, "name": "dot"}],
                  "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b,
                                   "area": 64.0, "iscrowd": 0} for i, b in enumerate(boxes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - i / 1000}
               for i, b in enumerate(boxes)]
    scores = coco_evaluate(gt, results, iou_types=("bbox",))
    assert scores["bbox_AP50"] == pytest.approx(1.0)
    assert scores["bbox_AP75"] == pytest.approx(1.0)
    assert scores["bbox_AP"] < 0.9  # 100 of the 120 found


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
    # C classes, no background slot, in every class branch (per decoder layer + encoder)
    assert [b.out_features for b in model.class_embed] == [3] * 3
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

    class Items(list):  # map-style, with the training loader's counted read
        def counted_item(self, i: int) -> tuple[int, int]:
            return self[i], 0

    data = Items(range(17))
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
                drawn |= {int(i) for b in loader for i in b.batch} if epoch == 0 else set()
        if batch == 1:  # every image is trained on in an epoch
            assert drawn == set(range(17))


def test_filter_empty_gt_keeps_training_images_with_annotations(tmp_path):
    """mmdet's filter_empty_gt (CocoDataset._filter_imgs, training set only): an image stays
    if it holds any annotation of the dataset's categories, a crowd one included; off (our
    default) and at evaluation every image stays."""
    from finetune.det_data import CocoInstances

    images = [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": 40}
              for i, w in ((1, 50), (2, 30), (3, 60), (4, 20))]
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 9, 9], "area": 81,
             "iscrowd": 0, "segmentation": [[1, 1, 10, 1, 10, 10]]},
            {"id": 2, "image_id": 3, "category_id": 7, "bbox": [2, 2, 9, 9], "area": 81,
             "iscrowd": 1, "segmentation": [[2, 2, 11, 2, 11, 11]]}]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 5, "name": "a"}, {"id": 7, "name": "b"}]}))
    assert CocoInstances(tmp_path, ann, True, filter_empty_gt=True).ids == [1, 3]
    kept = CocoInstances(tmp_path, ann, True, filter_empty_gt=True)
    assert kept.wide == [True, True] and kept.groups == {False: [], True: [0, 1]}
    assert CocoInstances(tmp_path, ann, True).ids == [1, 2, 3, 4]
    assert CocoInstances(tmp_path, ann, False, filter_empty_gt=True).ids == [1, 2, 3, 4]


# The released DINO files (OpenGVLab/InternImage, detection/configs/coco/), value by value:
# what each preset must hold. T: dino_4scale_internimage_t_1x_coco_layer_wise_lr.py, L:
# dino_4scale_internimage_l_1x_coco_layer_wise_lr.py (both on _base_/datasets/coco_detection.py,
# _base_/schedules/schedule_1x.py: 12 epochs, step=[11] in the file); L 0.1x:
# dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.py (the L file but for its optimizer:
# weight_decay 0.05, mmcv's DefaultOptimizerConstructor with custom_keys backbone lr_mult 0.1,
# no layer decay, every parameter decayed); H:
# dino_4scale_internimage_h_objects365_coco_ss.py (20k iterations, no decay step).
_DINO_HEAD = {"num_queries": 900, "d_model": 256, "encoder_layers": 6, "decoder_layers": 6,
              "num_heads": 8, "ffn_dim": 2048, "n_points": 4, "num_feature_levels": 4,
              "out_indices": [1, 2, 3], "dropout": 0.0, "pos_temperature": 20,
              "label_noise_ratio": 0.5, "box_noise_scale": 1.0, "focal_alpha": 0.25,
              "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "weight_class": 1.0,
              "weight_bbox": 5.0, "weight_giou": 2.0, "size_divisible": 32}
_DINO_1X = {"train_sizes": list(range(480, 801, 32)), "test_size": 800, "max_size": 1333}
RELEASED_DINO = {
    "det_dino_internimage_t_1x_coco.yaml": dict(
        model=("internimage_t", 0.2, True), head={**_DINO_HEAD, **_DINO_1X, "num_dn_queries": 100,
                                                 "num_select": 100},
        optim=(1e-4, 1e-4, 0.9, 0.1, 500, 1.0), num_layers=30, batch=2, epochs=12,
        milestones=[11 / 12], filter_empty_gt=True, max_steps=0),
    "det_dino_internimage_l_1x_coco.yaml": dict(
        model=("internimage_l", 0.4, False), head={**_DINO_HEAD, **_DINO_1X, "num_dn_queries": 100,
                                                  "num_select": 300},
        optim=(1e-4, 1e-4, 0.9, 0.1, 500, 1.0), num_layers=37, batch=2, epochs=12,
        milestones=[11 / 12], filter_empty_gt=True, max_steps=0),
    "det_dino_internimage_l_1x_coco_0.1x_backbone_lr.yaml": dict(
        model=("internimage_l", 0.4, False), head={**_DINO_HEAD, **_DINO_1X, "num_dn_queries": 100,
                                                  "num_select": 300},
        optim=(1e-4, 0.05, 1.0, 0.1, 500, 1.0), num_layers=37, batch=2, epochs=12,
        milestones=[11 / 12], filter_empty_gt=True, max_steps=0, layer0_params=[],
        backbone_lr_mult=0.1, decay_all=True),
    "det_dino_internimage_h_coco.yaml": dict(
        model=("internimage_h", 0.5, True), head={**_DINO_HEAD, "num_dn_queries": 1000,
                                                 "num_select": 300, "test_size": 1000,
                                                 "max_size": 2000},
        optim=(1e-4, 1e-4, 0.94, 0.1, 500, 1e-3), num_layers=50, batch=1, epochs=None,
        milestones=[], filter_empty_gt=True, max_steps=20_000),
}


@pytest.mark.parametrize("name", sorted(RELEASED_DINO))
def test_dino_presets_hold_the_released_values(name):
    from dataclasses import asdict

    from finetune.detection import DetectionConfig
    from launch.config import load_config
    from models.variants import VARIANTS

    want = RELEASED_DINO[name]
    cfg = load_config(DetectionConfig, Path(__file__).resolve().parents[1] / "configs" /
                      "finetune" / name)
    m = cfg.model
    assert (m.name, m.drop_path_rate, m.with_cp) == want["model"]
    assert m.channels is None and m.depths is None and m.groups is None  # the variant's own
    # the released paramwise num_layers is the trunk's block count, from which our
    # layer-decay rule derives its depth (runtime/param_groups.py)
    assert sum(VARIANTS[m.name].depths) == want["num_layers"]
    head = asdict(cfg.head)
    assert head["kind"] == "dino"
    assert {k: head[k] for k in want["head"]} == want["head"]
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.layer_decay, o.grad_clip, o.warmup_steps,
            o.head_offset_lr_mult) == want["optim"]
    assert o.dcn_lr_mult == 1.0 and o.min_lr == 0.0
    assert o.layer0_params == want.get("layer0_params", ["level_embed"])
    assert o.backbone_lr_mult == want.get("backbone_lr_mult", 1.0)
    assert o.decay_all is want.get("decay_all", False)
    assert cfg.schedule.kind == "step" and cfg.schedule.gamma == 0.1
    assert cfg.schedule.milestones == pytest.approx(want["milestones"], abs=1e-6)
    assert cfg.run.batch_size == want["batch"] and cfg.run.max_steps == want["max_steps"]
    if want["epochs"] is not None:
        assert cfg.run.epochs == want["epochs"]
    assert cfg.data.hflip == 0.5 and cfg.data.filter_empty_gt is want["filter_empty_gt"]
    assert cfg.run.num_workers == 2  # workers_per_gpu of _base_/datasets/coco_detection.py


@pytest.mark.parametrize("name", ["det_mask_rcnn_internimage_t_fpn_1x_coco.yaml",
                                  "det_mask_rcnn_internimage_t_fpn_3x_coco.yaml",
                                  "det_mask_rcnn_internimage_s_fpn_3x_coco.yaml"])
def test_mask_rcnn_presets_drop_training_images_without_annotations_as_released(name):
    # The released Mask R-CNN files (OpenGVLab/InternImage detection/configs/coco/
    # mask_rcnn_internimage_{t,s}_fpn_{1x,3x}_coco.py) take their dataset from
    # _base_/datasets/coco_instance.py, which sets no filter_empty_gt: mmdet's CocoDataset
    # default (True) drops the ~1% of COCO train2017 images without annotations.
    from finetune.detection import DetectionConfig
    from launch.config import load_config

    cfg = load_config(DetectionConfig, Path(__file__).resolve().parents[1] / "configs" /
                      "finetune" / name)
    assert cfg.data.filter_empty_gt is True


def _one_box_coco():
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt = {"images": [{"id": 1, "height": 200, "width": 200}],
          "categories": [{"id": 5, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "iscrowd": 0,
                           "bbox": [10, 10, 20, 20], "area": 400.0,
                           "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    return coco


def _rle(mask):
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_coco_eval_sizes_masks_by_their_own_area_and_leaves_results_alone():
    """mmdet (>= 2.12, CocoDataset.evaluate_det_segm) drops each result's bbox before the
    segm evaluation: pycocotools otherwise takes a result's area from its box. A thin
    false-positive cross (mask ~1k px, box 130x130) belongs with the small masks, where it
    halves APs. And pycocotools' loadRes writes into the dicts it is given (a box polygon
    as segmentation): box-only results then scored segm AP as if they had masks."""
    import copy

    import numpy as np

    from finetune.metrics import coco_evaluate

    coco = _one_box_coco()
    good = np.zeros((200, 200))
    good[10:30, 10:30] = 1
    cross = np.zeros((200, 200))
    cross[100:104, 60:190] = 1
    cross[60:190, 100:104] = 1
    results = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "score": 0.5,
                "segmentation": _rle(good)},
               {"image_id": 1, "category_id": 5, "bbox": [60, 60, 130, 130], "score": 0.9,
                "segmentation": _rle(cross)}]
    given = copy.deepcopy(results)
    scores = coco_evaluate(coco, results)
    assert results == given
    assert scores["segm_AP"] == pytest.approx(0.5) and scores["segm_APs"] == pytest.approx(0.5)
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    scores = coco_evaluate(coco, boxes_only)
    assert scores["bbox_AP"] > 0 and scores["segm_AP"] == 0.0
