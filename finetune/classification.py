"""Image classification fine-tuning (ImageNet recipe) with timm's training tools.

timm provides the transforms (RandAugment, random erasing), Mixup/CutMix, label-smoothing
losses, the model EMA and the cosine schedule; this file wires them to InternImage with
layer-wise lr decay and the 0.1 lr multiplier on the DCN offset layers. Runs alone or
under torchrun or SLURM, through a DeepSpeed engine (``run.zero_stage`` 0..3,
finetune/zero.py). With no config it fine-tunes on the digits demo shards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from data.config import S3Config, check_no_credentials, check_shard_list_policy
from data.demo import cache_dir as demo_cache_dir
from finetune.cls_build import build_classifier, classifier_groups
from finetune.config import BackboneConfig, OptimConfig, RunConfig, check
from finetune.plan import count_params, per_gpu_count, plan_gpu_counts, print_plan
from runtime import run_lock

log = logging.getLogger(__name__)


@dataclass
class ClsDataConfig:
    """``demo`` (digits shards), ``imagefolder`` (root/train, root/val), ``shards`` (small
    sets, held in memory) or ``stream`` (shards read on the fly; an epoch is
    ``train_samples`` samples; ``shuffle_buffer`` samples per worker are mixed; the val
    shards are held in memory). ``s3``: object-storage access for s3:// shard URLs."""

    kind: str = "demo"
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    train_urls: list[str] = field(default_factory=list)
    val_urls: list[str] = field(default_factory=list)
    num_classes: int = 10
    img_size: int = 32
    source_size: int = 32  # demo: pixel size of the generated digit shards
    cache_dir: str = ""  # demo data; "": data.demo.cache_dir() ($INTERNIMAGE_CACHE...)
    train_samples: int = 0  # stream: samples per epoch (the size of the training set)
    shuffle_buffer: int = 2000  # stream: per-worker sample shuffle buffer
    # stream: a resume whose shard list changed since the checkpoint is refused (error),
    # or starts the stream afresh over the new list (restart), as pre-training's data.*
    on_shard_list_change: str = "error"
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        check(self.kind in ("demo", "imagefolder", "shards", "stream"), "data.kind",
              f"must be demo|imagefolder|shards|stream, got {self.kind!r}")
        check(self.kind != "stream" or self.train_samples > 0, "data.train_samples",
              "is required for data.kind=stream (samples per epoch, e.g. 14197122 for "
              "ImageNet-22K)")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check_shard_list_policy(self.on_shard_list_change)
        check(self.kind != "imagefolder" or bool(self.root), "data.root",
              "is required for data.kind=imagefolder")
        check(self.kind not in ("shards", "stream") or (bool(self.train_urls) and
                                                        bool(self.val_urls)),
              "data.train_urls", f"data.train_urls and data.val_urls are required for "
              f"{self.kind}")
        check_no_credentials(self.train_urls, "data.train_urls")
        check_no_credentials(self.val_urls, "data.val_urls")
        check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        check(self.img_size >= 16, "data.img_size", "must be >= 16")
        self.cache_dir = str(Path(self.cache_dir).expanduser() if self.cache_dir
                             else demo_cache_dir())


@dataclass
class ClsAugConfig:
    """timm augmentation, Mixup/CutMix and label smoothing (recipe: smoothing 0.3 for H)."""

    # defaults: the digits demo (no flips: a mirrored 2 is no 2); ImageNet values in configs
    auto_augment: str = "rand-m4-n1-mstd0.5-inc1"  # "" disables RandAugment
    re_prob: float = 0.1
    scale: tuple[float, float] = (0.7, 1.0)
    hflip: float = 0.0
    color_jitter: float = 0.0
    test_crop_pct: float = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        check(0 <= self.re_prob <= 1, "aug.re_prob", "must be in [0, 1]")
        check(0 <= self.smoothing < 1, "aug.smoothing", "must be in [0, 1)")
        check(self.mixup >= 0 and self.cutmix >= 0, "aug.mixup", "alphas must be >= 0")
        check(0 < self.scale[0] <= self.scale[1] <= 1, "aug.scale", "must be 0 < lo <= hi <= 1")
        check(0 <= self.hflip <= 1, "aug.hflip", f"must be in [0, 1], got {self.hflip}")
        check(0 <= self.mix_prob <= 1, "aug.mix_prob", f"must be in [0, 1], got {self.mix_prob}")
        check(self.color_jitter >= 0, "aug.color_jitter",
              f"must be >= 0 (0: off), got {self.color_jitter}")
        # timm reads crop_pct 0 as "unset" and silently evaluates at 0.875
        check(0 < self.test_crop_pct <= 1, "aug.test_crop_pct",
              f"must be in (0, 1], got {self.test_crop_pct}")


