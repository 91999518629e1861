"""``internimage finetune classification --eval-only``: one evaluation of a checkpoint, no
training.

The model is built as training builds it (``finetune.cls_build.build_classifier``, in
``run.precision``); its weights are an ``--init`` source (a released ``.pth`` with its
classifier, a ``convert`` output, a run's checkpoint) or a fine-tuning run's own checkpoint
(``--resume PATH|auto``: ZeRO shards consolidated as ``convert`` does, plus the EMA weights
the run saved). The evaluation is the training loop's own (``finetune.zero``'s over
``finetune.cls_data.build_val_loader``): the same metrics a training run logs for the same
weights, each image on one rank (no padding), the counts summed.

Only the validation set is read. The checkpoint's own classifier head is evaluated, never
a new one: a head of another class count than ``data.num_classes``, or none at all (a
pre-training or detection trunk), is refused, since a fresh head scores chance, a number a
user would misread (``--init`` for training drops or adds the head on purpose).

No run directory is created or needed; into the run directory of a ``--resume``d checkpoint
only one ``eval-<timestamp>.json`` is written, beside (never into) its metrics and
checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.cls_build import build_classifier
from finetune.init import CLASSIFIER_ONLY_PREFIXES
from models import CheckpointError
from runtime.checkpoint import (
    PRETRAIN_TASK,
    ResumeError,
    load_trainer_state,
    resolve_resume,
    saved_task,
    task_name,
)
from runtime.checkpoint_path import CHECKPOINTS_DIR, LATEST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSource:
    """The weights to evaluate: ``weights`` is anything ``--init`` reads; ``step_dir`` is
    set for a run's own checkpoint (``--resume``), whose EMA and run directory it holds."""

    weights: str | Path
    step_dir: Path | None = None


def check_eval_start(cfg, resume: str | None) -> EvalSource:
    """What ``cfg`` (ClassificationConfig) evaluates: ``resume`` (``auto`` or a path, in
    ``run.output_dir``'s ``checkpoints/`` for ``auto``) else ``cfg.init``; refused before
    anything is built or read but file names, the trainer state and a checkpoint's
    metadata: a ``CheckpointError`` for the weights (another variant or class count), a
    ``ValueError`` naming the key for validation data that is not there."""
    from finetune.cls_data import check_data
    from finetune.init import check_init_backbone
    from finetune.zero import model_hash

    if resume:
        step_dir = resumed_step_dir(cfg, resume)
        state = load_trainer_state(step_dir)
        check_eval_task(state, "classification", step_dir)
        if state.get("model_hash") != model_hash(cfg):
            raise ResumeError(
                f"{step_dir} was saved for another model than this config builds "
                "(variant, architecture or data.num_classes differ); evaluate it with the "
                "run's own config (--config RUN/config.yaml)")
        evaluated = EvalSource(step_dir, step_dir)
    else:
        try:
            check_init_backbone(cfg.init, cfg.model.name, cfg.model.arch())
        except CheckpointError as err:
            raise CheckpointError(f"--init {err}") from None
        evaluated = EvalSource(cfg.init)
    check_data(cfg, val_only=True)
    return evaluated


def check_eval_task(state: dict[str, Any], task: str, step_dir: Path) -> None:
    """Refuse a checkpoint another task's run saved (``ResumeError``), naming that task and
    the command that evaluates it: ``--eval-only --resume`` evaluates a run's own model,
    head included; a pre-training checkpoint has none (before this check, the model-hash
    refusal advised "the run's own config", which cannot evaluate it either)."""
    saved = saved_task(state)
    if saved == task:
        return
    if saved == PRETRAIN_TASK:
        hint = (f"it holds no {task} head, so fine-tune from it first (internimage finetune "
                f"{task} --init {step_dir})")
    else:
        hint = (f"evaluate it with `internimage finetune {saved} --eval-only --resume "
                f"{step_dir}`")
    raise ResumeError(f"{step_dir} is a checkpoint of a {task_name(saved)} run, not a "
                      f"{task} run (--eval-only --resume evaluates a {task} run's own "
                      f"checkpoints): {hint}")


def resumed_step_dir(cfg, resume: str) -> Path:
    """The ZeRO tag directory ``--resume`` names, as a training resume resolves it
    (``runtime.checkpoint.resolve_resume``): ``auto``, ``run.output_dir``'s latest; a path
    of a run's checkpoint (a weights file is refused there: ``--init`` takes it)."""
    root = Path(cfg.run.output_dir) / CHECKPOINTS_DIR
    step_dir = resolve_resume(resume, root, warn=False, init=True)
    if step_dir is None:
        raise ResumeError(f"--resume auto: {root} holds no checkpoint (no {LATEST}); pass the "
                          "run's --output-dir, or --resume PATH")
    return step_dir


