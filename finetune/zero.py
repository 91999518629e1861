"""Classification fine-tuning through a DeepSpeed engine (``run.zero_stage`` 0..3; 0, the
default, is plain data parallelism).

ZeRO is for InternImage-L/XL/H, whose AdamW states (and for H the weights too) do not fit
beside activations on one GPU without it. At every stage: the layer-wise lr decay
groups and the DCN lr multiplier (our torch AdamW is the client optimizer, each group keeps
its ``lr_scale`` and timm's scheduler, stepped here on that same optimizer, multiplies it
in), gradient clipping (``optim.grad_clip`` -> DeepSpeed's ``gradient_clipping``), the
metrics records and ``--resume auto``.

EMA: each rank averages its own part of DeepSpeed's fp32 masters (finetune/ema.py: timm
``ModelEmaV3``'s rule, no communication per step; 1/world of the model per rank under
ZeRO), assembled by one all-reduce for an evaluation and for ``ema.pt``. Before, a full
fp32 copy on every rank averaged the module's weights: a bf16 run's rounded copies, and
under ZeRO-3 a whole-model all-gather at every step.

Checkpoints: the one format (``runtime.checkpoint``, as pre-training):
``OUT/checkpoints/step_XXXXXXX/`` holds DeepSpeed's shards, ``ema.pt``, each rank's random
state and, for a streamed training set, its stream position (in that rank's
``rank_states/NNNNN.json``) and, written last, ``trainer_state.json`` (the shared state,
with a map-style training set's count of replaced unreadable images, ``skipped``, which a
resume's training records go on from: finetune/skip_counts.py);
``latest`` names a checkpoint only once it is complete. Such a directory is what
``internimage convert`` and ``--init`` read (finetune/convert.py).

Evaluation runs the ZeRO-3 module on every rank for the same number of forward passes
(runtime/lockstep.py: a rank whose validation shard is shorter runs dummy batches), since
each forward all-gathers parameters collectively.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.cls_stream import StreamingShards
from finetune.ema import PartitionedEma, meta_copy
from finetune.engine import (
    FinetuneRun,
    batch_state,
    fingerprint,
    open_metrics,
    open_run,
    start_engine,
)
from models.checkpoint import CheckpointError
from runtime import rng
from runtime.checkpoint import (
    BEST,
    BEST_EMA,
    EMA_FILE,
    ResumeError,
    agree_on_refusal,
    discard_config,
    engine_layout,
    publish_config,
)
from runtime.dist import (
    DistInfo,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
)
from runtime.ds_config import DeepSpeedSpec
from runtime.ds_config import deepspeed_config as build_deepspeed_config
from runtime.lockstep import lockstep
from runtime.loop import owes_evaluation, refuse_empty_epoch

# the metric whose best checkpoint is kept (runtime/best.py): top-1, as the released
# classification/main.py keeps ``ckpt_epoch_best.pth`` when acc1 beats its max_accuracy,
# and with an EMA the EMA's top-1 too (``ckpt_epoch_ema_best.pth`` when the EMA's acc1
# beats its max_ema_accuracy)
BEST_METRIC = "top1"

log = logging.getLogger(__name__)
# DeepSpeed calls collectives torch has renamed; one warning per step drowns the output.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

DATA_KEY = "data"  # a rank's streamed-set position in its checkpoint rank-state file


def best_pointers(cfg) -> dict[str, str]:
    """The best checkpoints a classification run (``cfg``: ClassificationConfig) keeps:
    pointer file -> metric (none without ``run.keep_best``)."""
    if not cfg.run.keep_best:
        return {}
    return {BEST: BEST_METRIC} | ({BEST_EMA: f"{BEST_METRIC}_ema"} if cfg.ema.enabled else {})


def deepspeed_spec(cfg) -> DeepSpeedSpec:
    """The DeepSpeed settings of a classification run (``cfg``: ClassificationConfig); the
    schedule is stepped by us."""
    run = cfg.run
    return DeepSpeedSpec(
        micro_batch=run.batch_size, zero_stage=run.zero_stage, precision=run.precision,
        grad_accum=run.grad_accum, grad_clip=cfg.optim.grad_clip,
        overlap_comm=torch.cuda.is_available(),
        param_persistence_threshold=run.zero_persistence_threshold,
        extra_json=run.deepspeed_config or None, extra_json_key="run.deepspeed_config")


def deepspeed_config(cfg) -> dict[str, Any]:
    """DeepSpeed's JSON config for a classification run (``cfg``: ClassificationConfig),
    from the one builder (runtime/ds_config.py)."""
    return build_deepspeed_config(deepspeed_spec(cfg))


def model_hash(cfg) -> str:
    """What the checkpoint's tensors depend on: variant, architecture and class count
    (not drop path, checkpointing or the DCN backend, which a resume may change)."""
    return fingerprint(cfg.model.name, cfg.model.arch(), cfg.data.num_classes)


@torch.no_grad()
def evaluate(net: nn.Module, loader, d: DistInfo, dtype: torch.dtype,
             img_size: int) -> dict[str, float]:
    """Top-1/top-5 and the mean cross-entropy (``val_loss``) over the rank-split
    validation set, the forward passes in lock-step across ranks (runtime/lockstep.py: a
    shorter shard's rank runs dummy passes)."""
    net.eval()
    # top-1 hits, top-5 hits, images, summed cross-entropy, unreadable images
    stats = torch.zeros(5, dtype=torch.float64)

    def dummy_args() -> tuple[torch.Tensor]:
        return (torch.zeros(1, 3, img_size, img_size, device=d.device, dtype=dtype),)

    with lockstep(net, dummy_args, d.device) as forward:
        for batch in loader:
            if batch is None:  # nothing readable in it (finetune/cls_data.py)
                continue
            images, labels = batch
            logits = forward(images.to(d.device, dtype)).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            hit = top == labels[:, None]
            ce = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
            stats += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                                   len(labels), ce.item(), 0.0], dtype=torch.float64)
    stats[4] = len(loader.sampler) - stats[2]  # the share's images not evaluated
    stats = all_reduce_sum(stats.to(d.device), d).cpu()
    net.train()
    if stats[4] > 0 and d.is_main:
        log.warning("evaluation: %d validation images unreadable, left out of the metrics",
                    int(stats[4]))
    n = max(1, stats[2].item())
    return {"top1": stats[0].item() / n, "top5": stats[1].item() / n,
            "val_loss": stats[3].item() / n}


