"""COCO instance detection/segmentation fine-tuning: Mask R-CNN (torchvision) on an
InternImage + FPN backbone, evaluated with pycocotools (bbox and segm AP), or DINO
(``head.kind=dino``, finetune/heads/dino.py; boxes only, bbox AP).

Multi-scale training uses torchvision's own transform (a random shorter side from
``detector.train_sizes`` per image); 1x/3x schedules are step decays at 8/11 of 12 and
27/33 of 36 epochs (the Mask R-CNN convention). No config: the generated shapes demo.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune import runtime
from finetune.config import BackboneConfig, OptimConfig, RunConfig, check
from finetune.lr_decay import adamw, param_groups
from runtime import rng

log = logging.getLogger(__name__)


@dataclass
class DetDataConfig:
    """``demo`` (generated shapes) or ``coco`` (images dirs + instance annotation JSONs)."""

    kind: str = "demo"
    root: str = ""
    train_images: str = "train2017"
    train_ann: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_ann: str = "annotations/instances_val2017.json"
    hflip: float = 0.5
    demo_train: int = 400
    demo_val: int = 80
    demo_size: int = 64
    cache_dir: str = "~/.cache/internimage"

    def __post_init__(self) -> None:
        check(self.kind in ("demo", "coco"), "data.kind", f"must be demo|coco, got {self.kind!r}")
        check(self.kind != "coco" or bool(self.root), "data.root", "is required for data.kind=coco")
        check(0 <= self.hflip <= 1, "data.hflip", "must be in [0, 1]")
        self.cache_dir = str(Path(self.cache_dir).expanduser())


@dataclass
class DetectorConfig:
    """Mask R-CNN + FPN sizes (torchvision defaults are the COCO ones)."""

    fpn_channels: int = 64
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    train_sizes: list[int] = field(default_factory=lambda: [56, 64, 72])
    test_size: int = 64
    max_size: int = 96
    box_head_dim: int = 256
    mask_head_channels: int = 32
    mask_head_layers: int = 2
    rpn_batch_per_image: int = 128
    box_batch_per_image: int = 64
    detections_per_image: int = 50

    def __post_init__(self) -> None:
        check(len(self.anchor_sizes) == 5, "detector.anchor_sizes",
              "needs 5 sizes (FPN levels P2..P6)")
        check(bool(self.train_sizes) and min(self.train_sizes) >= 32, "detector.train_sizes",
              "must be a non-empty list of sizes >= 32")
        check(self.mask_head_layers >= 1, "detector.mask_head_layers", "must be >= 1")


@dataclass
class ScheduleConfig:
    """``step`` (decay by ``gamma`` at ``milestones``, fractions of the run) or ``cosine``."""

    kind: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [8 / 12, 11 / 12])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check(self.kind in ("step", "cosine"), "schedule.kind", "must be step|cosine")
        check(all(0 < m < 1 for m in self.milestones), "schedule.milestones",
              "are fractions of the run in (0, 1)")


@dataclass
class DetHeadConfig:
    """The detector: ``maskrcnn`` (settings in ``detector``) or ``dino``.

    The other keys are DINO's (finetune/heads/dino.py ``DEFAULTS``); these defaults are the
    CPU demo's (configs/finetune/det_dino_demo.yaml), the COCO preset holds the paper's.
    ``train_sizes`` / ``test_size`` / ``max_size``: DINO's resize (shorter side, one drawn
    per training image; the longer side capped).
    """

    kind: str = "maskrcnn"
    num_queries: int = 30
    d_model: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 3
    num_heads: int = 4
    ffn_dim: int = 256
    n_points: int = 4
    num_feature_levels: int = 4
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3])
    dropout: float = 0.0
    pos_temperature: int = 20
    num_dn_queries: int = 20
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    focal_alpha: float = 0.25
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    weight_class: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    num_select: int = 50
    train_sizes: list[int] = field(default_factory=lambda: [56, 64, 72])
    test_size: int = 64
    max_size: int = 96
    size_divisible: int = 32
    label_offset: int = 1

    def __post_init__(self) -> None:
        check(self.kind in ("maskrcnn", "dino"), "head.kind",
              f"must be maskrcnn|dino, got {self.kind!r}")
        check(self.d_model % 32 == 0, "head.d_model", "must be a multiple of 32 (GroupNorm)")
        check(self.num_feature_levels >= len(self.out_indices), "head.num_feature_levels",
              f"must be >= the {len(self.out_indices)} levels of head.out_indices")
        check(bool(self.train_sizes) and min(self.train_sizes) >= 32, "head.train_sizes",
              "must be a non-empty list of sizes >= 32")
        check(self.label_offset == 1, "head.label_offset",
              "must be 1 (the dataset's labels are 1..C, torchvision's convention)")

    def dino_kwargs(self) -> dict:
        """``build_dino`` keyword settings (everything but ``kind``)."""
        out = {k: v for k, v in vars(self).items() if k != "kind"}
        out["out_indices"] = tuple(out["out_indices"])
        out["train_sizes"] = tuple(out["train_sizes"])
        return out


# Task defaults live in subclasses: a partial YAML/override section is built from its
# class's own defaults, so a default_factory on the parent field would be lost.
@dataclass
class DetOptimConfig(OptimConfig):
    """``OptimConfig`` with the detection demo's defaults; ``head_offset_lr_mult`` scales the
    lr of the head's deformable-attention ``sampling_offsets`` / ``reference_points`` (DINO;
    the released recipe's ``offset_lr_scale``)."""

    lr: float = 1e-3
    warmup_steps: int = 50
    head_offset_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.head_offset_lr_mult > 0, "optim.head_offset_lr_mult", "must be > 0")


