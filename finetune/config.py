"""Typed configuration shared by the three fine-tuning entrypoints.

Each task has its own top-level dataclass (``ClassificationConfig`` ...) built from the
sections here plus its data/augmentation section. Validation runs in ``__post_init__`` and
names the dotted key, so a bad config fails before any compute. Defaults are the CPU
demo's; presets in configs/finetune/ hold the paper's recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

# one validation helper for every config, and the one check of model.dcn_backend
from data.config import check, check_adamw, check_collective_timeout, check_dcn_backend

__all__ = ["check", "check_dcn_backend"]


@dataclass
class BackboneConfig:
    """An InternImage variant plus architecture overrides (must match ``--init``)."""

    name: str = "internimage_t"
    channels: int | None = 16
    depths: list[int] | None = field(default_factory=lambda: [1, 1, 2, 1])
    groups: list[int] | None = field(default_factory=lambda: [1, 2, 4, 8])
    # Per-block learned gammas (gamma1/gamma2) initialised to this value; None: the
    # variant's own (S/B/L/XL 1e-5, T and H none). The released InternImage-T detection
    # and segmentation configs set 1.0, so their checkpoints hold gammas T's own lacks.
    layer_scale: float | None = None
    drop_path_rate: float = 0.1
    with_cp: bool = False
    dcn_backend: str = "auto"

    def __post_init__(self) -> None:
        from models import resolve_variant

        try:
            self.name = resolve_variant(self.name)
        except ValueError as err:
            raise ValueError(f"model.name: {err}") from None
        check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
        check(self.layer_scale is None or 0 < self.layer_scale < float("inf"),
              "model.layer_scale", f"must be > 0 and finite (or null: the variant's), got "
              f"{self.layer_scale}")
        check_dcn_backend(self.dcn_backend)
        if self.depths is not None and self.groups is not None:
            check(len(self.depths) == len(self.groups), "model.depths",
                  f"{len(self.depths)} stages but model.groups has {len(self.groups)}")

    def arch(self) -> dict:
        """Architecture overrides (what a checkpoint's metadata must agree with)."""
        return {k: getattr(self, k) for k in ("channels", "depths", "groups", "layer_scale")
                if getattr(self, k) is not None}

    def build_kwargs(self) -> dict:
        """Keyword overrides for ``models.build_model``."""
        return {**self.arch(), "drop_path_rate": self.drop_path_rate, "with_cp": self.with_cp,
                "dcn_backend": self.dcn_backend}


@dataclass
class OptimConfig:
    """AdamW + warm-up + schedule; layer-wise lr decay and the DCN offset multiplier."""

    lr: float = 2e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    layer_decay: float = 1.0  # 1.0: off; 0.9 / 0.8 in the recipes
    dcn_lr_mult: float = 0.1  # lr multiplier of the DCN offset layers (param_groups.py)
    backbone_lr_mult: float = 1.0  # dense tasks: backbone lr relative to neck/head
    grad_clip: float = 5.0  # 0: off
    # Linear lr scaling, as the released classification code (OpenGVLab/InternImage
    # classification/main.py): set, optim.lr and optim.min_lr (and the warm-up start,
    # lr x 1e-3) are per lr_batch images, and a run trains at them x total batch /
    # lr_batch, the total batch being run.batch_size x run.grad_accum x processes
    # (:meth:`scaled`). None: absolute values, whatever the batch.
    lr_batch: int | None = None
    # whether the task's released recipe scales the lr with the batch (classification's
    # does; mmdet/mmseg's configs give an absolute lr): ``lr_batch`` is refused otherwise
    batch_scaled_lr: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_adamw(self.lr, self.betas)  # finite lr > 0, betas in [0, 1)
        check(self.lr_batch is None or self.batch_scaled_lr, "optim.lr_batch",
              "is for classification only: the released detection/segmentation configs "
              "give an absolute lr (no auto_scale_lr); set optim.lr for this run's total "
              "batch instead")
        check(self.lr_batch is None or self.lr_batch >= 1, "optim.lr_batch",
              f"must be >= 1 (images the lr is given for; null: an absolute lr), got "
              f"{self.lr_batch}")
        check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        check(0 < self.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]")
        check(self.dcn_lr_mult > 0, "optim.dcn_lr_mult", "must be > 0")
        check(self.backbone_lr_mult > 0, "optim.backbone_lr_mult", "must be > 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "optim.grad_clip",
              f"must be >= 0 (max gradient norm; 0: off), got {self.grad_clip}")

    def lr_factor(self, total_batch: int) -> float:
        """What ``lr`` and ``min_lr`` are multiplied by at ``total_batch`` images per
        optimizer step: ``total_batch / lr_batch``, or 1 with an absolute lr."""
        return 1.0 if self.lr_batch is None else total_batch / self.lr_batch

    def scaled(self, total_batch: int):
        """This section as a run of ``total_batch`` images per optimizer step trains:
        ``lr`` and ``min_lr`` times :meth:`lr_factor` (the warm-up start, ``lr`` x 1e-3,
        follows), ``lr_batch`` cleared, so scaling again changes nothing."""
        f = self.lr_factor(total_batch)
        return replace(self, lr=self.lr * f, min_lr=self.min_lr * f, lr_batch=None)


@dataclass
class RunConfig:
    """Length, batch, evaluation, checkpoints and the execution engine."""

    output_dir: str = "runs/finetune"
    batch_size: int = 64  # per process
    # Gradient accumulation: one optimizer step = grad_accum micro-batches of batch_size
    # per process (effective batch = batch_size x grad_accum x processes). Steps, schedule,
    # evaluation/checkpoint cadence and resume count optimizer steps; an epoch holds
    # floor(batches / grad_accum) steps and a trailing partial group of micro-batches is
    # dropped (never loaded), as drop_last drops a short batch.
    grad_accum: int = 1
    max_steps: int = 0  # 0: derived from epochs
    epochs: float = 1.0
    eval_every: int = 0  # steps; 0: at every epoch end
    checkpoint_every: int = 0  # steps; 0: at every evaluation
    # Checkpoints kept: the newest keep_last, and with keep_best the one whose evaluation
    # scored best so far (top1 / bbox_AP / mIoU; with an EMA also top1_ema's), saved when
    # it improves (runtime/best.py)
    keep_last: int = 2
    keep_best: bool = True
    log_every: int = 10
    seed: int = 0
    num_workers: int = 1
    threads: int = 0  # torch intra-op threads; 0: torch's default
    progress: bool = True
    tensorboard: bool = True  # events under <output_dir>/tensorboard (rank 0)
    # DeepSpeed ZeRO stage 0..3 for every task (0: plain data parallelism). Under ZeRO-3
    # every evaluation runs its forward passes in lock-step across ranks
    # (runtime/lockstep.py), whatever each rank's share of the validation set holds.
    zero_stage: int = 0
    # ZeRO-3: parameters smaller than this stay whole on every rank (DeepSpeed's default)
    zero_persistence_threshold: int = 100_000
    precision: str = "fp32"
    # Minutes one collective may wait for the other ranks before the job fails (a rank
    # that hangs rather than dies: a stalled file read, a GPU in a bad state, a stopped
    # process). None: DeepSpeed's default, DEEPSPEED_TIMEOUT minutes else 10. Longer than
    # any wait a healthy rank imposes (rank 0 writing a checkpoint or evaluating while the
    # others wait). Fixed when the process group is created (runtime/dist.py).
    collective_timeout_min: float | None = None

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "run.batch_size", "must be >= 1")
        check(self.grad_accum >= 1, "run.grad_accum",
              f"must be >= 1 (micro-batches per optimizer step), got {self.grad_accum}")
        check(self.max_steps >= 0, "run.max_steps", "must be >= 0")
        # an infinite count was planned as "inf epochs" and failed at the start's int() of
        # the step count (OverflowError); NaN or a negative one passed with max_steps set
        check(math.isfinite(self.epochs) and self.epochs >= 0, "run.epochs",
              f"must be a finite number >= 0, got {self.epochs}")
        check(self.max_steps > 0 or self.epochs > 0, "run.epochs", "must be > 0 (or set "
              "run.max_steps)")
        check(self.zero_stage in (0, 1, 2, 3), "run.zero_stage", "must be 0..3")
        check(self.zero_persistence_threshold >= 0, "run.zero_persistence_threshold",
              "must be >= 0")
        check(self.precision in ("fp32", "bf16"), "run.precision", "must be fp32 or bf16")
        check(self.log_every >= 1, "run.log_every", "must be >= 1")
        # negative intervals would silently mean "last step only" (runtime/loop.py _due)
        check(self.eval_every >= 0, "run.eval_every",
              f"must be >= 0 (optimizer steps; 0: every epoch), got {self.eval_every}")
        check(self.checkpoint_every >= 0, "run.checkpoint_every",
              f"must be >= 0 (optimizer steps; 0: at every evaluation), got "
              f"{self.checkpoint_every}")
        check(self.keep_last >= 1, "run.keep_last",
              f"must be >= 1 (the newest checkpoints kept), got {self.keep_last}")
        check(self.num_workers >= 0, "run.num_workers",
              f"must be >= 0 (0: load in the training process), got {self.num_workers}")
        check(self.threads >= 0, "run.threads",
              f"must be >= 0 (0: torch's default), got {self.threads}")
        check_collective_timeout(self.collective_timeout_min)

    def eval_interval(self, steps_per_epoch: int) -> int:
        """Optimizer steps between evaluations, for every task: ``eval_every``, or one epoch
        with 0 (the released classification, detection and epoch-based configs evaluate
        every epoch; checkpoints follow unless ``checkpoint_every`` says otherwise)."""
        return self.eval_every or steps_per_epoch

    def total_batch(self, world_size: int) -> int:
        """Images per optimizer step over ``world_size`` processes (what a scaled lr,
        ``optim.lr_batch``, is scaled to)."""
        return self.batch_size * self.grad_accum * world_size

    def batch_desc(self) -> str:
        """The dry-run plan's batch line: per process, and per optimizer step if accumulated
        (the effective batch is this x the number of processes)."""
        if self.grad_accum == 1:
            return f"{self.batch_size} per process"
        return (f"{self.batch_size} per process x {self.grad_accum} accumulated = "
                f"{self.batch_size * self.grad_accum} per process per optimizer step")