def evaluate_with_ema(net: nn.Module, ema_net: nn.Module | None, loader, d: DistInfo,
                      dtype: torch.dtype, img_size: int) -> dict[str, float]:
    """What a classification run logs at an evaluation (and ``--eval-only`` prints):
    :func:`evaluate` of ``net`` in ``dtype`` and, when given, of the EMA weights
    ``ema_net`` in fp32, their metrics suffixed ``_ema``."""
    result = evaluate(net, loader, d, dtype, img_size)
    if ema_net is not None:  # a full fp32 copy on every rank: no ZeRO collectives
        e = evaluate(ema_net, loader, d, torch.float32, img_size)
        result.update({f"{k}_ema": v for k, v in e.items()})
    return result


def _save(engine, run: FinetuneRun, step: int, ema: PartitionedEma | None,
          shared: dict[str, Any], info: DistInfo, train_set) -> Path:
    """DeepSpeed's shards and the EMA (assembled on every rank, written by rank 0) first;
    ``trainer_state.json``/``latest`` last (the EMA goes into the checkpoint's staging
    folder, runtime/checkpoint.py), with each rank's position in a streamed training
    set."""
    whole = ema.state_dict() if ema is not None else None  # (collective)
    side = {EMA_FILE: whole} if whole is not None and info.is_main else None
    del whole  # the other ranks' copies go before DeepSpeed's save (H: 4 GiB each)
    local = {DATA_KEY: train_set.state_dict()} if isinstance(train_set, StreamingShards) else None
    return run.save(engine, step, shared, info, side_files=side, local=local)