@dataclass
class EmaConfig:
    """timm ModelEmaV3; evaluated next to the raw weights (``top1_ema``)."""

    enabled: bool = True
    decay: float = 0.99  # recipes: 0.9998
    warmup: bool = True  # decay ramps up over the first updates

    def __post_init__(self) -> None:
        check(0 < self.decay < 1, "ema.decay", "must be in (0, 1)")


@dataclass
class ClsOptimConfig(OptimConfig):
    """``OptimConfig`` plus a warm-up given in epochs (the released recipes' unit); the
    lr may be given per ``lr_batch`` images and scaled to the run's total batch, as the
    released classification code scales it (finetune/cls_build.py ``effective_optim``)."""

    batch_scaled_lr: ClassVar[bool] = True

    # set: overrides optim.warmup_steps with int(warmup_epochs x steps per epoch) of the
    # actual run, so the warm-up follows the dataset size and the number of processes
    warmup_epochs: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # an infinite one failed at the start's int() of the warm-up steps (OverflowError)
        check(self.warmup_epochs is None
              or (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0),
              "optim.warmup_epochs", f"must be a finite number >= 0 (or null: use "
              f"optim.warmup_steps), got {self.warmup_epochs}")

    def warmup(self, steps_per_epoch: int) -> int:
        """Warm-up length in optimizer steps."""
        if self.warmup_epochs is None:
            return self.warmup_steps
        return int(self.warmup_epochs * steps_per_epoch)


@dataclass
class ClsRunConfig(RunConfig):
    """``RunConfig`` with the digits demo's defaults (a partial section keeps them)."""

    output_dir: str = "runs/classification"
    epochs: float = 30.0
    deepspeed_config: str = ""  # JSON merged over the generated DeepSpeed config


@dataclass
class ClsModelConfig(BackboneConfig):
    """The classifier: a backbone and how its head starts."""

    # A head the --init does not provide (a new class count, a backbone-only file) starts
    # at its built initialisation times this. The released TRAIN.RAND_INIT_FT_HEAD scales
    # the head by 0.001 where the checkpoint holds one of another class count
    # (OpenGVLab/InternImage classification/utils.py load_pretrained; it then also drops
    # a 22K head instead of mapping its 1K rows, which ours keeps, unscaled); ours applies
    # to any head the init leaves fresh, our convert output holding none. So the first
    # steps, without warm-up in the H 224 recipe, send no random gradients into the trunk.
    # 1.0: as built.
    head_init_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.head_init_scale <= 1, "model.head_init_scale",
              f"must be in (0, 1], got {self.head_init_scale}")


