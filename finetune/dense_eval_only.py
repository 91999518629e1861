"""``internimage finetune detection|segmentation --eval-only --resume PATH|auto``: one
evaluation of a detection or segmentation run's own checkpoint, no training (the released
code's ``test.py CONFIG CHECKPOINT --eval bbox segm`` / ``--eval mIoU``).

What a user runs it for: the evaluation training does not do, e.g. the paper's
multi-scale + flip segmentation protocol (``head.test_scales=[0.5,...,1.75]
head.test_flip=true``) on the final checkpoint, or another validation set, without paying
for it at every training evaluation.

The checkpoint must be the whole model a run of this task saved (its ``trainer_state.json``
``task`` and ``model_hash``: head, classes, variant): ``--init`` gives a backbone, whose
head would start fresh and score chance, so it is refused for these tasks. The model is
built as training builds it, the ZeRO shards are consolidated as ``convert`` does (fp32:
detection and segmentation train fp32 weights, bf16 is autocast), every tensor loaded
strictly, and the training loop's own evaluation runs once (each validation image on one
rank, rank 0's choice of checkpoint on every rank). Only the validation data is read (for
detection, only the validation annotation file, whose categories are the class list).
Into the run directory only ``eval-<timestamp>.json`` is written (finetune/eval_only.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch

from finetune.eval_only import EvalSource, check_eval_task, resumed_step_dir, write_record
from models import CheckpointError
from runtime.checkpoint import ResumeError, load_trainer_state

log = logging.getLogger(__name__)

TASKS = ("detection", "segmentation")


def _model_hash(task: str, cfg, saved: str | None) -> str:
    """The ``model_hash`` a run of ``task`` with ``cfg`` gives its checkpoints (detection
    counts its classes from the validation annotations; a Mask2Former checkpoint written
    before its head sizes were hashed, ``saved``, keeps the hash it had)."""
    if task == "detection":
        from finetune.det_data import build_val_set
        from finetune.detection import detection_model_hash

        return detection_model_hash(cfg, len(build_val_set(cfg).cat_ids))
    from finetune.segmentation import resume_model_hash

    return resume_model_hash(cfg, saved)


def check_dense_eval_start(task: str, cfg, resume: str, thorough: bool = True) -> EvalSource:
    """The checkpoint ``--eval-only --resume`` of ``task`` evaluates, refused before the
    model is built (``ResumeError``) when another task or another model wrote it; the
    validation data checked (a ``ValueError`` naming the key). ``thorough=False``
    (``internimage submit`` on a login node): no file of the data is parsed, so a
    detection checkpoint's classes are not compared there."""
    if task == "detection":
        from finetune.det_data import check_data
    else:
        from finetune.seg_data import check_data
    step_dir = resumed_step_dir(cfg, resume)
    state = load_trainer_state(step_dir)
    check_eval_task(state, task, step_dir)
    check_data(cfg, thorough, val_only=True)
    saved = state.get("model_hash")
    if (thorough or task == "segmentation") and saved != _model_hash(task, cfg, saved):
        raise ResumeError(
            f"{step_dir} was saved for another model than this config builds (variant, "
            "architecture, head or class count differ); evaluate it with the run's own "
            "config (--config RUN/config.yaml), evaluation keys may differ")
    return EvalSource(step_dir, step_dir)


def _build(task: str, cfg):
    """(the model ``evaluate`` takes, the module the checkpoint's names are of, the
    validation set, ``evaluate``) as training builds them."""
    if task == "detection":
        from finetune.det_data import build_val_set
        from finetune.det_eval import evaluate
        from finetune.det_model import build_model

        val_set = build_val_set(cfg)
        model = build_model(cfg, len(val_set.cat_ids))
        return model, model, val_set, evaluate
    from finetune.seg_data import agreed_seg_set
    from finetune.seg_eval import evaluate
    from finetune.seg_model import LossForward, build_segmentor

    model = build_segmentor(cfg)
    return model, LossForward(model), agreed_seg_set(cfg.data, False), evaluate


def evaluate_dense_checkpoint(task: str, cfg, source: EvalSource) -> dict[str, float]:
    """Evaluate ``source`` (from :func:`check_dense_eval_start`) once on ``cfg``'s
    validation set, on every rank of the job; the metrics a training evaluation of the
    same weights logs (``bbox_AP``... / ``mIoU``, ``IoU.<class>``...)."""
    from finetune.convert import read_source
    from finetune.init import read_once
    from runtime import rng
    from runtime.checkpoint import agree_on_refusal
    from runtime.dist import broadcast_object, init_distributed

    d = init_distributed(cfg.run.collective_timeout_min)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # rank 0's choice on every rank: a run still training may publish a newer checkpoint
    source = broadcast_object(source)
    refusal, state = None, {}
    try:
        # zero_to_fp32 prints its progress (on rank 0, which reads): stdout is for the
        # metrics line
        with contextlib.redirect_stdout(sys.stderr):
            state, _ = read_once(read_source, source.weights)  # rank 0 reads
    except (CheckpointError, OSError) as err:  # e.g. pruned while this rank read it
        refusal = err if isinstance(err, CheckpointError) else CheckpointError(
            f"{source.weights}: {err}")
    agree_on_refusal(refusal)  # every rank raises together, none waits in a collective
    rng.seed_all(cfg.run.seed)  # as training builds it (every weight is then loaded)
    model, named, val_set, evaluate = _build(task, cfg)
    own = named.state_dict()
    # shapes the hash does not cover (Mask2Former's queries, a detector's widths):
    # load_state_dict would raise a size-mismatch traceback
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:  # the same on every rank
        raise CheckpointError(
            f"{source.weights} does not fit the {task} model this config builds: "
            f"{len(wrong)} tensors differ in shape (checkpoint vs model), e.g. "
            + "; ".join(wrong[:3]) + ": evaluate it with the run's own config")
    result = named.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:  # the same on every rank
        raise CheckpointError(
            f"{source.weights} does not fit the {task} model this config builds: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")
    del state
    model.to(d.device)
    metrics = evaluate(model, val_set, cfg, d)
    if d.is_main:
        log.info("eval-only %s on %d image(s), %d rank(s): %s", source.weights, len(val_set),
                 d.world_size, metrics)
        write_record(source.step_dir, metrics, d.world_size)
    return metrics
