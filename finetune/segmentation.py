"""Semantic segmentation fine-tuning: UperNet or Mask2Former (``head.kind``) on InternImage,
ADE20K, Cityscapes, Mapillary Vistas (mapped to Cityscapes' 19 classes) or COCO-Stuff-164k
layouts, sliding-window / whole-image evaluation with optional multi-scale + flip, mIoU and
per-class IoU. Training augmentation is mmsegmentation's, as the released recipes use it:
random rescale within (long, short) bounds, random crop with ``cat_max_ratio``, flip,
``PhotoMetricDistortion``.

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
from finetune.lr_decay import adamw, param_groups
from runtime import rng

log = logging.getLogger(__name__)
IGNORE = 255
DATA_KINDS = ("demo", "ade20k", "cityscapes", "mapillary", "cocostuff")
# (train split, val split) of each layout
SPLIT_NAMES = {"demo": ("training", "validation"), "ade20k": ("training", "validation"),
               "cityscapes": ("train", "val"), "mapillary": ("training", "validation"),
               "cocostuff": ("train2017", "val2017")}
NINETEEN_CLASS_KINDS = ("cityscapes", "mapillary")
HEAD_KINDS = ("upernet", "mask2former")
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


@dataclass
class SegDataConfig:
    """``demo`` (generated shapes, ADE layout), ``ade20k``, ``cityscapes``, ``mapillary`` or
    ``cocostuff``.

    ADE20K: ``images/{training,validation}/*.jpg`` + ``annotations/.../*.png`` with label 0
    = ignore (``reduce_zero_label``: 1..150 -> 0..149). Cityscapes: ``leftImg8bit/{train,
    val}/<city>/*_leftImg8bit.png`` + ``gtFine/...`` train ids (or label ids, mapped), 255
    ignore. Mapillary Vistas: ``{training,validation}/images/*.jpg`` + ``labels/*.png``,
    mapped onto Cityscapes' 19 train ids (others ignored; ``num_classes`` must be 19).
    COCO-Stuff-164k: ``images/{train2017,val2017}`` + ``annotations/...`` (171 classes).

    ``train_splits``: the splits trained on (default: the layout's train split; the
    Mapillary stage trains on ``[training, validation]``). ``val_kind`` / ``val_root``:
    evaluate on another dataset (the Mapillary stage is evaluated on Cityscapes val).
    Resizing: the short side goes to ``scale_short`` and the long side at most to
    ``scale_long`` (0: no cap), both times a ratio drawn from ``ratio_range`` in training
    (mmseg's ``img_scale=(long, short)``); ``test_short`` / ``test_long`` at evaluation.
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
    scale_long: int = 0  # training: long-side cap before random rescale (0: none)
    test_short: int = 96  # evaluation: short side the image is resized to (0: as is)
    test_long: int = 0  # evaluation: long-side cap (0: none)
    cat_max_ratio: float = 1.0  # crops retried while one class covers more (1.0: off)
    photometric: bool = False  # mmseg PhotoMetricDistortion (brightness/contrast/sat./hue)
    train_splits: list[str] = field(default_factory=list)
    val_kind: str = ""  # "" : same as kind
    val_root: str = ""  # "" : same as root
    demo_train: int = 400
    demo_val: int = 80
    demo_size: int = 96
    cache_dir: str = "~/.cache/internimage"

    def __post_init__(self) -> None:
        check(self.kind in DATA_KINDS, "data.kind",
              f"must be {'|'.join(DATA_KINDS)}, got {self.kind!r}")
        check(self.kind == "demo" or bool(self.root), "data.root", f"is required for {self.kind}")
        check(self.val_kind in ("", *DATA_KINDS), "data.val_kind",
              f"must be empty or {'|'.join(DATA_KINDS)}, got {self.val_kind!r}")
        check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        for key, kind in (("data.kind", self.kind), ("data.val_kind", self.val_kind)):
            check(kind not in NINETEEN_CLASS_KINDS or self.num_classes == 19,
                  "data.num_classes", f"must be 19 (Cityscapes train ids) for {key} {kind}")
            check(kind not in (*NINETEEN_CLASS_KINDS, "cocostuff") or not self.reduce_zero_label,
                  "data.reduce_zero_label", f"must be false for {key} {kind} (255 is the "
                  "ignore id)")
        check(self.kind != "cocostuff" or self.num_classes == 171, "data.num_classes",
              "must be 171 for cocostuff")
        check(self.val_kind in ("", self.kind) or (self.kind in NINETEEN_CLASS_KINDS and
                                                   self.val_kind in NINETEEN_CLASS_KINDS),
              "data.val_kind", f"{self.val_kind} does not share {self.kind}'s classes")
        known = SPLIT_NAMES[self.kind]
        check(all(split in known for split in self.train_splits), "data.train_splits",
              f"must be among {list(known)} for {self.kind}, got {self.train_splits}")
        check(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", "must be in (0, 1]")
        check(0 < self.ratio_range[0] <= self.ratio_range[1], "data.ratio_range",
              "must be 0 < lo <= hi")
        check(min(self.crop_size) >= 32, "data.crop_size", "must be >= 32")
        self.cache_dir = str(Path(self.cache_dir).expanduser())

    @property
    def eval_kind(self) -> str:
        """The layout evaluated on: ``val_kind``, else ``kind``."""
        return self.val_kind or self.kind

    @property
    def eval_root(self) -> str:
        """Where the evaluation layout lives: ``val_root``, else ``root``."""
        return self.val_root or self.root


@dataclass
class SegEvalConfig:
    """``slide`` (windows of ``crop`` every ``stride``, logits averaged) or ``whole``;
    ``size_divisor``: the resized test image is stretched up to a multiple of it (mmseg's
    ``ResizeToMultiple``; 0: off)."""

    mode: str = "slide"
    crop: tuple[int, int] = (80, 80)
    stride: tuple[int, int] = (48, 48)
    size_divisor: int = 0

    def __post_init__(self) -> None:
        check(self.mode in ("slide", "whole"), "eval.mode", "must be slide|whole")
        check(min(self.stride) >= 1, "eval.stride", "must be >= 1")
        check(self.size_divisor >= 0, "eval.size_divisor", "must be >= 0")


@dataclass
class SegHeadConfig:
    """The decode head: ``upernet`` (channels: top-level ``head_channels``) or ``mask2former``.

    Mask2Former fields are transformers' ``Mask2FormerConfig`` ones; the defaults are the CPU
    demo's (tiny), the presets hold the paper's. ``test_scales`` / ``test_flip``: the
    multi-scale + flip test protocol (empty scales and no flip: single scale), for either head.
    """

    kind: str = "upernet"
    num_queries: int = 16
    hidden_dim: int = 64
    feature_size: int = 64
    mask_feature_size: int = 64
    encoder_layers: int = 1
    encoder_feedforward_dim: int = 256
    decoder_layers: int = 3
    num_attention_heads: int = 4
    dim_feedforward: int = 256
    train_num_points: int = 1024
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    test_scales: list[float] = field(default_factory=list)
    test_flip: bool = False

    def __post_init__(self) -> None:
        check(self.kind in HEAD_KINDS, "head.kind",
              f"must be {'|'.join(HEAD_KINDS)}, got {self.kind!r}")
        check(all(s > 0 for s in self.test_scales), "head.test_scales", "must be > 0")
        check(self.num_queries >= 1, "head.num_queries", "must be >= 1")
        check(self.decoder_layers >= 2, "head.decoder_layers",
              "must be >= 2 (Mask2Former counts the query-only first layer)")
        check(self.hidden_dim % self.num_attention_heads == 0, "head.hidden_dim",
              "must be a multiple of head.num_attention_heads")

    def mask2former_kwargs(self) -> dict:
        """``Mask2FormerConfig`` fields for ``build_mask2former``."""
        skip = ("kind", "test_scales", "test_flip")
        return {k: v for k, v in vars(self).items() if k not in skip}

    @property
    def multiscale(self) -> bool:
        """Whether evaluation uses the multi-scale / flip protocol."""
        return self.test_flip or list(self.test_scales) not in ([], [1.0])


# Task defaults live in subclasses (a partial section is built from its class's defaults).
@dataclass
class SegOptimConfig(OptimConfig):
    """``OptimConfig`` with the segmentation demo's defaults, plus the warm-up's starting lr
    (``warmup_ratio`` x lr; the released recipes start at 1e-6) and ``layer0_params``: head
    parameter name fragments trained at layer 0's (smallest) layer-decay scale, as the
    released Mask2Former recipes do for queries, level embedding and predictors."""

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 30
    warmup_ratio: float = 1e-3
    layer0_params: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.warmup_ratio <= 1, "optim.warmup_ratio", "must be in (0, 1]")


@dataclass
class SegRunConfig(RunConfig):
    """``RunConfig`` with the segmentation demo's defaults."""

    output_dir: str = "runs/segmentation"
    batch_size: int = 8
    epochs: float = 8.0


@dataclass
class SegmentationConfig:
    """A segmentation fine-tuning run (``poly_power``: the poly schedule's exponent;
    ``init``: a backbone checkpoint, or a whole segmenter's ``checkpoints/last.pt`` of the
    same head, e.g. stage 1 of the Cityscapes recipe; ``init_strict: false`` lets a whole
    segmenter init differ in tensor shapes (another class count: COCO-Stuff -> ADE20K), the
    differing tensors keeping their fresh initialisation)."""

    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    head: SegHeadConfig = field(default_factory=SegHeadConfig)
    head_channels: int = 64
    poly_power: float = 1.0
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    run: SegRunConfig = field(default_factory=SegRunConfig)
    init: str | None = None
    init_strict: bool = True
    aux_weight: float = 0.0  # UperNet's auxiliary FCN head loss weight (0.4 released; 0: off)

    def __post_init__(self) -> None:
        check(self.head_channels >= 8, "head_channels", "must be >= 8")
        check(self.aux_weight >= 0, "aux_weight", "must be >= 0")
        check(self.aux_weight == 0 or self.head.kind == "upernet", "aux_weight",
              "is UperNet's auxiliary head; set it to 0 for head.kind mask2former")
        check(self.poly_power > 0, "poly_power", "must be > 0")


# ---------------------------------------------------------------- data
def _split_pairs(kind: str, root: Path, split: str, cfg: SegDataConfig) -> list[tuple]:
    """(image, label, label lookup table or None) of one split of a ``kind`` layout."""
    if kind == "demo":
        from finetune.demo_data import ensure_shapes_ade

        root = ensure_shapes_ade(cfg.cache_dir, cfg.demo_train, cfg.demo_val, cfg.demo_size)
    if kind == "cityscapes":
        from finetune.datasets.cityscapes import cityscapes_pairs

        return cityscapes_pairs(root, split)
    if kind == "mapillary":
        from finetune.datasets.mapillary import cityscapes_lut, class_names, mapillary_pairs

        return mapillary_pairs(root, split, cityscapes_lut(class_names(root)))
    if kind == "cocostuff":
        from finetune.datasets.cocostuff import cocostuff_pairs

        return cocostuff_pairs(root, split)
    imgs = sorted((root / "images" / split).glob("*.jpg"))
    return [(p, root / "annotations" / split / (p.stem + ".png"), None) for p in imgs]


def _pairs(cfg: SegDataConfig, train: bool) -> list[tuple[Path, Path, np.ndarray | None]]:
    """The training pairs (every ``train_splits`` split) or the evaluation pairs (the val
    split of ``val_kind`` / ``val_root`` when set)."""
    if train:
        splits = cfg.train_splits or [SPLIT_NAMES[cfg.kind][0]]
        return [pair for split in splits
                for pair in _split_pairs(cfg.kind, Path(cfg.root), split, cfg)]
    return _split_pairs(cfg.eval_kind, Path(cfg.eval_root), SPLIT_NAMES[cfg.eval_kind][1], cfg)


class SegDataset(Dataset):
    """(normalised image, label map with 255 = ignore); train: rescale, crop, flip."""

    def __init__(self, cfg: SegDataConfig, train: bool):
        self.cfg, self.train = cfg, train
        self.pairs = _pairs(cfg, train)
        if not self.pairs:
            kind, where = (cfg.kind, cfg.root) if train else (cfg.eval_kind, cfg.eval_root)
            raise FileNotFoundError(f"data: no {kind} images found under {where or 'demo'}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from finetune.datasets.base import read_label

        img_path, label_path, lut = self.pairs[i]
        img = torch.from_numpy(np.array(Image.open(img_path).convert("RGB"))).permute(2, 0, 1)
        label = torch.from_numpy(read_label(label_path, lut))
        if self.cfg.reduce_zero_label:  # ADE20K: 0 is "other", ignored; 1..N -> 0..N-1
            label = torch.where(label == 0, IGNORE, label - 1)
        return img.float(), label

    def __getitem__(self, i: int):
        img, label = self._load(i)
        c = self.cfg
        if self.train:
            ratio = random.uniform(*c.ratio_range)
            img, label = _resize(img, label, int(c.scale_short * ratio),
                                 int(c.scale_long * ratio))
            img, label = _random_crop(img, label, c.crop_size, c.cat_max_ratio)
            if random.random() < c.hflip:
                img, label = img.flip(-1), label.flip(-1)
            if c.photometric:
                from finetune.photometric import photometric_distortion

                img = photometric_distortion(img)
        return (img - MEAN) / STD, label


def _resize(img: torch.Tensor, label: torch.Tensor, short: int, long: int = 0):
    """Rescale (aspect kept) so the short side is ``short`` and the long side at most
    ``long`` (0: no cap)."""
    h, w = img.shape[-2:]
    s = short / min(h, w)
    if long:
        s = min(s, long / max(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    img = F.interpolate(img[None], size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size, mode="nearest")[0, 0].long()
    return img, label


def _dominated(label: torch.Tensor, cat_max_ratio: float) -> bool:
    """Whether one class covers more than ``cat_max_ratio`` of the labelled pixels (or
    fewer than two classes are present): mmseg's criterion for retrying a crop."""
    counts = torch.bincount(label[label != IGNORE].flatten())
    counts = counts[counts > 0]
    return len(counts) < 2 or counts.max().item() / counts.sum().item() >= cat_max_ratio


def _random_crop(img: torch.Tensor, label: torch.Tensor, crop: tuple[int, int],
                 cat_max_ratio: float = 1.0):
    """A random ``crop`` window; with ``cat_max_ratio`` < 1, up to 10 windows are drawn
    until one is not dominated by a single class (mmseg's ``RandomCrop``)."""
    ch, cw = crop
    h, w = img.shape[-2:]
    if h < ch or w < cw:  # pad: image with 0 (the mean after normalising), label ignored
        ph, pw = max(0, ch - h), max(0, cw - w)
        img = F.pad(img - MEAN, (0, pw, 0, ph)) + MEAN
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
        h, w = img.shape[-2:]
    for _ in range(10 if cat_max_ratio < 1 else 1):
        y, x = random.randint(0, h - ch), random.randint(0, w - cw)
        if not _dominated(label[y:y + ch, x:x + cw], cat_max_ratio):
            break
    return img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def _to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Stretch (B, C, H, W) up to the next multiple of ``divisor`` per side (mmseg's
    ``ResizeToMultiple``); a no-op for divisor 0 or sizes already multiples."""
    if not divisor:
        return x
    h, w = x.shape[-2:]
    size = (math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor)
    if size == (h, w):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- model and evaluation
def is_segmenter_checkpoint(path: str | Path | None) -> bool:
    """Whether ``path`` is a dense fine-tuning run's training checkpoint (``checkpoints/last.pt``:
    the whole ``model`` state and a ``step``, the trunk under a prefix) rather than a backbone
    checkpoint (convert output, released ``.pth``, classification ``last.pt``)."""
    if not path or not Path(path).is_file() or Path(path).suffix != ".pt":
        return False
    try:
        state = runtime.load_checkpoint(Path(path))
    except Exception:  # noqa: BLE001 - not ours: let the backbone loader report on it
        return False
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and "step" in state):
        return False
    # A classification run's last.pt holds the trunk at the top level: a backbone init.
    return not any(k.startswith(("patch_embed.", "levels.")) for k in state["model"])


def _load_whole(model: nn.Module, path: str, strict: bool = True) -> None:
    """Load a whole segmenter state (stage-2 init); a different head/arch fails clearly.

    ``strict=False``: tensors whose shape differs (class predictor and class weights of a
    dataset with another class count) keep their fresh initialisation and are logged;
    missing or unexpected names still fail (they mean another head or architecture).
    """
    from models import CheckpointError

    state = runtime.load_checkpoint(Path(path))["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if shapes and not strict and not (missing or unexpected):
        log.warning("init: %d tensors of %s differ in shape and keep their fresh "
                    "initialisation: %s", len(shapes), path, shapes)
        state = {k: v for k, v in state.items() if v.shape == own[k].shape}
        model.load_state_dict(state, strict=False)
        return
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} is a segmenter checkpoint of another head or architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape "
            f"mismatches; e.g. {(missing + unexpected + shapes)[:3]}); set head.kind / "
            "model.* / data.num_classes as in the run that wrote it")
    model.load_state_dict(state)
    log.info("init: whole segmenter loaded from %s (%d tensors)", path, len(state))


def build_segmentor(cfg: SegmentationConfig, init: str | None = None) -> nn.Module:
    """InternImage trunk + ``head.kind`` head; ``init``: a backbone checkpoint (trunk only)
    or a segmenter ``checkpoints/last.pt`` of the same head (whole model loaded)."""
    whole = is_segmenter_checkpoint(init)
    trunk_init = None if whole else init
    if cfg.head.kind == "mask2former":
        from finetune.heads import build_mask2former

        model: nn.Module = build_mask2former(
            cfg.model.name, cfg.data.num_classes, backbone_kwargs=cfg.model.build_kwargs(),
            init=trunk_init, ignore_index=IGNORE, **cfg.head.mask2former_kwargs())
    else:
        from finetune.backbone import build_trunk
        from finetune.upernet import UperNetSegmentor

        model = UperNetSegmentor(build_trunk(cfg.model, trunk_init), cfg.data.num_classes,
                                 cfg.head_channels, cfg.aux_weight, IGNORE)
    if whole:
        _load_whole(model, str(init), strict=cfg.init_strict)
    return model


def backbone_prefix(model: nn.Module) -> str:
    """Where ``model.backbone`` (the InternImage trunk) sits in ``model``'s parameter names."""
    trunk = model.backbone
    for name, module in model.named_modules():
        if module is trunk:
            return f"{name}." if name else ""
    raise ValueError("model.backbone is not a submodule of the model")


class _LossForward(nn.Module):
    """Calls ``model.loss`` from ``forward``, so DDP's gradient hooks see the training pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        """The wrapped model's loss (a tensor, or a dict of loss terms)."""
        return self.model.loss(images, labels)


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
            x = _resize(x[0], label, cfg.data.test_short, cfg.data.test_long)[0][None]
        logits = _scores(core, _to_multiple(x, cfg.eval.size_divisor), cfg)
        logits = F.interpolate(logits, label.shape, mode="bilinear", align_corners=False)
        conf.update(logits.argmax(1)[0].cpu(), label)
    conf.mat = runtime.all_reduce_sum(conf.mat.to(d.device), d).cpu()
    core.train()
    return conf.scores(_class_names(cfg))


def _scores(core: nn.Module, x: torch.Tensor, cfg: SegmentationConfig) -> torch.Tensor:
    """(1, C, H, W) scores of one image: slide / whole, under multi-scale + flip if set."""
    def single(view: torch.Tensor) -> torch.Tensor:
        if cfg.eval.mode == "slide":
            return slide_logits(core, view, cfg.data.num_classes, cfg.eval.crop,
                                cfg.eval.stride)
        return core(view)

    if not cfg.head.multiscale:
        return single(x)
    from finetune.heads.seg_inference import multiscale_flip_scores

    return multiscale_flip_scores(single, x, scales=list(cfg.head.test_scales) or [1.0],
                                  flip=cfg.head.test_flip)


def _class_names(cfg: SegmentationConfig) -> list[str] | None:
    if cfg.data.class_names:
        return list(cfg.data.class_names)
    if cfg.data.eval_kind in NINETEEN_CLASS_KINDS:
        from finetune.datasets import CITYSCAPES_CLASSES

        return list(CITYSCAPES_CLASSES)
    if cfg.data.kind == "cocostuff":
        from finetune.datasets import COCO_STUFF_CLASSES

        return list(COCO_STUFF_CLASSES)
    return _demo_names(cfg)


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
                          cfg.optim.dcn_lr_mult, backbone_prefix=backbone_prefix(model),
                          backbone_lr_mult=cfg.optim.backbone_lr_mult,
                          layer0_patterns=tuple(cfg.optim.layer0_params))
    opt = adamw(groups, cfg.optim.lr, cfg.optim.betas)
    sched = PolyLRScheduler(opt, t_initial=max(1, total), power=cfg.poly_power,
                            lr_min=cfg.optim.min_lr, warmup_t=cfg.optim.warmup_steps,
                            warmup_lr_init=cfg.optim.lr * cfg.optim.warmup_ratio,
                            warmup_prefix=True,
                            t_in_epochs=False)
    return opt, sched


def _memory_line(cfg: SegmentationConfig, model: nn.Module) -> str:
    """Per-GPU memory of one training step at ``run.batch_size`` x ``data.crop_size``."""
    from finetune.memory import describe, memory_estimate

    d, batch = cfg.data, cfg.run.batch_size
    x = torch.empty(batch, 3, *d.crop_size, device="meta")
    labels = torch.zeros(batch, *d.crop_size, dtype=torch.long, device="meta")
    mask2former = cfg.head.kind == "mask2former"

    def probe(dtype: torch.dtype):
        images = x.to(dtype)
        if mask2former:  # the head's forward up to the per-query outputs
            return model.model(pixel_values=images)
        return model.loss(images, labels)

    scope = "Mask2Former loss (point-sampled) not counted" if mask2former else ""
    est = memory_estimate(model, probe, precision=cfg.run.precision,
                          checkpointing=cfg.model.with_cp,
                          training_probe=not mask2former)
    return describe(est, batch, d.crop_size, cfg.model.with_cp, scope=scope)


def dry_run(cfg: SegmentationConfig) -> int:
    """Build on the meta device and print the plan (with a per-GPU memory estimate)."""
    with torch.device("meta"):
        model = build_segmentor(cfg)
    d = cfg.data
    runtime.print_plan("segmentation (dry run)", {
        "model": f"{_head_desc(cfg)} on {cfg.model.name} {cfg.model.arch() or ''}",
        "parameters": f"{runtime.count_params(model):,}",
        "data": f"{d.kind} {d.root} {d.train_splits or ''} ({d.num_classes} classes)"
                + (f"; eval on {d.eval_kind} {d.eval_root}" if d.val_kind else ""),
        "crop / ratio range": f"{list(d.crop_size)} / {list(d.ratio_range)}",
        "eval": f"{cfg.eval.mode} crop {list(cfg.eval.crop)} stride {list(cfg.eval.stride)}"
                + (f"; scales {list(cfg.head.test_scales) or [1.0]} flip {cfg.head.test_flip}"
                   if cfg.head.multiscale else ""),
        "batch per process": cfg.run.batch_size,
        "length": f"{cfg.run.max_steps} steps" if cfg.run.max_steps else
                  f"{cfg.run.epochs} epochs",
        "optimizer": f"AdamW lr {cfg.optim.lr} wd {cfg.optim.weight_decay} layer decay "
                     f"{cfg.optim.layer_decay}; poly power {cfg.poly_power}",
        "init": _init_desc(cfg.init),
        "memory per GPU": _memory_line(cfg, model),  # last: consumes model
    })
    return 0


def _head_desc(cfg: SegmentationConfig) -> str:
    h = cfg.head
    if h.kind == "mask2former":
        return (f"Mask2Former({h.num_queries} queries, {h.hidden_dim} dims, "
                f"{h.decoder_layers} decoder layers)")
    aux = f" + auxiliary FCN head x{cfg.aux_weight}" if cfg.aux_weight else ""
    return f"UperNet({cfg.head_channels}){aux}"


def _init_desc(init: str | None) -> str:
    if not init:
        return "random"
    return f"{init} (whole segmenter)" if is_segmenter_checkpoint(init) else f"{init} (trunk)"


def train(cfg: SegmentationConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune ``head.kind`` on InternImage; returns the last evaluation (``mIoU``,
    ``IoU.<class>``, ...)."""
    from finetune.loop import run_loop

    d = runtime.setup_distributed()
    if cfg.run.zero_stage:
        raise NotImplementedError("run.zero_stage > 0 is not wired for segmentation yet")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set, val_set = SegDataset(cfg.data, True), SegDataset(cfg.data, False)
    rng.seed_all(cfg.run.seed + d.rank)  # after the data: its first build may draw
    model = build_segmentor(cfg, cfg.init).to(d.device)
    if d.world_size > 1 and d.device.type == "cuda":  # DDP refuses SyncBatchNorm on CPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    steps_per_epoch = max(1, len(train_set) // (cfg.run.batch_size * d.world_size))
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, total)
    net = runtime.wrap_ddp(_LossForward(model), d)
    sampler = DistributedSampler(train_set, d.world_size, d.rank, seed=cfg.run.seed) \
        if d.world_size > 1 else None
    mask2former = cfg.head.kind == "mask2former"

    def batches(epoch: int):
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = rng.loader_generator(cfg.run.seed, d.rank, epoch)  # workers' seeds: per rank
        return DataLoader(train_set, cfg.run.batch_size, shuffle=sampler is None,
                          sampler=sampler, num_workers=cfg.run.num_workers, drop_last=True,
                          generator=g)

    def loss_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(d.device), labels.to(d.device)
        if mask2former:  # class CE + mask BCE + dice, matched, with the auxiliary layers
            return {"loss_mask2former": net(images, labels)}
        return net(images, labels)  # UperNet: loss_ce (+ weighted loss_aux)

    eval_every = cfg.run.eval_every or steps_per_epoch * 2
    return run_loop(name="segmentation", model=model, net=net, optimizer=optimizer,
                    scheduler=scheduler, batches=batches, loss_fn=loss_fn,
                    evaluate=lambda: evaluate(model, val_set, cfg, d), total_steps=total,
                    eval_every=eval_every, checkpoint_every=cfg.run.checkpoint_every or
                    eval_every, log_every=cfg.run.log_every, grad_clip=cfg.optim.grad_clip,
                    out_dir=out_dir, d=d, resume=resume, progress=cfg.run.progress,
                    precision=cfg.run.precision)
