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
from pathlib import Path

import torch
from torch import nn

from finetune.dense_data import train_batches
from finetune.det_config import (  # noqa: F401  (the public import path)
    DetBackboneConfig,
    DetDataConfig,
    DetectionConfig,
    DetectorConfig,
    DetHeadConfig,
    DetOptimConfig,
    DetRunConfig,
    ScheduleConfig,
)
from finetune.det_data import (  # noqa: F401  (the public import path)
    CocoInstances,
    build_datasets,
    collate,
)
from finetune.det_eval import (  # noqa: F401  (the public import path)
    evaluate,
)
from finetune.det_model import (  # noqa: F401  (the public import path)
    InternImageFPN,
    build_detector,
    build_model,
)
from finetune.plan import count_params, print_plan
from runtime import rng, run_lock, schedules
from runtime.dist import decided_on_rank0, init_distributed
from runtime.param_groups import adamw, param_groups

log = logging.getLogger(__name__)

# the metric whose best checkpoint is kept (runtime/best.py): the released detection
# configs' ``evaluation = dict(save_best='auto')`` (e.g. coco/mask_rcnn_internimage_t_fpn_1x_
# coco.py), which mmdet resolves to the first metric, the box mAP
BEST_METRIC = "bbox_AP"


def optimizer_and_schedule(model: nn.Module, cfg: DetectionConfig, total: int):
    """AdamW over the recipe's parameter groups and its schedule for ``total`` steps."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, depths=cfg.model.depths or _variant_depths(cfg),
                          backbone_prefix=getattr(model, "backbone_prefix", "backbone.body."),
                          layer_decay=o.layer_decay, dcn_lr_mult=o.dcn_lr_mult,
                          backbone_lr_mult=o.backbone_lr_mult,
                          head_offset_lr_mult=o.head_offset_lr_mult,
                          layer0_patterns=tuple(o.layer0_params))
    if o.decay_all:  # mmcv's DefaultOptimizerConstructor: norms and biases decay too
        for g in groups:
            g["weight_decay"] = o.weight_decay
    opt = adamw(groups, o.lr, o.betas)
    if cfg.schedule.kind == "step":
        # the released 1x/3x milestones: epochs 8/11 of 12, 27/33 of 36, counted from step 0
        milestones = [int(m * total) for m in cfg.schedule.milestones]
        sched = schedules.multistep(opt, lr=o.lr, milestones=milestones,
                                    gamma=cfg.schedule.gamma, warmup_steps=o.warmup_steps)
    else:
        sched = schedules.cosine(opt, lr=o.lr, min_lr=o.min_lr, total_steps=total,
                                 warmup_steps=o.warmup_steps, warmup_prefix=True)
    return opt, sched


def _variant_depths(cfg) -> tuple[int, ...]:
    from models import VARIANTS

    return VARIANTS[cfg.model.name].depths


def check_start(cfg: DetectionConfig, thorough: bool = True, with_data: bool = True) -> None:
    """:func:`finetune.init.start_checks` with this task's data paths (``with_data=False``:
    the init alone, as a dry run checks it)."""
    from finetune.det_data import check_data
    from finetune.init import start_checks

    start_checks(cfg, check_data if with_data else None, thorough=thorough)


def dry_run(cfg: DetectionConfig, gpus: int | None = None) -> int:
    """Build on the meta device and print the plan, with the total batch on ``gpus``
    processes (None: ``WORLD_SIZE`` if set, else a few GPU counts; the released mmdet
    configs give their lr for one total batch, samples_per_gpu x GPUs). First, as a
    start: an ``init`` recording another backbone raises ``CheckpointError`` (its
    metadata alone; the data paths are not checked, a plan is often made where the data
    is not)."""
    from finetune.plan import per_gpu_count, plan_gpu_counts

    check_start(cfg, with_data=False)
    counts = plan_gpu_counts(gpus)
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
    print_plan("detection (dry run)", {
        "model": f"{desc} on {cfg.model.name} {cfg.model.arch() or ''}",
        "parameters (80 classes)": f"{count_params(model):,}",
        "data": cfg.data.kind + (f" {cfg.data.root}" if cfg.data.root else ""),
        "train sizes / test / max": sizes,
        "train augmentation": _augmentation_desc(cfg),
        "batch": cfg.run.batch_desc(),
        "total batch": per_gpu_count({n: cfg.run.total_batch(n) for n in counts}),
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


def _augmentation_desc(cfg: DetectionConfig) -> str:
    """The dataset's training augmentation, as the dry run prints it."""
    c = cfg.data.crop_aug
    crop = (f", crop p={c.prob} to {c.resize_sizes} (<= {c.max_size}), "
            f"{c.crop_size[0]}..{c.crop_size[1]} px" if c.prob else ", no crop branch")
    return f"hflip p={cfg.data.hflip}{crop}"


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
                          training_probe=cfg.head.kind != "dino",
                          zero_stage=cfg.run.zero_stage)
    return describe(est, batch, size, cfg.model.with_cp, cfg.run.zero_stage, scope=scope)


