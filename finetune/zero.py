"""Classification fine-tuning through a DeepSpeed ZeRO engine (``run.zero_stage`` 1..3).

Used for InternImage-L/XL/H, whose AdamW states (and for H the weights too) do not fit
beside activations on one GPU under DDP. What stays as under DDP: the layer-wise lr decay
groups and the DCN lr multiplier (our torch AdamW is the client optimizer, each group keeps
its ``lr_scale`` and timm's scheduler, stepped here on that same optimizer, multiplies it
in), gradient clipping (``optim.grad_clip`` -> DeepSpeed's ``gradient_clipping``), the
metrics records and ``--resume auto``.

EMA: kept at every stage as a full fp32 copy on every rank (timm ``ModelEmaV3``, made
before DeepSpeed casts the module to bf16). Under ZeRO-3 each update gathers the
partitioned weights with ``deepspeed.zero.GatheredParameters`` (read-only, all ranks
together), so the EMA is exact; it costs one extra all-gather of the weights per step and
one fp32 model per rank (H: ~4.3 GB), which is why ZeRO-3 runs may set ``ema.enabled=false``.

Checkpoints: pre-training's layout and helpers (``pretrain.checkpoint``):
``OUT/checkpoints/step_XXXXXXX/`` holds DeepSpeed's shards, ``ema.pt`` and, written last,
``trainer_state.json``; ``latest`` names a checkpoint only once it is complete. Such a
directory is what ``internimage convert`` and ``--init`` read (finetune/convert.py).

Evaluation runs the ZeRO-3 module on every rank for the same number of forward passes
(a rank whose validation shard is shorter runs dummy batches), since each forward
all-gathers parameters collectively.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune import runtime
from runtime import rng
from runtime.metrics import MetricsFile

log = logging.getLogger(__name__)
# DeepSpeed calls collectives torch has renamed; one warning per step drowns the output.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

EMA_FILE = "ema.pt"
KEEP_LAST = 2  # complete checkpoints kept (plus whatever ``latest`` names)


def deepspeed_config(cfg) -> dict[str, Any]:
    """DeepSpeed's JSON config for a classification run (``cfg``: ClassificationConfig).

    The optimizer is ours (torch AdamW over lr-decay groups), hence
    ``zero_allow_untested_optimizer``; the schedule is stepped by us, not DeepSpeed.
    """
    run = cfg.run
    zero: dict[str, Any] = {"stage": run.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": torch.cuda.is_available()}
    if run.zero_stage == 3:
        zero |= {"stage3_param_persistence_threshold": run.zero_persistence_threshold,
                 # exact fp32 weights on save come from the optimizer shards
                 # (zero_to_fp32 / internimage convert): no 16-bit gather needed
                 "stage3_gather_16bit_weights_on_model_save": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": run.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": run.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if run.deepspeed_config:
        from pretrain.ds_config import _merge

        path = Path(run.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"run.deepspeed_config: file not found: {path}")
        config = _merge(config, json.loads(path.read_text()))
    return config


def model_hash(cfg) -> str:
    """What the checkpoint's tensors depend on: variant, architecture and class count
    (not drop path, checkpointing or the DCN backend, which a resume may change)."""
    blob = json.dumps([cfg.model.name, cfg.model.arch(), cfg.data.num_classes],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ShardedEma:
    """timm ``ModelEmaV3`` of a (possibly ZeRO-3 partitioned) DeepSpeed module."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        from timm.utils import ModelEmaV3

        # fp32 copy made before DeepSpeed casts/partitions ``model``
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
        self.module = self.ema.module

    def update(self, module: nn.Module, step: int, zero3: bool) -> None:
        """One EMA step from ``module`` (the engine's module); collective under ZeRO-3."""
        if not zero3:
            self.ema.update(module, step=step)
            return
        import deepspeed

        # read-only gather (modifier_rank=None): every rank sees the full weights, then
        # DeepSpeed re-partitions them on exit without writing anything back
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            self.ema.update(module, step=step)


@torch.no_grad()
def evaluate(net: nn.Module, loader, d: runtime.Dist, dtype: torch.dtype,
             img_size: int) -> dict[str, float]:
    """Top-1/top-5 over the rank-split validation set with equal forward passes per rank."""
    net.eval()
    n = torch.tensor([len(loader)], dtype=torch.float64, device=d.device)
    if d.world_size > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    stats = torch.zeros(3, dtype=torch.float64)
    batches = iter(loader)
    for _ in range(int(n.item())):
        batch = next(batches, None)
        if batch is None:  # this rank's shard is done: a dummy pass keeps collectives aligned
            net(torch.zeros(1, 3, img_size, img_size, device=d.device, dtype=dtype))
            continue
        images, labels = batch
        logits = net(images.to(d.device, dtype)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        hit = top == labels[:, None]
        stats += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(labels)],
                              dtype=torch.float64)
    stats = runtime.all_reduce_sum(stats.to(d.device), d).cpu()
    net.train()
    return {"top1": stats[0].item() / max(1, stats[2].item()),
            "top5": stats[1].item() / max(1, stats[2].item())}


def _save(engine, root: Path, step: int, ema: ShardedEma | None, shared: dict[str, Any],
          info) -> Path:
    """EMA (rank 0) and DeepSpeed's shards first; ``trainer_state.json``/``latest`` last."""
    from pretrain.checkpoint import save_checkpoint, tag_for

    if ema is not None and info.is_main:
        runtime.save_checkpoint(root / tag_for(step) / EMA_FILE, ema.module.state_dict())
    # each rank's own random state, gathered into trainer_state.json ("ranks")
    return save_checkpoint(engine, root, step, {"rng": rng.rng_state()}, shared, info,
                           KEEP_LAST)


