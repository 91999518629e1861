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

import logging
import math
from pathlib import Path

import torch
from torch import nn

from finetune.dense_data import train_batches
from finetune.plan import count_params, print_plan
from finetune.seg_config import (  # noqa: F401  (the public import path)
    DATA_KINDS,
    HEAD_KINDS,
    NINETEEN_CLASS_KINDS,
    SPLIT_NAMES,
    SegDataConfig,
    SegEvalConfig,
    SegHeadConfig,
    SegmentationConfig,
    SegOptimConfig,
    SegRunConfig,
)
from finetune.seg_data import (  # noqa: F401  (the public import path)
    MEAN,
    STD,
    LabelRangeError,
    SegDataset,
    agreed_seg_set,
    crop_is_dominated,
    random_crop,
    resize_short_side,
    resize_to_multiple,
)
from finetune.seg_eval import (  # noqa: F401  (the public import path)
    evaluate,
    slide_logits,
)
from finetune.seg_model import (  # noqa: F401  (the public import path)
    LossForward,
    backbone_prefix,
    build_segmentor,
    is_segmenter_checkpoint,
)
from models.checkpoint import CheckpointError
from runtime import rng, run_lock, schedules
from runtime.dist import broadcast_object, init_distributed
from runtime.loop import RefusedStart
from runtime.param_groups import adamw, param_groups

log = logging.getLogger(__name__)

# the metric whose best checkpoint is kept (runtime/best.py): the released segmentation
# configs' ``evaluation = dict(..., metric='mIoU', save_best='mIoU')``
BEST_METRIC = "mIoU"


def optimizer_and_schedule(model: nn.Module, cfg: SegmentationConfig, total: int):
    """AdamW over the recipe's parameter groups and its poly schedule for ``total`` steps."""
    from models import VARIANTS

    o = cfg.optim
    groups = param_groups(model, o.weight_decay,
                          depths=cfg.model.depths or VARIANTS[cfg.model.name].depths,
                          backbone_prefix=backbone_prefix(model), layer_decay=o.layer_decay,
                          dcn_lr_mult=o.dcn_lr_mult, backbone_lr_mult=o.backbone_lr_mult,
                          layer0_patterns=tuple(o.layer0_params))
    opt = adamw(groups, o.lr, o.betas)
    sched = schedules.poly(opt, lr=o.lr, min_lr=o.min_lr, total_steps=total,
                           power=cfg.poly_power, warmup_steps=o.warmup_steps,
                           warmup_ratio=o.warmup_ratio)
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
                          training_probe=not mask2former, zero_stage=cfg.run.zero_stage)
    return describe(est, batch, d.crop_size, cfg.model.with_cp, cfg.run.zero_stage,
                    scope=scope)


def check_start(cfg: SegmentationConfig, thorough: bool = True, with_data: bool = True) -> None:
    """:func:`finetune.init.start_checks` with this task's data paths (a whole segmenter's
    init is checked when it is loaded; ``with_data=False``: the init alone, as a dry run
    checks it)."""
    from finetune.init import start_checks
    from finetune.seg_data import check_data

    start_checks(cfg, check_data if with_data else None,
                 backbone_init=not (cfg.init and is_segmenter_checkpoint(cfg.init)),
                 thorough=thorough)


