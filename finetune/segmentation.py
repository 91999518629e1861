"""Semantic segmentation fine-tuning: UperNet on InternImage, ADE20K or Cityscapes layout,
sliding-window evaluation, mIoU and per-class IoU.

Recipe (REFERENCE.md section 4): AdamW, lr 6e-5 (T/S/B) / 2e-5 (L/XL), poly decay power
1.0, batch 16, 160k iterations, crop 512 / 640. No config: generated shapes scenes.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune import runtime
from finetune.config import BackboneConfig, OptimConfig, RunConfig, check
from finetune.lr_decay import param_groups

log = logging.getLogger(__name__)
IGNORE = 255
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


@dataclass
class SegDataConfig:
    """``demo`` (generated shapes, ADE layout), ``ade20k`` or ``cityscapes``.

    ADE20K: ``images/{training,validation}/*.jpg`` + ``annotations/.../*.png`` with label 0
    = ignore (``reduce_zero_label``: 1..150 -> 0..149). Cityscapes: ``leftImg8bit/{train,
    val}/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelTrainIds.png`` (255 ignore).
    """

    kind: str = "demo"
    root: str = ""
    num_classes: int = 4
    reduce_zero_label: bool = True
    class_names: list[str] = field(default_factory=list)
    scale_short: int = 96  # training: short side before random rescale
    ratio_range: tuple[float, float] = (0.75, 1.5)
    crop_size: tuple[int, int] = (80, 80)
    hflip: float = 0.5
    test_short: int = 96  # evaluation: short side the image is resized to (0: as is)
    demo_train: int = 400
    demo_val: int = 80
    demo_size: int = 96
    cache_dir: str = "~/.cache/internimage"

    def __post_init__(self) -> None:
        check(self.kind in ("demo", "ade20k", "cityscapes"), "data.kind",
              f"must be demo|ade20k|cityscapes, got {self.kind!r}")
        check(self.kind == "demo" or bool(self.root), "data.root", f"is required for {self.kind}")
        check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        check(0 < self.ratio_range[0] <= self.ratio_range[1], "data.ratio_range",
              "must be 0 < lo <= hi")
        check(min(self.crop_size) >= 32, "data.crop_size", "must be >= 32")
        self.cache_dir = str(Path(self.cache_dir).expanduser())


@dataclass
class SegEvalConfig:
    """``slide`` (windows of ``crop`` every ``stride``, logits averaged) or ``whole``."""

    mode: str = "slide"
    crop: tuple[int, int] = (80, 80)
    stride: tuple[int, int] = (48, 48)

    def __post_init__(self) -> None:
        check(self.mode in ("slide", "whole"), "eval.mode", "must be slide|whole")
        check(min(self.stride) >= 1, "eval.stride", "must be >= 1")


# Task defaults live in subclasses (a partial section is built from its class's defaults).
@dataclass
class SegOptimConfig(OptimConfig):
    """``OptimConfig`` with the segmentation demo's defaults."""

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 30


@dataclass
class SegRunConfig(RunConfig):
    """``RunConfig`` with the segmentation demo's defaults."""

    output_dir: str = "runs/segmentation"
    batch_size: int = 8
    epochs: float = 8.0


@dataclass
class SegmentationConfig:
    """A segmentation fine-tuning run (``poly_power``: the poly schedule's exponent)."""

    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    head_channels: int = 64
    poly_power: float = 1.0
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    run: SegRunConfig = field(default_factory=SegRunConfig)
    init: str | None = None

    def __post_init__(self) -> None:
        check(self.head_channels >= 8, "head_channels", "must be >= 8")
        check(self.poly_power > 0, "poly_power", "must be > 0")


# ---------------------------------------------------------------- data
def _pairs(cfg: SegDataConfig, train: bool) -> list[tuple[Path, Path]]:
    root = Path(cfg.root)
    if cfg.kind == "demo":
        from finetune.demo_data import ensure_shapes_ade

        root = ensure_shapes_ade(cfg.cache_dir, cfg.demo_train, cfg.demo_val, cfg.demo_size)
    if cfg.kind == "cityscapes":
        split = "train" if train else "val"
        imgs = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        return [(p, root / "gtFine" / split / p.parent.name /
                 p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")) for p in imgs]
    split = "training" if train else "validation"
    imgs = sorted((root / "images" / split).glob("*.jpg"))
    return [(p, root / "annotations" / split / (p.stem + ".png")) for p in imgs]


class SegDataset(Dataset):
    """(normalised image, label map with 255 = ignore); train: rescale, crop, flip."""

    def __init__(self, cfg: SegDataConfig, train: bool):
        self.cfg, self.train = cfg, train
        self.pairs = _pairs(cfg, train)
        if not self.pairs:
            raise FileNotFoundError(f"data: no images found under {cfg.root or cfg.kind}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, label_path = self.pairs[i]
        img = torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).permute(2, 0, 1)
        label = torch.from_numpy(np.array(Image.open(label_path), dtype=np.int64))
        if self.cfg.reduce_zero_label:  # ADE20K: 0 is "other", ignored; 1..N -> 0..N-1
            label = torch.where(label == 0, IGNORE, label - 1)
        return img.float(), label

    def __getitem__(self, i: int):
        img, label = self._load(i)
        c = self.cfg
        if self.train:
            ratio = random.uniform(*c.ratio_range)
            img, label = _resize(img, label, int(c.scale_short * ratio))
            img, label = _random_crop(img, label, c.crop_size)
            if random.random() < c.hflip:
                img, label = img.flip(-1), label.flip(-1)
        return (img - MEAN) / STD, label


def _resize(img: torch.Tensor, label: torch.Tensor, short: int):
    h, w = img.shape[-2:]
    s = short / min(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    img = F.interpolate(img[None], size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size, mode="nearest")[0, 0].long()
    return img, label


def _random_crop(img: torch.Tensor, label: torch.Tensor, crop: tuple[int, int]):
    ch, cw = crop
    h, w = img.shape[-2:]
    if h < ch or w < cw:  # pad: image with 0 (the mean after normalising), label ignored
        ph, pw = max(0, ch - h), max(0, cw - w)
        img = F.pad(img - MEAN, (0, pw, 0, ph)) + MEAN
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
        h, w = img.shape[-2:]
    y, x = random.randint(0, h - ch), random.randint(0, w - cw)
    return img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


# ---------------------------------------------------------------- model and evaluation
def build_segmentor(cfg: SegmentationConfig, init: str | None = None) -> nn.Module:
    """InternImage trunk (``--init`` applied) + UperNet head."""
    from finetune.backbone import build_trunk
    from finetune.upernet import UperNetSegmentor

    return UperNetSegmentor(build_trunk(cfg.model, init), cfg.data.num_classes,
                            cfg.head_channels)


def slide_logits(model: nn.Module, img: torch.Tensor, num_classes: int,
                 crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits (1, C, H, W) of one image from overlapping ``crop`` windows, averaged."""
    _, _, h, w = img.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(1, math.ceil((h - ch) / sh) + 1)
    cols = max(1, math.ceil((w - cw) / sw) + 1)
    logits = img.new_zeros(1, num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, h - ch), min(c * sw, w - cw)
            logits[:, :, y0:y0 + ch, x0:x0 + cw] += model(img[:, :, y0:y0 + ch, x0:x0 + cw])
            count[:, :, y0:y0 + ch, x0:x0 + cw] += 1
    return logits / count


@torch.no_grad()
def evaluate(model: nn.Module, val_set: SegDataset, cfg: SegmentationConfig,
             d: runtime.Dist) -> dict[str, float]:
    """mIoU (+ per-class IoU) over the val set; each rank a slice, matrices summed."""
    from finetune.metrics import ConfusionMatrix

    core = runtime.unwrap(model)
    core.eval()
    conf = ConfusionMatrix(cfg.data.num_classes, IGNORE)
    for i in range(d.rank, len(val_set), d.world_size):
        img, label = val_set[i]
        x = img[None].to(d.device)
        if cfg.data.test_short:
            x = _resize(x[0], label, cfg.data.test_short)[0][None]
        if cfg.eval.mode == "slide":
            logits = slide_logits(core, x, cfg.data.num_classes, cfg.eval.crop, cfg.eval.stride)
        else:
            logits = core(x)
        logits = F.interpolate(logits, label.shape, mode="bilinear", align_corners=False)
        conf.update(logits.argmax(1)[0].cpu(), label)
    conf.mat = runtime.all_reduce_sum(conf.mat.to(d.device), d).cpu()
    core.train()
    names = list(cfg.data.class_names) or _demo_names(cfg)
    return conf.scores(names)


def _demo_names(cfg: SegmentationConfig) -> list[str] | None:
    if cfg.data.kind != "demo":
        return None
    from finetune.demo_data import ensure_shapes_ade

    root = ensure_shapes_ade(cfg.data.cache_dir, cfg.data.demo_train, cfg.data.demo_val,
                             cfg.data.demo_size)
    return json.loads((root / "classes.json").read_text())


# ---------------------------------------------------------------- entrypoints
def _optimizer_and_schedule(model: nn.Module, cfg: SegmentationConfig, total: int):
    from timm.scheduler import PolyLRScheduler

    from models import VARIANTS

    depths = list(cfg.model.depths or VARIANTS[cfg.model.name].depths)
    groups = param_groups(model, depths, cfg.optim.weight_decay, cfg.optim.layer_decay,
                          cfg.optim.dcn_lr_mult, backbone_prefix="backbone.",
                          backbone_lr_mult=cfg.optim.backbone_lr_mult)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    sched = PolyLRScheduler(opt, t_initial=max(1, total), power=cfg.poly_power,
                            lr_min=cfg.optim.min_lr, warmup_t=cfg.optim.warmup_steps,
                            warmup_lr_init=cfg.optim.lr * 1e-3, warmup_prefix=True,
                            t_in_epochs=False)
    return opt, sched


def dry_run(cfg: SegmentationConfig) -> int:
    """Build on the meta device and print the plan."""
    with torch.device("meta"):
        model = build_segmentor(cfg)
    d = cfg.data
    runtime.print_plan("segmentation (dry run)", {
        "model": f"UperNet({cfg.head_channels}) on {cfg.model.name} {cfg.model.arch() or ''}",
        "parameters": f"{runtime.count_params(model):,}",
        "data": f"{d.kind} {d.root} ({d.num_classes} classes)",
        "crop / ratio range": f"{list(d.crop_size)} / {list(d.ratio_range)}",
        "eval": f"{cfg.eval.mode} crop {list(cfg.eval.crop)} stride {list(cfg.eval.stride)}",
        "batch per process": cfg.run.batch_size,
        "length": f"{cfg.run.max_steps} steps" if cfg.run.max_steps else
                  f"{cfg.run.epochs} epochs",
        "optimizer": f"AdamW lr {cfg.optim.lr} wd {cfg.optim.weight_decay} layer decay "
                     f"{cfg.optim.layer_decay}; poly power {cfg.poly_power}",
        "init": cfg.init or "random",
    })
    return 0


def train(cfg: SegmentationConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune UperNet; returns the last evaluation (``mIoU``, ``IoU.<class>``, ...)."""
    from finetune.loop import run_loop

    d = runtime.setup_distributed()
    if cfg.run.zero_stage:
        raise NotImplementedError("run.zero_stage > 0 is not wired for segmentation yet")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    runtime.seed_everything(cfg.run.seed + d.rank)
    train_set, val_set = SegDataset(cfg.data, True), SegDataset(cfg.data, False)
    model = build_segmentor(cfg, cfg.init).to(d.device)
    if d.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    steps_per_epoch = max(1, len(train_set) // (cfg.run.batch_size * d.world_size))
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, total)
    net = runtime.wrap_ddp(model, d)
    sampler = DistributedSampler(train_set, d.world_size, d.rank, seed=cfg.run.seed) \
        if d.world_size > 1 else None
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def batches(epoch: int):
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.run.seed + epoch)
        return DataLoader(train_set, cfg.run.batch_size, shuffle=sampler is None,
                          sampler=sampler, num_workers=cfg.run.num_workers, drop_last=True,
                          generator=g)

    def loss_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        return {"loss_ce": criterion(net(images.to(d.device)), labels.to(d.device))}

    eval_every = cfg.run.eval_every or steps_per_epoch * 2
    return run_loop(name="segmentation", model=model, net=net, optimizer=optimizer,
                    scheduler=scheduler, batches=batches, loss_fn=loss_fn,
                    evaluate=lambda: evaluate(net, val_set, cfg, d), total_steps=total,
                    eval_every=eval_every, checkpoint_every=cfg.run.checkpoint_every or
                    eval_every, log_every=cfg.run.log_every, grad_clip=cfg.optim.grad_clip,
                    out_dir=out_dir, d=d, resume=resume, progress=cfg.run.progress,
                    precision=cfg.run.precision)
