"""Segmentation fine-tuning on generated scenes: UperNet shapes, sliding-window logits,
loss falls, mIoU logged, resume; mIoU arithmetic."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TINY = ["data.demo_train=16", "data.demo_val=3", "data.demo_size=64", "data.scale_short=64",
        "data.crop_size=[48,48]", "data.test_short=64", "eval.crop=[48,48]",
        "eval.stride=[32,32]", "run.batch_size=4", "run.max_steps=6", "run.eval_every=6",
        "run.log_every=1", "run.num_workers=0", "run.progress=false", "optim.warmup_steps=0",
        "head_channels=32"]


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
    # class a: tp 1, union 2 -> 0.5; class b: tp 2, union 3 -> 2/3; c predicted only on
    # the ignored pixel: never seen, left out
    assert s["IoU.a"] == pytest.approx(0.5) and s["IoU.b"] == pytest.approx(2 / 3)
    assert s["mIoU"] == pytest.approx((0.5 + 2 / 3) / 2) and "IoU.c" not in s
    # mmseg (total_area_to_metrics, then nanmean): IoU = intersect / union is NaN only
    # when the union is empty, so c predicted on a labelled pixel counts, with IoU 0;
    # accuracy = intersect / label area leaves c out (never labelled)
    cm.update(torch.tensor([[2]]), torch.tensor([[0]]))
    s = cm.scores(["a", "b", "c"])
    assert s["IoU.c"] == 0 and s["IoU.a"] == pytest.approx(1 / 3)
    assert s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert s["mAcc"] == pytest.approx((1 / 3 + 1) / 2)


def test_pixel_loss_averages_over_every_pixel_ignored_ones_counting_zero():
    """mmseg 0.x CrossEntropyLoss (avg_non_ignore=False, its default; the released UperNet
    recipes keep it): the per-pixel losses summed, divided by all pixels."""
    import torch.nn.functional as F

    from finetune.upernet import pixel_cross_entropy

    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, :2] = 255
    per_pixel = F.cross_entropy(logits, labels.clamp(max=3), reduction="none")
    per_pixel[labels == 255] = 0
    torch.testing.assert_close(pixel_cross_entropy(logits, labels), per_pixel.mean())


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
    ckpt = out  # the run directory: its checkpoints/latest names the last complete one
    cfg = load_config(SegmentationConfig, None, [*args, f"init={ckpt}"])
    model = build_segmentor(cfg, cfg.init)
    # DeepSpeed (ZeRO stage 0) keeps the whole module state under "module" in
    # mp_rank_00_model_states.pt; the engine wrapped the segmenter as ``model``
    tag = (out / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["module"]
    saved = {k.removeprefix("model."): v for k, v in saved.items()}
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # ... and one of another head fails with the reason, not a wall of key errors
    upernet = load_config(SegmentationConfig, None, [*TINY, f"init={ckpt}"])
    with pytest.raises(CheckpointError, match="another head"):
        build_segmentor(upernet, upernet.init)
    assert main(["finetune", "segmentation", "--dry-run", *args, f"init={ckpt}"]) == 0
    assert "whole segmenter" in capsys.readouterr().out


def test_multiscale_flip_evaluation_and_backbone_lr_groups(cache):
    from finetune.segmentation import (
        SegDataset,
        SegmentationConfig,
        build_segmentor,
        evaluate,
        optimizer_and_schedule,
    )
    from launch.config import load_config
    from runtime.dist import DistInfo

    torch.manual_seed(0)
    cfg = load_config(SegmentationConfig, None, [
        *TINY, *M2F, f"data.cache_dir={cache}", "head.test_scales=[0.75,1.0]",
        "head.test_flip=true", "eval.mode=whole", "optim.backbone_lr_mult=0.1"])
    model = build_segmentor(cfg)
    scores = evaluate(model, SegDataset(cfg.data, False), cfg, DistInfo())
    assert 0 <= scores["mIoU"] <= 1
    opt, _ = optimizer_and_schedule(model, cfg, 10)
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


def test_rescale_caps_the_long_side_and_test_images_stretch_to_a_multiple():
    from finetune.segmentation import resize_short_side, resize_to_multiple

    img, label = torch.zeros(3, 100, 400), torch.zeros(100, 400, dtype=torch.long)
    # mmseg img_scale=(long 200, short 100): a 1:4 image is bounded by its long side
    assert resize_short_side(img, label, 100, 200)[0].shape[-2:] == (50, 200)
    assert resize_short_side(img, label, 100)[1].shape == (100, 400)  # no cap: short side rules
    assert resize_to_multiple(torch.zeros(1, 3, 50, 200), 32).shape[-2:] == (64, 224)
    assert resize_to_multiple(torch.zeros(1, 3, 64, 96), 32).shape[-2:] == (64, 96)


def test_crops_dominated_by_one_class_are_redrawn():
    import random

    from finetune.segmentation import crop_is_dominated, random_crop

    label = torch.zeros(40, 400, dtype=torch.long)
    label[:, 360:] = 1  # only windows reaching the right edge see two classes
    img = torch.zeros(3, 40, 400)
    random.seed(0)
    plain = [crop_is_dominated(random_crop(img, label, (40, 80))[1], 0.75) for _ in range(200)]
    random.seed(0)
    retried = [crop_is_dominated(random_crop(img, label, (40, 80), 0.75)[1], 0.75)
               for _ in range(200)]
    assert sum(retried) < 0.7 * sum(plain), (sum(retried), sum(plain))
    assert crop_is_dominated(torch.full((4, 4), 255), 0.75)  # nothing labelled: retry too


def test_photometric_distortion_stays_in_range_and_is_seeded():
    import random

    from finetune.photometric import photometric_distortion

    img = torch.rand(3, 16, 16) * 255
    outs = [photometric_distortion(img, random.Random(seed)) for seed in range(12)]
    assert all(o.min() >= 0 and o.max() <= 255 for o in outs)
    assert sum(not torch.allclose(o, img) for o in outs) >= 10  # 1/16 chance each of no change
    assert torch.equal(outs[3], photometric_distortion(img, random.Random(3)))


def test_cocostuff_stuffthingmaps_map_to_171_train_ids(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.segmentation import SegDataset, SegmentationConfig
    from launch.config import load_config

    for split in ("train2017", "val2017"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((2, 5, 3), np.uint8)).save(tmp_path / "images" / split / "1.jpg")
    # stored ids (COCO category id - 1): person 0, stop sign 12 (11 is unused), 181 (last
    # stuff class), unused 90, unlabeled 255
    raw = np.array([[0, 12, 181, 90, 255]] * 2, np.uint8)
    Image.fromarray(raw).save(tmp_path / "annotations" / "val2017" / "1.png")
    cfg = load_config(SegmentationConfig, None, [
        "data.kind=cocostuff", f"data.root={tmp_path}", "data.num_classes=171",
        "data.reduce_zero_label=false"])
    _, labels = SegDataset(cfg.data, False)[0]
    assert labels[0].tolist() == [0, 11, 170, 255, 255]
    # converted *_labelTrainIds.png files win and are read as they are
    Image.fromarray(np.full((2, 5), 7, np.uint8)).save(
        tmp_path / "annotations" / "val2017" / "1_labelTrainIds.png")
    assert set(SegDataset(cfg.data, False)[0][1].unique().tolist()) == {7}
    with pytest.raises(ValueError, match="1 of 1 images .* have no label file"):
        SegDataset(cfg.data, True)  # train2017 has an image without a label


def test_mapillary_stage_trains_on_both_splits_and_evaluates_on_cityscapes(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.segmentation import SegDataset, SegmentationConfig
    from launch.config import ConfigError, load_config

    vistas, cityscapes = tmp_path / "vistas", tmp_path / "cityscapes"
    for split in ("training", "validation"):
        (vistas / split / "images").mkdir(parents=True)
        (vistas / split / "labels").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(vistas / split / "images" / "a.jpg")
        Image.fromarray(np.full((8, 8), 13, np.uint8)).save(vistas / split / "labels" / "a.png")
    city = cityscapes / "leftImg8bit" / "val" / "ulm"
    city.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(city / "ulm_1_leftImg8bit.png")
    gt = cityscapes / "gtFine" / "val" / "ulm"
    gt.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 18, np.uint8)).save(gt / "ulm_1_gtFine_labelTrainIds.png")
    args = ["data.kind=mapillary", f"data.root={vistas}", "data.num_classes=19",
            "data.reduce_zero_label=false", "data.train_splits=[training,validation]",
            "data.val_kind=cityscapes", f"data.val_root={cityscapes}"]
    cfg = load_config(SegmentationConfig, None, args)
    assert len(SegDataset(cfg.data, True)) == 2
    val = SegDataset(cfg.data, False)
    assert len(val) == 1 and set(val[0][1].unique().tolist()) == {18}
    with pytest.raises(ConfigError, match="data.train_splits"):
        load_config(SegmentationConfig, None, [*args, "data.train_splits=[train]"])
    with pytest.raises(ConfigError, match="data.val_kind"):
        load_config(SegmentationConfig, None, [*args, "data.val_kind=ade20k"])


def test_released_mask2former_layer_decay_groups():
    from finetune.segmentation import SegmentationConfig, build_segmentor, optimizer_and_schedule
    from launch.config import load_config

    layer0 = ["transformer_module.queries_embedder", "class_predictor"]
    cfg = load_config(SegmentationConfig, None, [
        *TINY, *M2F, "optim.layer_decay=0.5", f"optim.layer0_params={json.dumps(layer0)}"])
    model = build_segmentor(cfg)
    opt, _ = optimizer_and_schedule(model, cfg, 10)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    top = sum(model.backbone.depths) + 1  # head layer id: the full lr
    assert scale["model.class_predictor.weight"] == pytest.approx(0.5 ** top)
    assert scale["model.model.transformer_module.queries_embedder.weight"] == pytest.approx(
        0.5 ** top)
    assert scale["model.model.transformer_module.queries_features.weight"] == 1.0
    offsets = [n for n in wd if "sampling_offsets.weight" in n]
    assert offsets and all(wd[n] == 0 for n in offsets)  # as the released constructor


def test_a_whole_init_of_another_class_count_loads_all_but_the_predictor(tmp_path):
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.config import load_config
    from models import CheckpointError

    torch.manual_seed(0)
    source = build_segmentor(load_config(SegmentationConfig, None, [*TINY, *M2F,
                                                                     "data.num_classes=6"]))
    ckpt = tmp_path / "last.pt"
    torch.save({"model": source.state_dict(), "step": 1}, ckpt)
    args = [*TINY, *M2F, "data.num_classes=4", f"init={ckpt}"]
    with pytest.raises(CheckpointError, match="shape"):
        build_segmentor(load_config(SegmentationConfig, None, args), str(ckpt))
    model = build_segmentor(load_config(SegmentationConfig, None, [*args, "init_strict=false"]),
                            str(ckpt))
    saved = source.state_dict()
    state = model.state_dict()
    differ = {k for k, v in state.items() if v.shape != saved[k].shape}
    assert differ == {"model.class_predictor.weight", "model.class_predictor.bias",
                      "model.criterion.empty_weight"}
    assert all(torch.equal(v, saved[k]) for k, v in state.items() if k not in differ)


def test_upernet_auxiliary_head_adds_a_weighted_loss_and_is_left_out_of_inference():
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.config import ConfigError, load_config

    torch.manual_seed(0)
    cfg = load_config(SegmentationConfig, None, [*TINY, "aux_weight=0.4"])
    model = build_segmentor(cfg)
    x, labels = torch.randn(2, 3, 64, 64), torch.randint(0, cfg.data.num_classes, (2, 64, 64))
    losses = model.loss(x, labels)
    assert set(losses) == {"loss_ce", "loss_aux"}
    model.auxiliary_head.classifier.weight.data.zero_()
    model.auxiliary_head.classifier.bias.data.zero_()  # uniform aux logits: CE = log(C)
    aux = model.loss(x, labels)["loss_aux"]
    assert aux.item() == pytest.approx(0.4 * torch.log(torch.tensor(4.0)).item(), rel=1e-5)
    assert model(x).shape == (2, cfg.data.num_classes, 64, 64)
    plain = build_segmentor(load_config(SegmentationConfig, None, TINY))
    assert plain.auxiliary_head is None and set(plain.loss(x, labels)) == {"loss_ce"}
    with pytest.raises(ConfigError, match="aux_weight"):
        load_config(SegmentationConfig, None, [*TINY, *M2F, "aux_weight=0.4"])


def test_zero2_trains_and_its_checkpoint_is_a_whole_stage2_init(cache, tmp_path):
    """Issue #13: dense tasks run on the DeepSpeed engine, ZeRO stage from run.zero_stage.
    ZeRO-2 partitions the optimizer states (DeepSpeed names each rank's shard
    zero_pp_rank_<r>_mp_rank_00_optim_states.pt); a stage-2 init from that run gets the
    weights DeepSpeed's own zero_to_fp32 consolidates."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from finetune.segmentation import SegmentationConfig, build_segmentor, train
    from launch.config import load_config

    args = [*TINY, f"data.cache_dir={cache}", "run.max_steps=2", "run.eval_every=2"]
    out = tmp_path / "zero2"
    result = train(load_config(SegmentationConfig, None, [*args, "run.zero_stage=2"]), out)
    assert "mIoU" in result
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    model = build_segmentor(load_config(SegmentationConfig, None, [*args, f"init={out}"]),
                            str(out))
    own = model.state_dict()
    params = {k.removeprefix("model."): v for k, v in consolidated.items()}
    assert set(params) <= set(own) and any(k.startswith("backbone.") for k in params)
    assert all(torch.equal(own[k], v.to(own[k].dtype)) for k, v in params.items())
    # the DeepSpeed config the engine ran with is written next to the run's config
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    # a directory holding only an earlier version's last.pt refuses --resume auto
    from models import CheckpointError

    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "step": 3}, legacy / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="last.pt"):
        train(load_config(SegmentationConfig, None, args), legacy, resume="auto")
    # ZeRO-3 (accepted since issue #13): tests/test_finetune_zero3_dense.py