@dataclass
class DetRunConfig(RunConfig):
    """``RunConfig`` with the detection demo's defaults."""

    output_dir: str = "runs/detection"
    batch_size: int = 8
    epochs: float = 8.0


@dataclass
class DetBackboneConfig(BackboneConfig):
    """``BackboneConfig`` with the detection demo's defaults."""

    drop_path_rate: float = 0.0


@dataclass
class DetectionConfig:
    """A detection fine-tuning run (``head.kind``: Mask R-CNN + ``detector``, or DINO)."""

    model: DetBackboneConfig = field(default_factory=DetBackboneConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: DetRunConfig = field(default_factory=DetRunConfig)
    init: str | None = None


# ---------------------------------------------------------------- model
class InternImageFPN(nn.Module):
    """torchvision-style backbone: InternImage stage maps -> FPN P2..P5 + max-pooled P6."""

    def __init__(self, trunk: nn.Module, out_channels: int):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = trunk
        self.fpn = FeaturePyramidNetwork(list(trunk.stage_channels), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # what torchvision's heads read

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_features(x)
        return self.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats)))


def build_detector(cfg: DetectionConfig, num_classes: int, init: str | None = None) -> nn.Module:
    """torchvision MaskRCNN (``num_classes`` + background) on InternImage + FPN."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    from finetune.backbone import build_trunk

    c = cfg.detector
    backbone = InternImageFPN(build_trunk(cfg.model, init), c.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in c.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(
        backbone, min_size=tuple(c.train_sizes),
        max_size=c.max_size, rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=c.rpn_batch_per_image,
        box_batch_size_per_image=c.box_batch_per_image,
        box_detections_per_img=c.detections_per_image,
        box_head=TwoMLPHead(c.fpn_channels * 7 * 7, c.box_head_dim),
        mask_head=MaskRCNNHeads(c.fpn_channels, [c.mask_head_channels] * c.mask_head_layers, 1),
        **_predictors(c, num_classes + 1))


def build_model(cfg: DetectionConfig, num_classes: int, init: str | None = None) -> nn.Module:
    """``head.kind``'s detector for ``num_classes`` foreground classes (labels 1..C)."""
    if cfg.head.kind == "dino":
        from finetune.heads import build_dino

        return build_dino(cfg.model.name, num_classes, backbone_kwargs=cfg.model.build_kwargs(),
                          init=init, **cfg.head.dino_kwargs())
    return build_detector(cfg, num_classes, init)


def _sizes(cfg: DetectionConfig) -> tuple[list[int], int]:
    """(train shorter sides, test shorter side) of the detector in use."""
    if cfg.head.kind == "dino":
        return list(cfg.head.train_sizes), cfg.head.test_size
    return list(cfg.detector.train_sizes), cfg.detector.test_size


def _predictors(c: DetectorConfig, num_classes: int) -> dict:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    return {"box_predictor": FastRCNNPredictor(c.box_head_dim, num_classes),
            "mask_predictor": MaskRCNNPredictor(c.mask_head_channels, c.mask_head_channels,
                                                num_classes),
            "num_classes": None}