def check_engine_matches(resume: str | None, out_dir: Path, zero: bool) -> None:
    """Refuse ``--resume auto`` when the run directory holds only the other engine's
    checkpoint: starting afresh would silently overwrite the run."""
    from models import CheckpointError

    if resume != "auto":
        return
    ckpts = out_dir / "checkpoints"
    has_ddp, has_zero = (ckpts / "last.pt").is_file(), (ckpts / "latest").is_file()
    if zero and has_ddp and not has_zero:
        raise CheckpointError(f"{ckpts} holds a DDP checkpoint (last.pt) but run.zero_stage "
                              "> 0 resumes DeepSpeed checkpoints; resume it with run.zero_stage=0")
    if not zero and has_zero and not has_ddp:
        raise CheckpointError(f"{ckpts} holds a DeepSpeed checkpoint ('latest') but "
                              "run.zero_stage=0 resumes DDP checkpoints; resume with the run's "
                              f"run.zero_stage, or start a new run with --init {ckpts}")


def train_zero(cfg, out_dir: Path, resume: str | None = None) -> dict[str, float]:
    """Fine-tune ``cfg`` (ClassificationConfig) through DeepSpeed; last evaluation's metrics."""
    import deepspeed

    from finetune.classification import (
        build_classifier,
        build_loss,
        build_mixup,
        build_optimizer,
        build_scheduler,
    )
    from finetune.cls_data import build_datasets
    from finetune.cls_loop import ClsSteps, run_classification
    from finetune.init import load_init
    from models import CheckpointError
    from pretrain.checkpoint import (
        ResumeError,
        check_compatible,
        load_trainer_state,
        resolve_resume,
    )
    from pretrain.distributed import init_distributed

    info = init_distributed()  # env for a lone process, gloo on CPU / nccl on GPU
    d = runtime.Dist(info.rank, info.world_size, info.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    mhash = model_hash(cfg)
    # everything that can refuse a resume is checked before any compute
    check_engine_matches(resume, out_dir, zero=True)
    try:
        resume_dir = resolve_resume(resume, ckpt_root)
        state = load_trainer_state(resume_dir) if resume_dir is not None else None
        if state is not None:
            check_compatible(state, mhash, d.world_size, resume_dir)
    except ResumeError as err:  # the CLI reports CheckpointError without a traceback
        raise CheckpointError(str(err)) from None
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set, val_set = build_datasets(cfg)
    # same initial weights on every rank: ZeRO-3 partitions each rank's own copy
    rng.seed_all(cfg.run.seed)
    model = build_classifier(cfg)
    if cfg.init:
        load_init(model, cfg.init, variant=cfg.model.name, arch=cfg.model.arch())
    model.to(d.device)
    rng.seed_all(cfg.run.seed + d.rank)
    steps_per_epoch = len(train_set) // (cfg.run.batch_size * d.world_size)
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    ema = ShardedEma(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
    if cfg.run.precision == "bf16":
        # DeepSpeed's bf16 mode casts the parameters only (under ZeRO-3); floating buffers
        # (BatchNorm running stats of the stem) must match the bf16 activations too
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    optimizer = build_optimizer(model, cfg)
    ds_config = deepspeed_config(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    # timm's schedule drives the client optimizer's groups: ZeRO steps that same object
    # (its groups' params swapped for flat fp32 partitions), so per-group lr_scale holds
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    zero3 = cfg.run.zero_stage == 3
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32
    mixup = build_mixup(cfg)
    criterion = build_loss(cfg, mixup)
    step = 0
    if resume_dir is not None:
        path, _ = engine.load_checkpoint(str(resume_dir.parent), tag=resume_dir.name)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load {resume_dir}")
        step = int(state["step"])
        if ema is not None and (resume_dir / EMA_FILE).is_file():
            ema.module.load_state_dict(runtime.load_checkpoint(resume_dir / EMA_FILE))
        log.info("resumed from %s at step %d", resume_dir, step)
    scheduler.step_update(step)
    if d.is_main:
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    shared = {"world_size": d.world_size, "model_hash": mhash,
              "zero_stage": cfg.run.zero_stage}
    engine.train()

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = criterion(engine(images.to(dtype)).float(), labels)
        engine.backward(loss)
        engine.step()  # clips (gradient_clipping) and zeroes the gradients
        return loss

    def after_step(step: int) -> None:
        if ema is not None:
            ema.update(engine.module, step, zero3)

    def evaluate_all(val_loader) -> dict:
        result = evaluate(engine, val_loader, d, dtype, cfg.data.img_size)
        if ema is not None:  # a full fp32 copy on every rank: no ZeRO collectives
            e = evaluate(ema.module, val_loader, d, torch.float32, cfg.data.img_size)
            result.update(top1_ema=e["top1"], top5_ema=e["top5"])
        return result

    def save(step: int) -> None:  # every rank writes its shard
        _save(engine, ckpt_root, step, ema, shared | {"step": step}, info)

    steps = ClsSteps(train=train_step, after_step=after_step, evaluate=evaluate_all, save=save)
    # lines past the step this run starts from go (a dead run's; a fresh start: all)
    metrics = MetricsFile(out_dir, d.is_main, resume_step=step, timestamp=True)
    if state is not None:  # last: nothing between here and the first batch draws
        rng.restore_rank_rng([r["rng"] for r in state["ranks"]], d.rank, d.world_size)
    return run_classification(
        cfg, d, train_set, val_set, steps, optimizer=optimizer, scheduler=scheduler,
        mixup=mixup, start_step=step, steps_per_epoch=steps_per_epoch, total=total,
        metrics=metrics, desc=f"classification ZeRO-{cfg.run.zero_stage}")

