"""Image classification fine-tuning (ImageNet recipe) with timm's training tools.

timm provides the transforms (RandAugment, random erasing), Mixup/CutMix, label-smoothing
losses, the model EMA and the cosine schedule; this file wires them to InternImage with
layer-wise lr decay and the 0.1 lr multiplier on DCN offset/mask layers. Runs alone or
under torchrun (DDP), or through DeepSpeed ZeRO with ``run.zero_stage`` > 0
(finetune/zero.py). With no config it fine-tunes on the digits demo shards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune import runtime
from finetune.config import BackboneConfig, OptimConfig, RunConfig, check
from finetune.lr_decay import adamw, param_groups
from pretrain.data.config import S3Config
from runtime import rng
from runtime.metrics import MetricsFile

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
    cache_dir: str = "~/.cache/internimage"
    train_samples: int = 0  # stream: samples per epoch (the size of the training set)
    shuffle_buffer: int = 2000  # stream: per-worker sample shuffle buffer
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        check(self.kind in ("demo", "imagefolder", "shards", "stream"), "data.kind",
              f"must be demo|imagefolder|shards|stream, got {self.kind!r}")
        check(self.kind != "stream" or self.train_samples > 0, "data.train_samples",
              "is required for data.kind=stream (samples per epoch, e.g. 14197122 for "
              "ImageNet-22K)")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check(self.kind != "imagefolder" or bool(self.root), "data.root",
              "is required for data.kind=imagefolder")
        check(self.kind not in ("shards", "stream") or (bool(self.train_urls) and
                                                        bool(self.val_urls)),
              "data.train_urls", f"data.train_urls and data.val_urls are required for "
              f"{self.kind}")
        check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        check(self.img_size >= 16, "data.img_size", "must be >= 16")
        self.cache_dir = str(Path(self.cache_dir).expanduser())


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
    """``OptimConfig`` plus a warm-up given in epochs (the released recipes' unit)."""

    # set: overrides optim.warmup_steps with int(warmup_epochs x steps per epoch) of the
    # actual run, so the warm-up follows the dataset size and the number of processes
    warmup_epochs: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.warmup_epochs is None or self.warmup_epochs >= 0, "optim.warmup_epochs",
              "must be >= 0 (or null: use optim.warmup_steps)")

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
    # ZeRO-3: parameters smaller than this stay whole on every rank (DeepSpeed's default)
    zero_persistence_threshold: int = 100_000
    deepspeed_config: str = ""  # JSON merged over the generated DeepSpeed config

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.zero_persistence_threshold >= 0, "run.zero_persistence_threshold",
              "must be >= 0")


@dataclass
class ClassificationConfig:
    """A classification fine-tuning run."""

    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    aug: ClsAugConfig = field(default_factory=ClsAugConfig)
    optim: ClsOptimConfig = field(default_factory=ClsOptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: ClsRunConfig = field(default_factory=ClsRunConfig)
    init: str | None = None


def build_classifier(cfg: ClassificationConfig) -> nn.Module:
    """InternImage with a ``data.num_classes`` head."""
    from models import build_model

    return build_model(cfg.model.name, num_classes=cfg.data.num_classes,
                       **cfg.model.build_kwargs())


def build_optimizer(model: nn.Module, cfg: ClassificationConfig) -> torch.optim.Optimizer:
    """AdamW over layer-decayed groups (``lr_scale`` per group, applied by the scheduler)."""
    groups = param_groups(model, model.depths, cfg.optim.weight_decay, cfg.optim.layer_decay,
                          cfg.optim.dcn_lr_mult)
    return adamw(groups, cfg.optim.lr, cfg.optim.betas)


def build_scheduler(optimizer, cfg, total_steps: int, steps_per_epoch: int = 0):
    """timm's cosine schedule, stepped per update, with linear warm-up.

    As in the released InternImage classification code, the cosine spans the whole run and
    the warm-up overlays its start (no warm-up prefix), so the lr reaches ``min_lr`` at the
    last step; ``steps_per_epoch`` converts ``optim.warmup_epochs``.
    """
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=cfg.optim.min_lr,
                             warmup_t=cfg.optim.warmup(steps_per_epoch),
                             warmup_lr_init=cfg.optim.lr * 1e-3, warmup_prefix=False,
                             t_in_epochs=False)


def build_mixup(cfg: ClassificationConfig):
    """timm's Mixup/CutMix (None when both alphas are 0); it also applies smoothing."""
    from timm.data import Mixup

    a = cfg.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mix_prob,
                 label_smoothing=a.smoothing, num_classes=cfg.data.num_classes)