# ---------------------------------------------------------------- data
class CocoInstances(Dataset):
    """COCO instance annotations -> (image tensor in [0, 1], torchvision target dict)."""

    def __init__(self, image_dir: Path, ann_file: Path, train: bool, hflip: float = 0.5):
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.image_dir, self.train, self.hflip = image_dir, train, hflip
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = [0, *self.cat_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        import numpy as np
        from torchvision.transforms.functional import pil_to_tensor

        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        img = pil_to_tensor(Image.open(self.image_dir / info["file_name"]).convert("RGB"))
        anns = [a for a in self.coco.imgToAnns[img_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns \
            else torch.zeros(0, info["height"], info["width"], dtype=torch.uint8)
        target = {"boxes": boxes, "masks": masks, "image_id": img_id,
                  "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                         dtype=torch.int64)}
        if self.train and torch.rand(()) < self.hflip:
            w = img.shape[-1]
            img, target["masks"] = img.flip(-1), target["masks"].flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                                           boxes[:, 3]], 1)
        keep = (target["boxes"][:, 2] > target["boxes"][:, 0]) & \
               (target["boxes"][:, 3] > target["boxes"][:, 1])
        for k in ("boxes", "masks", "labels"):
            target[k] = target[k][keep]
        return img.float() / 255, target


def _collate(batch):
    return tuple(zip(*batch))


def build_datasets(cfg: DetectionConfig) -> tuple[CocoInstances, CocoInstances]:
    """(train, val) for ``data.kind``; the demo set is generated on first use."""
    d = cfg.data
    if d.kind == "demo":
        from finetune.demo_data import ensure_shapes_coco

        root = ensure_shapes_coco(d.cache_dir, d.demo_train, d.demo_val, d.demo_size)
        paths = (root / "train", root / "annotations/instances_train.json",
                 root / "val", root / "annotations/instances_val.json")
    else:
        root = Path(d.root)
        paths = (root / d.train_images, root / d.train_ann, root / d.val_images,
                 root / d.val_ann)
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"data: {p} does not exist")
    return (CocoInstances(paths[0], paths[1], True, d.hflip),
            CocoInstances(paths[2], paths[3], False))


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, val_set: CocoInstances, cfg: DetectionConfig,
             d: runtime.Dist) -> dict[str, float]:
    """COCO bbox (+ segm for Mask R-CNN) AP over the val set (each rank a slice; rank 0
    scores all)."""
    import torch.distributed as dist

    from finetune.metrics import coco_evaluate, detections_to_coco

    core = runtime.unwrap(model)
    core.eval()
    train_sizes, test_size = _sizes(cfg)
    core.transform.min_size = (test_size,)
    results = []
    indices = list(range(d.rank, len(val_set), d.world_size))
    for start in range(0, len(indices), cfg.run.batch_size):
        batch = [val_set[i] for i in indices[start:start + cfg.run.batch_size]]
        images = [img.to(d.device) for img, _ in batch]
        for (_, target), out in zip(batch, core(images)):
            results += detections_to_coco(out, target["image_id"], val_set.label_to_cat)
    core.transform.min_size = tuple(train_sizes)
    core.train()
    if d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75")
    if cfg.head.kind == "maskrcnn":
        keys += ("segm_AP", "segm_AP50")
    scores = coco_evaluate(val_set.coco, results) if d.is_main else {}
    return {k: scores.get(k, 0.0) for k in keys}


# ---------------------------------------------------------------- entrypoints
def _optimizer_and_schedule(model: nn.Module, cfg: DetectionConfig, total: int):
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

    groups = param_groups(model, list(cfg.model.depths or _variant_depths(cfg)),
                          cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.dcn_lr_mult,
                          backbone_prefix=getattr(model, "backbone_prefix", "backbone.body."),
                          backbone_lr_mult=cfg.optim.backbone_lr_mult,
                          head_offset_lr_mult=cfg.optim.head_offset_lr_mult)
    opt = adamw(groups, cfg.optim.lr, cfg.optim.betas)
    warm = {"warmup_t": cfg.optim.warmup_steps, "warmup_lr_init": cfg.optim.lr * 1e-3,
            "t_in_epochs": False}
    if cfg.schedule.kind == "step":
        # mmdet's step policy (the released 1x/3x configs): the milestones count from step
        # 0 (epochs 8/11 of 12, 27/33 of 36) and the warm-up overlays them, not shifts them
        sched = MultiStepLRScheduler(opt, decay_t=[int(m * total) for m in
                                                   cfg.schedule.milestones],
                                     decay_rate=cfg.schedule.gamma, warmup_prefix=False,
                                     **warm)
    else:
        sched = CosineLRScheduler(opt, t_initial=max(1, total), lr_min=cfg.optim.min_lr,
                                  warmup_prefix=True, **warm)
    return opt, sched


def _variant_depths(cfg) -> tuple[int, ...]:
    from models import VARIANTS

    return VARIANTS[cfg.model.name].depths


