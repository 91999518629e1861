"""The lr each parameter group actually trains at, for every fine-tuning preset.

The scales are the released recipes' (tests/released_lr.py, from OpenGVLab/InternImage):
the classification optimizer's keyword ratios times ``DCN_LR_MUL`` on the offset layers
for the ``cls_*`` presets; the dense tasks' layer-decay optimizer constructors
(``layer_decay_rate ** (num_layers - layer_id - 1)``, ``num_layers = sum(depths) + 2``,
neck/head = the last layer) times ``offset_lr_scale`` for the deformable-attention
offsets. The lr schedule then scales each group's initial lr, so a group trains at
``base_lr * schedule(t) * scale``; except that the released classification cosine runs each
group from its own peak ``scale * base_lr`` to the one absolute ``MIN_LR`` (timm's
scheduler over groups holding their scaled lr). The test steps the real scheduler of each
preset (tiny backbone on the meta device, the preset's heads and optimiser values) and reads
the lr the optimizer holds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "finetune").glob("*.yaml"))
TINY = ["model.channels=16", "model.depths=[1,1,2,1]", "model.groups=[1,2,4,8]"]
DEPTHS = [1, 1, 2, 1]
STEPS, STEPS_PER_EPOCH = 20_000, 200


def _task(path: Path) -> str:
    stem = path.stem
    if stem.startswith(("cls_", "classification")):
        return "classification"
    return "detection" if stem.startswith(("det_", "detection")) else "segmentation"


def _build(path: Path):
    """(config, model on meta, optimizer, scheduler, warm-up steps) through the task's code."""
    from launch.config import load_config

    overrides = list(TINY)
    if "init" in (yaml.safe_load(path.read_text()) or {}):
        overrides.append("init=null")  # the released/stage-1 weights are not needed here
    task = _task(path)
    if task == "classification":
        from finetune.classification import ClassificationConfig
        from finetune.cls_build import build_classifier, build_optimizer, build_scheduler

        cfg = load_config(ClassificationConfig, path, overrides)
        with torch.device("meta"):
            model = build_classifier(cfg)
        # the GPU count at which the lr is optim.lr as given: the total batch is
        # optim.lr_batch (scaling to other totals: tests/test_finetune_lr_scaling.py)
        per_gpu = cfg.run.total_batch(1)
        world = cfg.optim.lr_batch // per_gpu if cfg.optim.lr_batch else 1
        assert cfg.run.total_batch(world) == (cfg.optim.lr_batch or per_gpu)
        opt = build_optimizer(model, cfg, world_size=world)
        return (cfg, model, opt,
                build_scheduler(opt, cfg, STEPS, STEPS_PER_EPOCH, world_size=world),
                cfg.optim.warmup(STEPS_PER_EPOCH))
    if task == "detection":
        from finetune.detection import DetectionConfig, build_model, optimizer_and_schedule

        cfg = load_config(DetectionConfig, path, overrides)
        with torch.device("meta"):
            model = build_model(cfg, num_classes=80)
    else:
        from finetune.segmentation import (
            SegmentationConfig,
            build_segmentor,
            optimizer_and_schedule,
        )

        cfg = load_config(SegmentationConfig, path, overrides)
        with torch.device("meta"):
            model = build_segmentor(cfg)
    opt, sched = optimizer_and_schedule(model, cfg, STEPS)
    return cfg, model, opt, sched, cfg.optim.warmup_steps


def _expected_scales(cfg, model) -> dict[str, float]:
    """name -> released scale for the parameters the rule singles out."""
    from tests.released_lr import classification_dcn, classification_ratio, dense_scale

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    stem = next(n for n in names if n.endswith("patch_embed.conv1.weight"))
    prefix = stem[: -len("patch_embed.conv1.weight")]
    o = cfg.optim
    decay = getattr(o, "layer_decay", 1.0)
    num_layers = sum(DEPTHS) + 2
    backbone = getattr(o, "backbone_lr_mult", 1.0)
    trunk = [stem, "levels.1.blocks.0.dcn.offset.weight", "levels.1.blocks.0.dcn.mask.weight",
             "levels.1.blocks.0.mlp.fc1.weight", "levels.2.downsample.conv.weight",
             f"levels.{len(DEPTHS) - 1}.blocks.0.mlp.fc1.weight"]
    out = {}
    for name in trunk:
        name = name[len(prefix):] if name.startswith(prefix) else name
        # ``optim.dcn_lr_mult`` on the layers the released classification optimizer
        # multiplies (the released dense constructors have no such multiplier: the dense
        # presets set 1.0, the demos keep the default)
        dcn = o.dcn_lr_mult if classification_dcn(name) else 1.0
        if prefix == "":  # a classifier: the whole model is the trunk
            out[name] = classification_ratio(name, DEPTHS, decay) * dcn
        else:  # the released dense rule reads ``backbone.``-prefixed names
            out[prefix + name] = dense_scale("backbone." + name, DEPTHS, decay) * backbone * dcn
    layer0 = tuple(getattr(o, "layer0_params", ()) or ())
    offsets = ("sampling_offsets", "reference_points")
    # outside the trunk (classification: the trunk is the whole model; its head is ``head``)
    head = [n for n in names if (not n.startswith(prefix) if prefix else n.startswith("head."))]
    plain = [n for n in head if not any(p in n for p in layer0 + offsets)]
    assert plain, "no head parameter found"
    out[plain[0]] = 1.0
    for n in head:
        if any(p in n for p in layer0):
            out[n] = decay ** (num_layers - 1)  # the released Mask2Former quirk: layer 0
            break
    for n in head:
        if "sampling_offsets" in n and not any(p in n for p in layer0):
            out[n] = getattr(o, "head_offset_lr_mult", 1.0)  # DINO's offset_lr_scale
            break
    return out