def build_loss(cfg: ClassificationConfig, mixup) -> nn.Module:
    """Soft-target CE under Mixup (targets already smoothed), else label-smoothing CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: runtime.Dist) -> dict[str, float]:
    """Top-1/top-5 accuracy over the (rank-split) validation set, reduced over ranks."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    for images, labels in loader:
        logits = model(images.to(d.device))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices.cpu()
        hit = top == labels[:, None]
        stats += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(labels)],
                              dtype=torch.float64)
    stats = runtime.all_reduce_sum(stats.to(d.device), d).cpu()
    model.train()
    return {"top1": stats[0].item() / max(1, stats[2].item()),
            "top5": stats[1].item() / max(1, stats[2].item())}


def dry_run(cfg: ClassificationConfig) -> int:
    """Build on the meta device (no memory) and print what a run would do."""
    with torch.device("meta"):
        model = build_classifier(cfg)
    groups = param_groups(model, model.depths, cfg.optim.weight_decay, cfg.optim.layer_decay,
                          cfg.optim.dcn_lr_mult)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    runtime.print_plan("classification (dry run)", {
        "model": f"{cfg.model.name} {cfg.model.arch() or ''}",
        "parameters": f"{runtime.count_params(model):,}",
        "classes / image size": f"{cfg.data.num_classes} / {cfg.data.img_size}",
        "data": cfg.data.kind + (f" {cfg.data.root}" if cfg.data.root else ""),
        "batch per process": cfg.run.batch_size,
        "length": f"{cfg.run.max_steps} steps" if cfg.run.max_steps else
                  f"{cfg.run.epochs} epochs",
        "optimizer": f"AdamW lr {cfg.optim.lr} wd {cfg.optim.weight_decay}",
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
                   if cfg.run.zero_stage else f"DDP/single, {cfg.run.precision}"),
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
                          zero_stage=cfg.run.zero_stage, ema=cfg.ema.enabled)
    return describe(est, batch, (size, size), cfg.model.with_cp, cfg.run.zero_stage)


def train(cfg: ClassificationConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune; returns the last evaluation metrics."""
    from timm.utils import ModelEmaV3

    from finetune.cls_data import build_datasets
    from finetune.cls_loop import ClsSteps, run_classification
    from finetune.init import load_init

    if cfg.run.zero_stage:  # L/XL/H: DeepSpeed engine, its own checkpoints (finetune/zero.py)
        from finetune.zero import train_zero

        return train_zero(cfg, out_dir, resume)
    from finetune.zero import check_engine_matches

    check_engine_matches(resume, out_dir, zero=False)
    d = runtime.setup_distributed()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set, val_set = build_datasets(cfg)
    # seeded once the data is there: writing the demo shards on a first run draws from
    # python's generator, and a run must not depend on whether the cache existed
    rng.seed_all(cfg.run.seed + d.rank)
    model = build_classifier(cfg)
    if cfg.init:
        load_init(model, cfg.init, variant=cfg.model.name, arch=cfg.model.arch())
    model.to(d.device)
    steps_per_epoch = len(train_set) // (cfg.run.batch_size * d.world_size)
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) \
        if cfg.ema.enabled else None
    mixup = build_mixup(cfg)
    criterion = build_loss(cfg, mixup)
    step, state = 0, None
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    resume_path = runtime.resolve_resume(resume, out_dir)
    if resume_path is not None:
        state = runtime.load_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        step = state["step"]
        scheduler.step_update(step)
        log.info("resumed from %s at step %d", resume_path, step)
    net = runtime.wrap_ddp(model, d)
    net.train()

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(d.device.type, torch.bfloat16, enabled=cfg.run.precision == "bf16"):
            loss = criterion(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        return loss

    def evaluate_all(val_loader) -> dict:
        result = evaluate(net, val_loader, d)
        if ema is not None:
            e = evaluate(ema.module, val_loader, d)
            result.update(top1_ema=e["top1"], top5_ema=e["top5"])
        return result

    def save(step: int) -> None:  # on every rank: each contributes its random state
        rng_states = rng.gather_rng_states()
        if d.is_main:
            runtime.save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "step": step, "rng_ranks": rng_states})

    def after_step(step: int) -> None:
        if ema is not None:
            ema.update(model, step=step)

    steps = ClsSteps(train=train_step, after_step=after_step, evaluate=evaluate_all, save=save)
    # lines past the step this run starts from go (a dead run's; a fresh start: all)
    metrics = MetricsFile(out_dir, d.is_main, resume_step=step, timestamp=True)
    if state is not None:  # last: nothing between here and the first batch draws
        rng.restore_rank_rng(state.get("rng_ranks"), d.rank, d.world_size)
    return run_classification(
        cfg, d, train_set, val_set, steps, optimizer=optimizer, scheduler=scheduler,
        mixup=mixup, start_step=step, steps_per_epoch=steps_per_epoch, total=total,
        metrics=metrics, desc="classification")