def detection_model_hash(cfg: DetectionConfig, num_classes: int, *,
                         dino_layout: bool = True) -> str:
    """The hash a detection run's checkpoints carry (``trainer_state.json`` ``model_hash``):
    what their tensors depend on. DINO's adds its parameter-shaping head settings and the
    head's layout (finetune/heads/dino.py ``SHAPE_KEYS`` / ``HEAD_LAYOUT``); Mask R-CNN's is
    unchanged since its first checkpoints. ``dino_layout=False``: the hash DINO runs had
    before the per-layer class/box branches (no head part), to recognise their checkpoints."""
    from finetune.engine import fingerprint

    parts: list = ["detection", cfg.model.name, cfg.model.arch(), cfg.head.kind, num_classes]
    if cfg.head.kind == "dino" and dino_layout:
        from finetune.heads.dino import HEAD_LAYOUT, SHAPE_KEYS

        parts.append({"layout": HEAD_LAYOUT,
                      **{k: getattr(cfg.head, k) for k in SHAPE_KEYS}})
    return fingerprint(*parts)


def refuse_shared_head_checkpoint(cfg: DetectionConfig, num_classes: int,
                                  resume: str | None, out_dir: Path) -> None:
    """Refuse, naming the cause, a resume of a DINO checkpoint written before the class/box
    branches became per decoder layer (the released layout): its weights cannot fill the
    new head. Without this the run would be refused as "saved for a different model ...
    resume with the run's own config.yaml", which the user was already doing."""
    from finetune.engine import resume_checkpoint
    from runtime.checkpoint import ResumeError, load_trainer_state

    ckpt = resume_checkpoint(resume, out_dir, warn=False)  # the training run resolves again
    if ckpt is None:
        return
    saved = load_trainer_state(ckpt).get("model_hash")
    if saved == detection_model_hash(cfg, num_classes, dino_layout=False):
        raise ResumeError(
            f"{ckpt} was written by an earlier DINO head with one class/box head shared by "
            "all decoder layers; DINO now has one class and one box branch per decoder layer "
            "plus the encoder's, as the released InternImage DINO, so that checkpoint cannot "
            "be resumed: finish that run with the version that wrote it, or start a new run "
            "in another directory (--init from the same backbone checkpoint still works)")


@run_lock.releasing
def train(cfg: DetectionConfig, out_dir: Path, resume: str | None = None) -> dict:
    """Fine-tune ``head.kind``; returns the last evaluation (bbox_AP, bbox_AP50, ...)."""
    from finetune.init import agreed_init
    from finetune.loop import run_loop
    from models import CheckpointError

    d = init_distributed(cfg.run.collective_timeout_min)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set, val_set = build_datasets(cfg)
    rng.seed_all(cfg.run.seed + d.rank)  # after the data: its first build may draw
    num_classes = len(train_set.cat_ids)
    # what the checkpoint's tensors depend on: a resume with another model fails early
    model_hash = detection_model_hash(cfg, num_classes)
    if cfg.head.kind == "dino":  # before the model is built: a refusal costs nothing
        # rank 0 looks, every rank refuses with it (a rank refusing alone would leave the
        # others in the init's collective read)
        decided_on_rank0(lambda: refuse_shared_head_checkpoint(cfg, num_classes, resume,
                                                               out_dir),
                         CheckpointError, f"rank 0 of {d.world_size} refused the start")
    # Mask R-CNN adds its background class itself; DINO predicts the C classes (focal loss).
    model = build_model(cfg, num_classes, agreed_init(cfg.init)).to(d.device)
    # optimizer steps: run.grad_accum micro-batches of run.batch_size per process each
    batches, steps_per_epoch = train_batches(
        train_set, d, batch_size=cfg.run.batch_size, grad_accum=cfg.run.grad_accum,
        seed=cfg.run.seed, num_workers=cfg.run.num_workers, collate_fn=collate)
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total)

    def loss_fn(net: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [i.to(d.device) for i in images]
        targets = [{k: v.to(d.device) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        return net(images, targets)

    # 0: every epoch, as the released detection configs evaluate (OpenGVLab/InternImage
    # detection/configs/_base_/datasets/coco_detection.py ``evaluation = dict(interval=1)``,
    # kept by the DINO 1x files; coco_instance.py's has no interval: mmcv EvalHook's 1)
    eval_every = cfg.run.eval_interval(steps_per_epoch)
    return run_loop(name="detection", net=model, optimizer=optimizer,
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