def _lr_of(opt) -> dict[int, float]:
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_each_group_trains_at_base_lr_times_schedule_times_released_scale(path: Path):
    cfg, model, opt, sched, warmup = _build(path)
    params = dict(model.named_parameters())
    scales = _expected_scales(cfg, model)
    head = next(n for n, s in scales.items() if s == 1.0 and "patch_embed" not in n)
    o = cfg.optim
    # At the end of the warm-up the schedule is at its base value (detection's step
    # policy), or, where the warm-up overlays the decay, at the decay's value there: the
    # released classification cosine (classification/lr_scheduler.py: CosineLRScheduler,
    # warmup_prefix False) and mmseg's poly.
    sched.step_update(warmup)
    lr = _lr_of(opt)
    if _task(path) == "classification" and warmup:
        base = o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * warmup / STEPS))
    elif _task(path) == "segmentation":
        # mmcv's PolyLrUpdaterHook: the decay on the absolute iteration, the warm-up laid
        # over its start (mmcv/runner/hooks/lr_updater.py, PolyLrUpdaterHook.get_lr)
        base = o.min_lr + (o.lr - o.min_lr) * (1 - warmup / STEPS) ** cfg.poly_power
    else:
        base = o.lr
    assert lr[id(params[head])] == pytest.approx(base, rel=1e-6)
    for t in (warmup, STEPS // 2, STEPS - 1):
        sched.step_update(t)
        lr = _lr_of(opt)
        at = lr[id(params[head])]
        for name, scale in scales.items():
            if _task(path) == "classification":
                # cosine from scale x lr to the unscaled min_lr (classification/
                # lr_scheduler.py: CosineLRScheduler(lr_min=MIN_LR) over groups whose lr is
                # ratio x BASE_LR, classification/optimizer.py); at: the head's (scale 1)
                c = (at - o.min_lr) / (o.lr - o.min_lr)
                want = o.min_lr + (scale * o.lr - o.min_lr) * c
            else:
                want = at * scale
            assert lr[id(params[name])] == pytest.approx(want, rel=1e-6), (
                f"{path.stem} step {t}: {name} trains at {lr[id(params[name])]:.3e}, the "
                f"released rule gives {want:.3e} (scale {scale:.3e})")


SEG_PRESETS = [p for p in PRESETS if p.stem.startswith("seg_")]


@pytest.mark.parametrize("path", SEG_PRESETS, ids=lambda p: p.stem)
def test_segmentation_warm_up_scales_the_poly_lr_as_mmcv(path: Path):
    """mmcv 1.x LrUpdaterHook.get_warmup_lr (linear), what the released segmentation
    configs run (warmup='linear', warmup_iters=1500, warmup_ratio=1e-6, policy='poly'):
    ``regular_lr * (1 - (1 - t / W) * (1 - warmup_ratio))``, ``regular_lr`` the poly lr of
    the same iteration. timm's warm-up ramps to the base lr instead: 1.9% above at the last
    warm-up step of an 80k schedule, then a drop."""
    cfg, model, opt, sched, warmup = _build(path)
    assert warmup > 1
    o = cfg.optim
    head = next(iter(_lr_of(opt)))  # any group: its lr_scale multiplies both alike
    scale = next(g.get("lr_scale", 1.0) for g in opt.param_groups
                 if any(id(p) == head for p in g["params"]))
    for t in (0, warmup // 2, warmup - 1, warmup):
        sched.step_update(t)
        regular = o.min_lr + (o.lr - o.min_lr) * (1 - t / STEPS) ** cfg.poly_power
        factor = 1 - (1 - t / warmup) * (1 - o.warmup_ratio) if t < warmup else 1.0
        assert _lr_of(opt)[head] == pytest.approx(scale * regular * factor, rel=1e-9), t


def test_cls_h_224_layer_decayed_groups_decay_to_the_released_absolute_min_lr():
    """The released internimage_h_jointto1k_224.yaml (OpenGVLab/InternImage commit 3ba75d4,
    classification/configs/; BASE_LR 3e-5, MIN_LR 3e-7 per 512 images, LR_LAYER_DECAY_RATIO
    0.8, WARMUP_EPOCHS 0): classification/optimizer.py gives each group lr ratio x BASE_LR
    and classification/lr_scheduler.py's timm CosineLRScheduler takes every group from that
    lr to the one MIN_LR. So a layer-decayed group ends at 3e-7, not at ratio x 3e-7 (with
    H's 50 blocks the bottom ~29 layers peak below 3e-7 and their lr rises toward it)."""
    from tests.released_lr import classification_ratio

    path = REPO / "configs" / "finetune" / "cls_internimage_h_jointto1k_224.yaml"
    cfg, model, opt, sched, warmup = _build(path)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.layer_decay, warmup) == (3e-5, 3e-7, 0.8, 0)
    stem = dict(model.named_parameters())["patch_embed.conv1.weight"]
    peak = classification_ratio("patch_embed.conv1.weight", DEPTHS, 0.8) * 3e-5
    for t in (0, STEPS // 2, STEPS - 1, STEPS):
        sched.step_update(t)
        c = 0.5 * (1 + math.cos(math.pi * t / STEPS))
        assert _lr_of(opt)[id(stem)] == pytest.approx(3e-7 + (peak - 3e-7) * c, rel=1e-6), t


def test_dino_h_offsets_train_at_one_thousandth_of_the_base_lr():
    """The DINO-H preset's transformer sampling offsets: lr 1e-4 x offset_lr_scale 1e-3 =
    1e-7 once warmed up (released dino_4scale_internimage_h config); the double-scaling bug
    trained them at 1e-10."""
    path = REPO / "configs" / "finetune" / "det_dino_internimage_h_coco.yaml"
    cfg, model, opt, sched, warmup = _build(path)
    sched.step_update(warmup)
    lrs = {g["lr"] for g in opt.param_groups if any("sampling_offsets" in n for n in g["names"])
           and not any(n.startswith("backbone") for n in g["names"])}
    assert lrs and all(lr == pytest.approx(1e-4 * 1e-3) for lr in lrs)


@pytest.mark.parametrize("name", ["det_dino_internimage_t_1x_coco.yaml",
                                  "det_dino_internimage_l_1x_coco.yaml"])
def test_dino_t_l_offsets_train_at_the_base_lr_and_level_embeds_at_layer_0(name):
    """The released DINO-T/L files (OpenGVLab/InternImage detection/configs/coco/
    dino_4scale_internimage_{t,l}_1x_coco_layer_wise_lr.py) set no offset_lr_scale: the
    CustomLayerDecayOptimizerConstructor's default 1.0 leaves the transformer's sampling
    offsets at the head's lr (1e-4 once warmed up), unlike DINO-H's 1e-3; its level_embeds
    sit at layer 0: 0.9 ** (num_layers + 1) of it (tiny trunk here: num_layers = 5)."""
    cfg, model, opt, sched, warmup = _build(REPO / "configs" / "finetune" / name)
    sched.step_update(warmup)
    head = [g for g in opt.param_groups if not any(n.startswith("backbone") for n in g["names"])]
    offsets = {g["lr"] for g in head if any("sampling_offsets" in n for n in g["names"])}
    assert offsets and all(lr == pytest.approx(1e-4) for lr in offsets)
    level = {g["lr"] for g in head if any("level_embed" in n for n in g["names"])}
    assert level and all(lr == pytest.approx(1e-4 * 0.9 ** (sum(DEPTHS) + 1)) for lr in level)


def test_cls_presets_without_layer_decay_train_the_dcn_layers_at_the_full_lr():
    """The released classification/optimizer.py (set_weight_decay_and_lr) multiplies the
    DCN layers' lr by DCN_LR_MUL only inside ``if lr_layer_decay:``: its without_lr_decay
    configs (the paper's results), which state DCN_LR_MUL 0.1, trained them at the full
    lr. A preset without layer decay therefore has ``dcn_lr_mult`` 1.0."""
    from finetune.classification import ClassificationConfig
    from launch.config import load_config

    for path in PRESETS:
        if not path.stem.startswith("cls_"):
            continue
        o = load_config(ClassificationConfig, path, ["init=null"]).optim
        if o.layer_decay == 1.0:
            assert o.dcn_lr_mult == 1.0, path.name