def check_head(state: dict[str, torch.Tensor], cfg, src: str | Path) -> None:
    """Refuse weights whose classifier the model would have to start fresh: a checkpoint
    without one (a pre-training or dense-task trunk) or with another class count than
    ``data.num_classes``. Checked against the model built on the meta device (no memory)."""
    with torch.device("meta"):
        own = build_classifier(cfg).state_dict()
    head = {k: v.shape for k, v in own.items() if k.startswith(CLASSIFIER_ONLY_PREFIXES)}
    missing = sorted(k for k in head if k not in state)
    if missing:
        raise CheckpointError(
            f"{src} holds no classifier head for {cfg.model.name} ({len(missing)} tensors "
            f"missing, e.g. {missing[0]}): a new head would score chance; --eval-only takes "
            "a classifier (a released .pth, a classification run or its convert output)")
    wrong = [k for k in head if state[k].shape != head[k]]
    if "head.weight" in wrong:
        classes = state["head.weight"].shape[0]
        raise CheckpointError(
            f"{src} holds a {classes}-class head, data.num_classes is "
            f"{cfg.data.num_classes}: set data.num_classes={classes} (--eval-only evaluates "
            "the checkpoint's own head, never a new one)")
    if wrong:
        raise CheckpointError(f"{src}: classifier tensors differ in shape from the model's: "
                              + "; ".join(f"{k} {tuple(state[k].shape)} vs {tuple(head[k])}"
                                          for k in wrong[:4]))


def evaluate_checkpoint(cfg, source: EvalSource) -> dict[str, float]:
    """Evaluate ``source`` (from :func:`check_eval_start`) once on ``cfg``'s validation set,
    on every rank of the job; the metrics a training run's evaluation of the same weights
    logs (``top1``, ``top5``, ``val_loss``; ``_ema`` ones when the run's checkpoint holds
    EMA weights)."""
    from finetune.cls_data import build_val_loader, build_val_set
    from finetune.convert import read_backbone
    from finetune.init import load_backbone_state, read_once
    from finetune.zero import evaluate_with_ema
    from runtime import rng
    from runtime.checkpoint import EMA_FILE, agree_on_refusal, load_torch_file
    from runtime.dist import broadcast_object, init_distributed

    d = init_distributed(cfg.run.collective_timeout_min)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # Rank 0's choice for every rank: a run still training may publish a newer checkpoint
    # (or prune this one) between two ranks' reads of ``latest``, and ranks that evaluated
    # different weights would sum their counts without a word, or, disagreeing on the EMA,
    # run different collectives (a deadlock)
    ema_file = source.step_dir / EMA_FILE if source.step_dir is not None else None
    source, has_ema = broadcast_object(
        (source, ema_file is not None and ema_file.is_file()))
    ema_file = source.step_dir / EMA_FILE if source.step_dir is not None else None
    refusal, state, meta, ema_state = None, {}, None, None
    try:
        # zero_to_fp32 prints its progress (on rank 0, which reads): stdout is for the
        # metrics line
        with contextlib.redirect_stdout(sys.stderr):
            state, meta = read_once(read_backbone, source.weights)  # rank 0 reads
        check_head(state, cfg, source.weights)
        if has_ema:  # training evaluates its fp32 EMA too; rank 0 reads it for all (H:
            # 4.3 GB each rank read from shared storage)
            ema_state, _ = read_once(lambda path: (load_torch_file(path), None), ema_file)
    except (CheckpointError, OSError) as err:  # e.g. pruned while this rank read it
        refusal = err if isinstance(err, CheckpointError) else CheckpointError(
            f"{source.weights}: {err}")
    agree_on_refusal(refusal)  # every rank raises together, none waits in a collective
    rng.seed_all(cfg.run.seed)  # as training builds it (every weight is then loaded)
    model = build_classifier(cfg)
    load_backbone_state(model, state, meta, source.weights, variant=cfg.model.name,
                        arch=cfg.model.arch())
    del state
    ema = None
    if ema_state is not None:
        ema = copy.deepcopy(model)
        ema.load_state_dict(ema_state)
        ema.to(d.device)
    # a bf16 run evaluates its engine's bf16 weights and buffers (finetune/zero.py)
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32
    model.to(d.device, dtype)
    loader = build_val_loader(cfg, d, build_val_set(cfg))
    result = evaluate_with_ema(model, ema, loader, d, dtype, cfg.data.img_size)
    if d.is_main:
        log.info("eval-only %s on %d image(s), %d rank(s): %s", source.weights,
                 len(loader.dataset), d.world_size, result)
        if source.step_dir is not None:
            write_record(source.step_dir, result, d.world_size)
    return result


def write_record(step_dir: Path, result: dict[str, float], world_size: int) -> None:
    """``RUN/eval-<timestamp>.json`` beside the run's own files (a run directory that is
    not writable, a downloaded one, only warns: the metrics are printed anyway)."""
    run_dir = step_dir.parent.parent
    state: dict[str, Any] = load_trainer_state(step_dir)
    record = {"checkpoint": str(step_dir), "step": state.get("step"),
              "world_size": world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **result}
    path = run_dir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        path.write_text(json.dumps(record) + "\n")
    except OSError as err:
        log.warning("eval-only: cannot write %s (%s); the metrics are printed only", path, err)