def dry_run(cfg: SegmentationConfig, gpus: int | None = None) -> int:
    """Build on the meta device and print the plan (with a per-GPU memory estimate and the
    total batch on ``gpus`` processes; None: ``WORLD_SIZE`` if set, else a few GPU counts;
    the released mmseg configs give their lr for one total batch). First, as a start: an
    ``init`` recording another backbone raises ``CheckpointError`` (its metadata alone;
    a whole segmenter's is checked when loaded; the data paths are not checked, a plan is
    often made where the data is not)."""
    from finetune.plan import per_gpu_count, plan_gpu_counts

    check_start(cfg, with_data=False)
    counts = plan_gpu_counts(gpus)
    with torch.device("meta"):
        model = build_segmentor(cfg)
    d = cfg.data
    print_plan("segmentation (dry run)", {
        "model": f"{_head_desc(cfg)} on {cfg.model.name} {cfg.model.arch() or ''}",
        "parameters": f"{count_params(model):,}",
        "data": f"{d.kind} {d.root} {d.train_splits or ''} ({d.num_classes} classes)"
                + (f"; eval on {d.eval_kind} {d.eval_root}" if d.val_kind else ""),
        "crop / ratio range": f"{list(d.crop_size)} / {list(d.ratio_range)}",
        "eval": f"{cfg.eval.mode} crop {list(cfg.eval.crop)} stride {list(cfg.eval.stride)}"
                + (f"; scales {list(cfg.head.test_scales) or [1.0]} flip {cfg.head.test_flip}"
                   if cfg.head.multiscale else ""),
        "batch": cfg.run.batch_desc(),
        "total batch": per_gpu_count({n: cfg.run.total_batch(n) for n in counts}),
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


def refuse_single_image_batchnorm(cfg: SegmentationConfig, pooled_ranks: int) -> None:
    """Refuse (``RefusedStart``) a UperNet run whose BatchNorm layers would see one image:
    the pyramid pooling's 1x1 bin then holds one value per channel, which BatchNorm cannot
    normalise in training (the first forward raised, after the run directory was made).
    ``pooled_ranks``: how many ranks' images one BatchNorm pools (SyncBatchNorm: all)."""
    if cfg.head.kind == "upernet" and cfg.run.batch_size * pooled_ranks < 2:
        raise RefusedStart(
            f"segmentation: run.batch_size={cfg.run.batch_size} image per process, and "
            f"UperNet's BatchNorm layers pool no other process's images here (SyncBatchNorm "
            f"runs on CUDA with more than one process only): its 1x1 pyramid-pooling bin "
            f"then has one value per channel, which BatchNorm cannot train on; use "
            f"run.batch_size >= 2 (the UperNet configs use 2 per GPU)")


# Mask2Former settings that shape its parameters or how they are used (transformers'
# Mask2FormerConfig names): part of its runs' model hash
MASK2FORMER_SHAPE_KEYS = ("num_queries", "hidden_dim", "feature_size", "mask_feature_size",
                          "encoder_layers", "encoder_feedforward_dim", "decoder_layers",
                          "num_attention_heads", "dim_feedforward")


def segmentation_model_hash(cfg: SegmentationConfig, head_sizes: bool = True) -> str:
    """The hash a segmentation run's checkpoints carry (``trainer_state.json``
    ``model_hash``): what their tensors depend on. Mask2Former's adds its head sizes
    (:data:`MASK2FORMER_SHAPE_KEYS`); ``head_sizes=False``: the hash its runs had before,
    to recognise their checkpoints (:func:`resume_model_hash`)."""
    from finetune.engine import fingerprint

    parts: list = ["segmentation", cfg.model.name, cfg.model.arch(), cfg.head.kind,
                   cfg.head_channels, cfg.aux_weight > 0, cfg.data.num_classes]
    if cfg.head.kind == "mask2former" and head_sizes:
        parts.append({k: getattr(cfg.head, k) for k in MASK2FORMER_SHAPE_KEYS})
    return fingerprint(*parts)


def resume_model_hash(cfg: SegmentationConfig, saved: str | None) -> str:
    """The hash this run checks a checkpoint's ``saved`` one against (and saves its own
    with): :func:`segmentation_model_hash`, or, for a Mask2Former checkpoint written
    before the head sizes were hashed, that run's own hash (its sizes cannot be told:
    resumed as before, and the run keeps its hash). Before, a resume with other
    Mask2Former sizes passed the hash and failed inside DeepSpeed's load with advice that
    could not help; now it is refused first, naming the hashes (runtime.checkpoint
    ``check_compatible``)."""
    legacy = segmentation_model_hash(cfg, head_sizes=False)
    if cfg.head.kind == "mask2former" and saved == legacy:
        return legacy
    return segmentation_model_hash(cfg)


def _saved_hash(resume: str | None, out_dir: Path) -> str | None:
    """The model hash of the checkpoint ``resume`` names (None: none, or unreadable: the
    run's own resume checks say why)."""
    from finetune.engine import resume_checkpoint
    from runtime.checkpoint import load_trainer_state

    try:
        ckpt = resume_checkpoint(resume, out_dir, warn=False)  # the run resolves again
        return load_trainer_state(ckpt).get("model_hash") if ckpt is not None else None
    except (CheckpointError, OSError):
        return None


@run_lock.releasing
def train(cfg: SegmentationConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune ``head.kind`` on InternImage; returns the last evaluation (``mIoU``,
    ``IoU.<class>``, ...)."""
    from finetune.init import agreed_init
    from finetune.loop import run_loop

    d = init_distributed(cfg.run.collective_timeout_min)
    sync_bn = d.world_size > 1 and d.device.type == "cuda"  # SyncBatchNorm needs NCCL
    refuse_single_image_batchnorm(cfg, d.world_size if sync_bn else 1)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set = agreed_seg_set(cfg.data, True)
    val_set = agreed_seg_set(cfg.data, False)
    rng.seed_all(cfg.run.seed + d.rank)  # after the data: its first build may draw
    model = build_segmentor(cfg, agreed_init(cfg.init)).to(d.device)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # optimizer steps: run.grad_accum micro-batches of run.batch_size per process each
    batches, steps_per_epoch = train_batches(
        train_set, d, batch_size=cfg.run.batch_size, grad_accum=cfg.run.grad_accum,
        seed=cfg.run.seed, num_workers=cfg.run.num_workers)
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total)
    mask2former = cfg.head.kind == "mask2former"

    def loss_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        # labels outside the classes were refused where each map was read
        # (finetune.seg_data.check_label_range), naming its file
        images, labels = batch
        images, labels = images.to(d.device), labels.to(d.device)
        if mask2former:  # class CE + mask BCE + dice, matched, with the auxiliary layers
            return {"loss_mask2former": net(images, labels)}
        return net(images, labels)  # UperNet: loss_ce (+ weighted loss_aux)

    eval_every = cfg.run.eval_interval(steps_per_epoch)
    # what the checkpoint's tensors depend on: a resume with another model fails early
    # (rank 0 reads the checkpoint's, for every rank)
    model_hash = resume_model_hash(cfg, broadcast_object(
        _saved_hash(resume, out_dir) if d.is_main and resume else None))
    return run_loop(name="segmentation", net=LossForward(model), optimizer=optimizer,
                    scheduler=scheduler, batches=batches, loss_fn=loss_fn,
                    evaluate=lambda: evaluate(model, val_set, cfg, d), total_steps=total,
                    eval_every=eval_every, checkpoint_every=cfg.run.checkpoint_every or
                    eval_every, log_every=cfg.run.log_every, grad_clip=cfg.optim.grad_clip,
                    out_dir=out_dir, d=d, resume=resume, progress=cfg.run.progress,
                    batch_size=cfg.run.batch_size, model_hash=model_hash,
                    zero_stage=cfg.run.zero_stage, precision=cfg.run.precision,
                    tensorboard=cfg.run.tensorboard, grad_accum=cfg.run.grad_accum,
                    zero_persistence_threshold=cfg.run.zero_persistence_threshold,
                    keep_last=cfg.run.keep_last, best_metric=BEST_METRIC if cfg.run.keep_best
                    else None)