def test_eval_every_0_evaluates_and_checkpoints_every_epoch(monkeypatch, tmp_path):
    """``run.eval_every: 0`` is documented (finetune/config.py RunConfig) as "at every epoch
    end", for every task; segmentation evaluated every 2 epochs. The loop's inputs are
    captured; data, model and optimizer are stand-ins, the cadence is what is checked."""
    import finetune.loop
    import finetune.segmentation as seg
    from launch.config import load_config

    cfg = load_config(seg.SegmentationConfig, None, ["run.epochs=3", "run.eval_every=0",
                                                    "run.checkpoint_every=0"])
    steps_per_epoch = 125
    captured = {}
    # (no files: the ranks agree on an empty listing)
    monkeypatch.setattr(seg, "SegDataset", lambda data, train: SimpleNamespace(pairs=[]))
    monkeypatch.setattr(seg, "build_segmentor", lambda cfg, init: torch.nn.Linear(1, 1))
    monkeypatch.setattr(seg, "train_batches", lambda *a, **k: (None, steps_per_epoch))
    monkeypatch.setattr(seg, "optimizer_and_schedule", lambda *a: (None, None))
    monkeypatch.setattr(finetune.loop, "run_loop", lambda **kw: captured.update(kw) or {})
    seg.train(cfg, tmp_path)
    assert captured["total_steps"] == 3 * steps_per_epoch
    assert captured["eval_every"] == captured["checkpoint_every"] == steps_per_epoch


