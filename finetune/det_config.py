"""Detection fine-tuning config: the typed dataclasses of ``internimage finetune
detection`` (COCO layout, detector sizes, schedule, head, optimiser, run) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.demo import cache_dir as demo_cache_dir
from finetune.config import BackboneConfig, OptimConfig, RunConfig, check


@dataclass
class DetCropAugConfig:
    """The DETR-style crop branch of the released 3x Mask R-CNN recipes (mmdet ``AutoAugment``
    over two policies, each drawn with probability 0.5; OpenGVLab/InternImage
    detection/configs/coco/mask_rcnn_internimage_t_fpn_3x_coco.py).

    With probability ``prob`` a training image is resized to a shorter side drawn from
    ``resize_sizes`` (longer side <= ``max_size``, ratio kept), then randomly cropped to
    ``crop_size`` = (min, max) pixels per side (mmdet ``RandomCrop`` with
    ``crop_type='absolute_range'``, ``allow_negative_crop``). The model's own multi-scale
    resize then plays the policy's second ``Resize`` (``override=True``). ``prob=0``: off.
    """

    prob: float = 0.0
    resize_sizes: list[int] = field(default_factory=lambda: [400, 500, 600])
    max_size: int = 1333
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    # mmdet's allow_negative_crop: True keeps a crop left without any box (the 3x Mask
    # R-CNN files); False (the released DINO-T/L files) drops it and, as mmdet's
    # CustomDataset does when a pipeline returns None, draws another training image of
    # the same aspect group (width > height or not) and runs the whole pipeline on it
    allow_negative_crop: bool = True

    def __post_init__(self) -> None:
        check(0 <= self.prob <= 1, "data.crop_aug.prob", "must be in [0, 1]")
        check(bool(self.resize_sizes) and min(self.resize_sizes) >= 1,
              "data.crop_aug.resize_sizes", "must be a non-empty list of sizes >= 1")
        check(self.max_size >= max(self.resize_sizes), "data.crop_aug.max_size",
              "must be >= every size of data.crop_aug.resize_sizes")
        check(len(self.crop_size) == 2 and 1 <= self.crop_size[0] <= self.crop_size[1],
              "data.crop_aug.crop_size", f"must be [min, max] with 1 <= min <= max, got "
              f"{self.crop_size}")


@dataclass
class DetDataConfig:
    """``demo`` (generated shapes) or ``coco`` (images dirs + instance annotation JSONs);
    training augmentation: horizontal flip (``hflip``) and the optional ``crop_aug``;
    training images kept: those with annotations (``filter_empty_gt``) and at least
    ``min_size`` pixels a side (mmdet's ``CocoDataset._filter_imgs``)."""

    kind: str = "demo"
    root: str = ""
    train_images: str = "train2017"
    train_ann: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_ann: str = "annotations/instances_val2017.json"
    hflip: float = 0.5
    crop_aug: DetCropAugConfig = field(default_factory=DetCropAugConfig)
    # mmdet's filter_empty_gt (CocoDataset._filter_imgs, training set only): train on the
    # images holding at least one annotation of the dataset's categories (a crowd one
    # counts).
    filter_empty_gt: bool = False
    # mmdet 2.x CocoDataset._filter_imgs(min_size=32), run on every training set (not at
    # evaluation) whatever filter_empty_gt says: a training image stays only if
    # min(width, height) >= min_size, the sizes its annotation file records. 0: off.
    min_size: int = 32
    demo_train: int = 400
    demo_val: int = 80
    demo_size: int = 64
    cache_dir: str = ""  # demo data; "": data.demo.cache_dir() ($INTERNIMAGE_CACHE...)

    def __post_init__(self) -> None:
        check(self.kind in ("demo", "coco"), "data.kind", f"must be demo|coco, got {self.kind!r}")
        check(self.kind != "coco" or bool(self.root), "data.root", "is required for data.kind=coco")
        check(0 <= self.hflip <= 1, "data.hflip", "must be in [0, 1]")
        check(self.min_size >= 0, "data.min_size", "must be >= 0 (0: off)")
        # the demo's images are demo_size squared: a larger min_size would drop them all
        check(self.kind != "demo" or self.demo_size >= self.min_size, "data.min_size",
              f"drops every demo image (data.demo_size={self.demo_size} < {self.min_size}); "
              "lower data.min_size or raise data.demo_size")
        # the demo writes this many training / validation images: none of either ended in
        # a "no demo images found" traceback after the run directory was set up
        for key, count in (("data.demo_train", self.demo_train), ("data.demo_val", self.demo_val)):
            check(count >= 1, key, f"must be >= 1 (images the demo writes), got {count}")
        self.cache_dir = str(Path(self.cache_dir).expanduser() if self.cache_dir
                             else demo_cache_dir())


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
    # mmdet's _base_/models/mask_rcnn_r50_fpn.py (the released Mask R-CNN base): 1000 RPN
    # proposals kept after NMS in training (torchvision's default: 2000), and RoIAlign with
    # an adaptive sampling grid (sampling_ratio=0; torchvision's MaskRCNN default: 2)
    rpn_post_nms_train: int = 1000
    roi_sampling_ratio: int = 0

    def __post_init__(self) -> None:
        check(self.rpn_post_nms_train >= 1, "detector.rpn_post_nms_train", "must be >= 1")
        check(self.roi_sampling_ratio >= 0, "detector.roi_sampling_ratio",
              "must be >= 0 (0: adaptive, ceil(RoI size / output size) per bin)")
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
    the released recipe's ``offset_lr_scale``); ``layer0_params``: head parameter name
    fragments trained at layer 0's (smallest) layer-decay scale, as the released dense
    layer-decay constructor does for DINO's level embeddings (``level_embeds``);
    ``decay_all``: weight decay on every parameter, no exemptions."""

    lr: float = 1e-3
    warmup_steps: int = 50
    head_offset_lr_mult: float = 1.0
    layer0_params: list[str] = field(default_factory=list)
    # True: weight decay on every parameter (norms, biases, layer-scale gammas and offsets
    # included), as mmcv's DefaultOptimizerConstructor without decay multipliers does (the
    # released DINO-L 0.1x-backbone-lr file); False: the exemptions of the released
    # layer-decay constructor (runtime/param_groups.py no_weight_decay)
    decay_all: bool = False

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