@dataclass
class ClassificationConfig:
    """A classification fine-tuning run."""

    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    aug: ClsAugConfig = field(default_factory=ClsAugConfig)
    optim: ClsOptimConfig = field(default_factory=ClsOptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: ClsRunConfig = field(default_factory=ClsRunConfig)
    init: str | None = None

    def __post_init__(self) -> None:
        # timm's Mixup (which also does CutMix) mixes each image with its mirror in the
        # batch and asserts an even batch on every call, whatever the mode, alphas or
        # mix_prob (timm/data/mixup.py Mixup.__call__): an odd batch would train until the
        # first step, then crash. Mixup is applied to each micro-batch of run.batch_size
        # (the loaders drop a short last batch).
        mixing = self.aug.mixup > 0 or self.aug.cutmix > 0
        check(not mixing or self.run.batch_size % 2 == 0, "run.batch_size",
              f"must be even with Mixup/CutMix (aug.mixup {self.aug.mixup}, aug.cutmix "
              f"{self.aug.cutmix}: timm mixes each image with its mirror in the batch), got "
              f"{self.run.batch_size}")


def check_start(cfg: ClassificationConfig, thorough: bool = True, with_data: bool = True) -> None:
    """:func:`finetune.init.start_checks` with this task's data paths (``with_data=False``:
    the init alone, as a dry run checks it)."""
    from finetune.cls_data import check_data
    from finetune.init import start_checks

    start_checks(cfg, check_data if with_data else None, thorough=thorough)


def dry_run(cfg: ClassificationConfig, gpus: int | None = None) -> int:
    """Build on the meta device (no memory) and print what a run would do: the total
    batch and effective lr on ``gpus`` processes (None: ``WORLD_SIZE`` if set, else a few
    GPU counts, finetune/plan.py ``plan_gpu_counts``). First, as a start: an ``init``
    recording another backbone raises ``CheckpointError`` (its metadata alone; the data
    paths are not checked, a plan is often made where the data is not)."""
    from finetune.cls_build import effective_optim

    check_start(cfg, with_data=False)
    counts = plan_gpu_counts(gpus)
    with torch.device("meta"):
        model = build_classifier(cfg)
    groups = classifier_groups(model, cfg)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    print_plan("classification (dry run)", {
        "model": f"{cfg.model.name} {cfg.model.arch() or ''}",
        "parameters": f"{count_params(model):,}",
        "classes / image size": f"{cfg.data.num_classes} / {cfg.data.img_size}",
        "data": cfg.data.kind + (f" {cfg.data.root}" if cfg.data.root else ""),
        "batch": cfg.run.batch_desc(),
        "total batch": per_gpu_count({n: cfg.run.total_batch(n) for n in counts}),
        "length": f"{cfg.run.max_steps} steps" if cfg.run.max_steps else
                  f"{cfg.run.epochs} epochs",
        "optimizer": f"AdamW wd {cfg.optim.weight_decay}, lr " + (
            f"{cfg.optim.lr} absolute (optim.lr_batch null: the same at any batch)"
            if cfg.optim.lr_batch is None else
            f"{cfg.optim.lr} per {cfg.optim.lr_batch} images (optim.lr_batch), scaled "
            "to the total batch"),
        "effective lr": per_gpu_count({n: f"{effective_optim(cfg, n).lr:.4g}"
                                       for n in counts}),
        "warm-up": (f"{cfg.optim.warmup_epochs} epochs" if cfg.optim.warmup_epochs is not None
                    else f"{cfg.optim.warmup_steps} steps"),
        "layer decay": f"{cfg.optim.layer_decay} ({len(groups)} groups, lr scales "
                       f"{scales[0]:.3g}..{scales[-1]:.3g})",
        "aug": f"RandAugment {cfg.aug.auto_augment or 'off'}, RE {cfg.aug.re_prob}, "
               f"mixup {cfg.aug.mixup} cutmix {cfg.aug.cutmix}, smoothing {cfg.aug.smoothing}",
        "ema": f"{cfg.ema.decay}" if cfg.ema.enabled else "off",
        "drop path": cfg.model.drop_path_rate,
        "init": cfg.init or "random",
        "engine": (f"DeepSpeed ZeRO-{cfg.run.zero_stage}, {cfg.run.precision}"
                   if cfg.run.zero_stage else f"DeepSpeed (no ZeRO), {cfg.run.precision}"),
        "memory per GPU": _memory_line(cfg, model),  # last: consumes model
    })
    return 0


def _memory_line(cfg: ClassificationConfig, model: nn.Module) -> str:
    """Per-GPU memory of one training step at ``run.batch_size`` x ``data.img_size``."""
    from finetune.memory import describe, memory_estimate

    size, batch = cfg.data.img_size, cfg.run.batch_size
    x = torch.empty(batch, 3, size, size, device="meta")
    est = memory_estimate(model, lambda dtype: model(x.to(dtype)),
                          precision=cfg.run.precision, checkpointing=cfg.model.with_cp,
                          zero_stage=cfg.run.zero_stage, ema=cfg.ema.enabled,
                          weights=cfg.run.precision)
    return describe(est, batch, (size, size), cfg.model.with_cp, cfg.run.zero_stage)


@run_lock.releasing
def train(cfg: ClassificationConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune through the DeepSpeed engine (ZeRO stage ``run.zero_stage``, 0 by
    default: plain data parallelism); returns the last evaluation metrics."""
    from finetune.zero import train_zero

    return train_zero(cfg, out_dir, resume)