def dry_run(cfg: DetectionConfig) -> int:
    """Build on the meta device and print the plan."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes=80)
    d, h = cfg.detector, cfg.head
    if h.kind == "dino":
        desc = (f"DINO({h.num_queries} queries, {h.d_model} dims, {h.encoder_layers}+"
                f"{h.decoder_layers} layers, {h.num_dn_queries} denoising)")
        sizes = f"{list(h.train_sizes)} / {h.test_size} / {h.max_size}"
    else:
        desc = f"Mask R-CNN + FPN({d.fpn_channels})"
        sizes = f"{d.train_sizes} / {d.test_size} / {d.max_size}"
    runtime.print_plan("detection (dry run)", {
        "model": f"{desc} on {cfg.model.name} {cfg.model.arch() or ''}",
        "parameters (80 classes)": f"{runtime.count_params(model):,}",
        "data": cfg.data.kind + (f" {cfg.data.root}" if cfg.data.root else ""),
        "train sizes / test / max": sizes,
        "batch per process": cfg.run.batch_size,
        "length": f"{cfg.run.max_steps} steps" if cfg.run.max_steps else
                  f"{cfg.run.epochs} epochs",
        "optimizer": f"AdamW lr {cfg.optim.lr} wd {cfg.optim.weight_decay} layer decay "
                     f"{cfg.optim.layer_decay} dcn x{cfg.optim.dcn_lr_mult}",
        "schedule": cfg.schedule.kind + (f" at {cfg.schedule.milestones}"
                                         if cfg.schedule.kind == "step" else ""),
        "init": cfg.init or "random",
        "memory per GPU": _memory_line(cfg, model),  # last: consumes model
    })
    return 0


def _probe_size(cfg: DetectionConfig) -> tuple[int, int]:
    """A 4:3 COCO-like image at the largest training size, as the transform resizes and pads
    it: short side max(train_sizes), long side capped at max_size, both up to 32."""
    dino = cfg.head.kind == "dino"
    sizes, max_size = ((cfg.head.train_sizes, cfg.head.max_size) if dino
                       else (cfg.detector.train_sizes, cfg.detector.max_size))
    short = max(sizes)
    long = round(short * 4 / 3)
    if long > max_size:
        short, long = round(short * max_size / long), max_size
    return math.ceil(short / 32) * 32, math.ceil(long / 32) * 32


def _memory_line(cfg: DetectionConfig, model: nn.Module) -> str:
    """Per-GPU memory of one training step: the backbone (+ FPN for Mask R-CNN, + the
    deformable encoder for DINO) measured at ``_probe_size``; detection heads not counted."""
    from finetune.memory import describe, memory_estimate

    batch, size = cfg.run.batch_size, _probe_size(cfg)
    x = torch.empty(batch, 3, *size, device="meta")
    if cfg.head.kind == "dino":
        mask = torch.ones(batch, *size, dtype=torch.long, device="meta")
        scope = "decoder and losses not counted"

        def probe(dtype: torch.dtype):
            return model._encode(x.to(dtype), mask)
    else:
        scope = "RPN and RoI heads not counted"

        def probe(dtype: torch.dtype):
            return model.backbone(x.to(dtype))
    est = memory_estimate(model, probe, precision=cfg.run.precision,
                          checkpointing=cfg.model.with_cp,
                          training_probe=cfg.head.kind != "dino")
    return describe(est, batch, size, cfg.model.with_cp, scope=scope)


def train(cfg: DetectionConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune ``head.kind``; returns the last evaluation (bbox_AP, bbox_AP50, ...)."""
    from finetune.loop import run_loop

    d = runtime.setup_distributed()
    if cfg.run.zero_stage:
        raise NotImplementedError("run.zero_stage > 0 is not wired for detection yet")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set, val_set = build_datasets(cfg)
    rng.seed_all(cfg.run.seed + d.rank)  # after the data: its first build may draw
    # Mask R-CNN adds its background class itself; DINO predicts the C classes (focal loss).
    model = build_model(cfg, len(train_set.cat_ids), cfg.init).to(d.device)
    steps_per_epoch = max(1, len(train_set) // (cfg.run.batch_size * d.world_size))
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, total)
    net = runtime.wrap_ddp(model, d)
    sampler = DistributedSampler(train_set, d.world_size, d.rank, seed=cfg.run.seed) \
        if d.world_size > 1 else None

    def batches(epoch: int):
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = rng.loader_generator(cfg.run.seed, d.rank, epoch)  # workers' seeds: per rank
        return DataLoader(train_set, cfg.run.batch_size, shuffle=sampler is None,
                          sampler=sampler, num_workers=cfg.run.num_workers, drop_last=True,
                          collate_fn=_collate, generator=g)

    def loss_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [i.to(d.device) for i in images]
        targets = [{k: v.to(d.device) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        return net(images, targets)

    eval_every = cfg.run.eval_every or steps_per_epoch * 2
    return run_loop(name="detection", model=model, net=net, optimizer=optimizer,
                    scheduler=scheduler, batches=batches, loss_fn=loss_fn,
                    evaluate=lambda: evaluate(net, val_set, cfg, d), total_steps=total,
                    eval_every=eval_every, checkpoint_every=cfg.run.checkpoint_every or
                    eval_every, log_every=cfg.run.log_every, grad_clip=cfg.optim.grad_clip,
                    out_dir=out_dir, d=d, resume=resume, progress=cfg.run.progress,
                    precision=cfg.run.precision)
