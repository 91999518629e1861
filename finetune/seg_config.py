"""Segmentation fine-tuning config: the typed dataclasses of ``internimage finetune
segmentation`` (data layout, heads, evaluation, optimiser, run) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.demo import cache_dir as demo_cache_dir
from finetune.config import BackboneConfig, OptimConfig, RunConfig, check

DATA_KINDS = ("demo", "ade20k", "cityscapes", "mapillary", "cocostuff")
# (train split, val split) of each layout
SPLIT_NAMES = {"demo": ("training", "validation"), "ade20k": ("training", "validation"),
               "cityscapes": ("train", "val"), "mapillary": ("training", "validation"),
               "cocostuff": ("train2017", "val2017")}
NINETEEN_CLASS_KINDS = ("cityscapes", "mapillary")
HEAD_KINDS = ("upernet", "mask2former")


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
    cache_dir: str = ""  # demo data; "": data.demo.cache_dir() ($INTERNIMAGE_CACHE...)

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
        check(0 <= self.hflip <= 1, "data.hflip", f"must be in [0, 1], got {self.hflip}")
        # the demo writes this many training / validation images: none of either ended in
        # a "no demo images found" traceback after the run directory was set up
        for key, count in (("data.demo_train", self.demo_train), ("data.demo_val", self.demo_val)):
            check(count >= 1, key, f"must be >= 1 (images the demo writes), got {count}")
        self.cache_dir = str(Path(self.cache_dir).expanduser() if self.cache_dir
                             else demo_cache_dir())

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
        check(min(self.crop) >= 1, "eval.crop", "must be >= 1")
        check(min(self.stride) >= 1, "eval.stride", "must be >= 1")
        # windows further apart than their size leave pixels no window scores: their
        # logits were 0/0 (NaN), argmax'ed to class 0 into the mIoU (mmseg's slide
        # inference asserts every pixel is covered: count_mat == 0 nowhere)
        check(self.mode != "slide" or all(s <= c for s, c in zip(self.stride, self.crop)),
              "eval.stride", f"{list(self.stride)} must be <= eval.crop {list(self.crop)} "
              "on each side (windows further apart leave pixels unscored)")
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
    ``init``: a backbone checkpoint, or a segmentation run's checkpoint (its run directory,
    ``checkpoints/``, ``latest`` or a ``step_*`` directory) of the same head, e.g. stage 1
    of the Cityscapes recipe; ``init_strict: false`` lets a whole segmenter init differ in
    tensor shapes (another class count: COCO-Stuff -> ADE20K), the differing tensors
    keeping their fresh initialisation)."""

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