def resumed_ema_state(resume_dir: Path, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The EMA weights saved in checkpoint ``resume_dir`` (None: saved without the EMA),
    looked for and read by rank 0 for every rank (collective: every rank calls it). Each
    rank looking for itself, a rank whose view of shared storage differed took the other
    branch, whose ``set_to`` is a collective under ZeRO-3 (a hang); and each read the
    whole file (H: 4.3 GB each, 2.2 TB at 512 ranks)."""
    from finetune.init import read_once
    from runtime.checkpoint import load_torch_file

    path = resume_dir / EMA_FILE
    if not broadcast_object(path.is_file() if is_main else None):
        return None
    return read_once(lambda p: (load_torch_file(p), None), path)[0]


def _restore_stream(train_set, run: FinetuneRun, steps_per_epoch: int, d: DistInfo) -> None:
    """A resumed streamed set goes on after the batches its checkpoint had trained; a
    position it cannot continue (a changed shard list, another seed) is refused as a
    ``ResumeError``, before the model is built.

    On the same world size and worker count this rank's own file alone is read (at 512
    ranks every rank reading every rank's ~30 KB file was 15 MB per rank, 7.8 GB across
    the job, for an entry it then threw away); otherwise every old rank's position, which
    the re-deal needs (data/redeal.py)."""
    if not isinstance(train_set, StreamingShards) or run.state is None:
        return
    try:
        own = run.own_entry(DATA_KEY, d)
        if own is not None and own.get("workers") == train_set.loader.workers:
            states: dict[str, Any] | list[Any] = own
        else:
            states = run.rank_states(DATA_KEY)
        train_set.load_state_dict(states, epoch=run.start_step // max(1, steps_per_epoch))
    except ValueError as err:
        raise ResumeError(f"{run.resume_dir}: {err}") from None
    except (KeyError, TypeError, AttributeError) as err:  # a position not as a save writes
        raise ResumeError(f"{run.resume_dir}: rank {d.rank}'s saved stream position is not "
                          f"as a save writes it ({type(err).__name__}: {err})") from None


def train_zero(cfg, out_dir: Path, resume: str | None = None) -> dict[str, float]:
    """Fine-tune ``cfg`` (ClassificationConfig) through DeepSpeed (ZeRO stage
    ``run.zero_stage``, 0..3); the last evaluation's metrics."""
    from finetune.cls_build import (
        build_classifier,
        build_loss,
        build_mixup,
        build_optimizer,
        build_scheduler,
        lr_desc,
    )
    from finetune.cls_data import build_datasets
    from finetune.cls_loop import ClsSteps, run_classification
    from finetune.init import agreed_init

    d = init_distributed(cfg.run.collective_timeout_min)  # env for a lone process, gloo/nccl
    mhash = model_hash(cfg)
    # may refuse: before any compute; config.yaml once the stream position is checked and
    # the init weights are loaded too (a refused start leaves no config.yaml)
    engine_state = engine_layout(cfg.run.zero_stage, cfg.run.precision)
    batch = batch_state(cfg.run.batch_size, cfg.run.grad_accum)
    run = open_run(resume, out_dir, mhash, d.world_size, engine_state, publish=False,
                   batch=batch, rank=d.rank, task="classification",
                   keep_last=cfg.run.keep_last)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    train_set, val_set = build_datasets(cfg, resumed=run.resume_dir is not None)
    # optimizer steps: run.grad_accum micro-batches of run.batch_size per process each
    steps_per_epoch = len(train_set) // (cfg.run.batch_size * cfg.run.grad_accum
                                         * d.world_size)
    refuse_empty_epoch("classification", steps_per_epoch, len(train_set) // d.world_size)
    # each rank continues its own stream position: one rank's refusal is every rank's
    refusal: CheckpointError | None = None
    try:
        _restore_stream(train_set, run, steps_per_epoch, d)
    except CheckpointError as err:
        refusal = err
    agree_on_refusal(refusal)
    total = cfg.run.max_steps or max(1, math.ceil(cfg.run.epochs * steps_per_epoch))
    done = run.completed(total, d)
    if done is not None:  # nothing to train: the run's own config.yaml stays
        discard_config(out_dir)
        return done
    # same initial weights on every rank: ZeRO-3 partitions each rank's own copy
    rng.seed_all(cfg.run.seed)
    # --init: rank 0's (each rank's start dropped it alone); may refuse (another variant,
    # other shapes): nothing published yet
    model = build_classifier(cfg, init=agreed_init(cfg.init))
    # may refuse (a pointer rank 0 cannot read): before the config and the metrics
    best = run.bests(best_pointers(cfg), run.start_step, d.is_main)
    publish_config(out_dir)
    model.to(d.device)
    rng.seed_all(cfg.run.seed + d.rank)
    # the EMA's model structure (finetune/ema.py), taken before DeepSpeed partitions it
    ema_skeleton = meta_copy(model) if cfg.ema.enabled else None
    if cfg.run.precision == "bf16":
        # DeepSpeed's bf16 mode casts the parameters only (under ZeRO-3); floating buffers
        # (BatchNorm running stats of the stem) must match the bf16 activations too
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.bfloat16)
    # the lr of this world size (optim.lr_batch: scaled to the total batch, as released)
    if d.is_main:
        log.info("classification: %s", lr_desc(cfg, d.world_size))
    optimizer = build_optimizer(model, cfg, world_size=d.world_size)
    # a resume: the checkpoint's moments, this config's group settings (start_engine)
    engine, _ = start_engine(model, optimizer, deepspeed_spec(cfg), run, d)
    # timm's schedule drives the client optimizer's groups: ZeRO steps that same object
    # (its groups' params swapped for flat fp32 partitions), so per-group lr_scale holds
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch,
                                world_size=d.world_size)
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32
    mixup = build_mixup(cfg)
    criterion = build_loss(cfg, mixup)
    step = run.start_step
    # after the engine (and a resume's load): it averages the engine's fp32 masters
    ema = (PartitionedEma(engine, ema_skeleton, cfg.ema.decay, cfg.ema.warmup)
           if ema_skeleton is not None else None)
    if ema is not None and run.resume_dir is not None:
        saved = resumed_ema_state(run.resume_dir, d.is_main)
        if saved is not None:
            ema.load_state_dict(saved)
        elif d.is_main:
            # saved with ema.enabled=false: the EMA starts from the resumed weights (as the
            # released main.py builds its ModelEma after loading the checkpoint): it was
            # built from the engine's masters after the load
            log.warning("%s holds no %s (saved without ema): the EMA starts from the "
                        "resumed weights", run.resume_dir, EMA_FILE)
    scheduler.step_update(step)
    shared = {"task": "classification", "world_size": d.world_size, "model_hash": mhash,
              "engine": engine_state, "batch": batch}
    engine.train()

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = criterion(engine(images.to(dtype)).float(), labels)
        engine.backward(loss)  # scaled by 1/run.grad_accum by DeepSpeed
        # at the accumulation boundary only: clips (gradient_clipping), steps the optimizer
        # and zeroes the gradients
        engine.step()
        # the forward updated this rank's own BatchNorm statistics: rank 0's on every rank
        # from here on (the next forward, the EMA, an evaluation, a checkpoint). Not
        # before the backward: BatchNorm's saves them for it and refuses in-place changes
        broadcast_buffers(engine.module, d)
        return loss

    def after_step(step: int) -> None:
        if ema is not None:
            ema.update(step)

    def evaluate_all(val_loader) -> dict:
        if ema is None:
            return evaluate_with_ema(engine, None, val_loader, d, dtype, cfg.data.img_size)
        with ema.module() as ema_net:  # assembled for the evaluation (collective)
            return evaluate_with_ema(engine, ema_net, val_loader, d, dtype, cfg.data.img_size)

    def save(step: int, state: dict[str, Any]) -> None:  # every rank writes its shard
        _save(engine, run, step, ema, shared | state, d, train_set)

    steps = ClsSteps(train=train_step, after_step=after_step, evaluate=evaluate_all, save=save)
    desc = f"classification ZeRO-{cfg.run.zero_stage}"
    metrics = open_metrics(run, d, total, desc, tensorboard=cfg.run.tensorboard,
                           progress=cfg.run.progress)
    run.restore_rng(d)  # last: nothing between here and the first batch draws
    return run_classification(
        cfg, d, train_set, val_set, steps, optimizer=optimizer, scheduler=scheduler,
        mixup=mixup, start_step=step, steps_per_epoch=steps_per_epoch, total=total,
        metrics=metrics, desc=desc,
        # a map-style set's replaced samples go on from the checkpoint's count (one saved
        # before it was kept: from 0)
        skipped_before=run.state.get("skipped") if run.state is not None else None,
        best=best,
        eval_owed=owes_evaluation(run.state))