def test_a_one_image_upernet_batch_is_refused_at_the_start(cache, tmp_path, capsys):
    """BatchNorm cannot train on one value per channel, which UperNet's 1x1 pyramid-pooling
    bin holds with one image per BatchNorm (one process, or any number without CUDA's
    SyncBatchNorm). It raised in the first forward, after the run directory was made."""
    from launch.cli import main

    out = tmp_path / "runs" / "run"
    code = main(["finetune", "segmentation", "--output-dir", str(out), *TINY,
                 "run.batch_size=1", f"data.cache_dir={cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert err[-1].startswith("internimage finetune: ") and "Traceback" not in "\n".join(err)
    assert "run.batch_size=1" in err[-1] and "run.batch_size >= 2" in err[-1]
    assert not (tmp_path / "runs").exists()


def test_upernet_heads_start_from_mmsegs_initialisation():
    """mmseg 0.x, which the released UperNet recipes run: the classifier (conv_seg) is
    N(0, 0.01) with bias 0 (BaseDecodeHead's init_cfg Normal std=0.01 override conv_seg),
    each conv of a ConvModule kaiming-normal with mode fan_out (mmcv's ConvModule runs
    kaiming_init on construction). torch's defaults gave the classifier std ~0.026 and a
    random bias per class."""
    import math

    from finetune.upernet import FCNAuxHead, UperNetHead

    torch.manual_seed(0)
    head = UperNetHead([64, 128, 256, 512], num_classes=150, channels=512)
    aux = FCNAuxHead(256, num_classes=150)
    for classifier in (head.classifier, aux.classifier):
        assert torch.equal(classifier.bias, torch.zeros(150))
        assert classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    for conv, fan_out in ((head.fuse[0], 512 * 9), (head.lateral[0][0], 512),
                          (head.ppm.bottleneck[0], 512 * 9), (aux.conv[0], 256 * 9)):
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


def test_a_mask2former_resume_with_other_head_sizes_is_refused_before_the_engine(
        cache, tmp_path, capsys):
    """Mask2Former's sizes were not in the segmentation model hash: a resume with another
    head.num_queries passed the hash and failed inside DeepSpeed's load (size mismatch)
    with advice that could not help. Now refused first, in one line. A checkpoint written
    before the sizes were hashed (its hash without them) still resumes with its config."""
    import json as json_module

    from finetune.segmentation import SegmentationConfig, segmentation_model_hash
    from launch.cli import main
    from launch.config import load_config

    out = tmp_path / "m2f"
    args = [*TINY, *M2F, f"data.cache_dir={cache}", "run.max_steps=2", "run.eval_every=2"]
    assert main(["finetune", "segmentation", "--output-dir", str(out), *args]) == 0
    capsys.readouterr()
    assert main(["finetune", "segmentation", "--output-dir", str(out), *args,
                 "head.num_queries=6", "run.max_steps=3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was saved for a different model" in err[0], err
    # a checkpoint of the version before: its hash without the head sizes
    state_file = out / "checkpoints" / "step_0000002" / "trainer_state.json"
    state = json_module.loads(state_file.read_text())
    cfg = load_config(SegmentationConfig, None, args)
    assert state["model_hash"] == segmentation_model_hash(cfg)
    state["model_hash"] = segmentation_model_hash(cfg, head_sizes=False)
    state_file.write_text(json_module.dumps(state))
    assert main(["finetune", "segmentation", "--output-dir", str(out), *args,
                 "run.max_steps=3", "run.eval_every=3", "--resume", "auto"]) == 0
