"""``--init CKPT`` for every fine-tuning entrypoint.

Accepts what ``internimage convert`` accepts (one resolver, ``runtime.checkpoint_path``): a
pre-training or fine-tuning run directory, its ``checkpoints/``, ``checkpoints/latest`` or a
``step_*`` directory (ZeRO shards consolidated on the fly, nothing written), a ``convert``
output (``.safetensors``) or a released InternImage ``.pth``. A detection or segmentation run
gives its trunk only (``finetune.convert.split_state``); that trunk has no classification
modules, so a classifier initialised from it starts them fresh. The backbone must match the
model being fine-tuned: a checkpoint of another variant fails with a message saying which
variant it holds, instead of a wall of shape errors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.convert import read_backbone, read_metadata
from models import VARIANTS, CheckpointError, LoadReport, resolve_variant
from models.layer_scale import fresh_gammas, is_gamma, layer_scale_hint
from runtime.dist import broadcast_object, broadcast_tensors, decided_on_rank0

log = logging.getLogger(__name__)

# Keys a backbone-only model (detection/segmentation) or a new classifier does not need.
HEAD_PREFIXES = ("head.",)
CLASSIFIER_ONLY_PREFIXES = ("conv_head.", "head.", "dcnv3_head_", "clip_projector.", "fc_norm.")
# An ImageNet-22K classifier fine-tuned on ImageNet-1K keeps its 1K classes' rows (the
# released recipe: classification/utils.py load_pretrained, map22kto1k.txt).
IMAGENET_22K_CLASSES = 21841
IMAGENET_1K_CLASSES = 1000
MAP_22K_TO_1K = Path(__file__).with_name("map22kto1k.txt")


def imagenet22k_to_1k_rows() -> torch.Tensor:
    """Row of each ImageNet-1K class (wnids sorted) in an ImageNet-22K classifier (21841
    classes, wnids sorted): the released ``map22kto1k.txt``, 1000 indices."""
    rows = [int(line) for line in MAP_22K_TO_1K.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return torch.tensor(rows, dtype=torch.long)


def _keep_1k_rows_of_22k_head(state: dict[str, torch.Tensor],
                              own: dict[str, torch.Tensor]) -> bool:
    """A 21841-class head going into a 1000-class model: keep the 1K classes' rows, as the
    released fine-tuning does by default (RAND_INIT_FT_HEAD off), instead of a fresh head
    (the 22K-to-1K recipes, lr 2e-5 with 2 warm-up epochs, were tuned for a head that
    already classifies). Whether it did."""
    weight, theirs = state.get("head.weight"), own.get("head.weight")
    if (weight is None or theirs is None or weight.shape[0] != IMAGENET_22K_CLASSES
            or theirs.shape[0] != IMAGENET_1K_CLASSES or weight.shape[1:] != theirs.shape[1:]):
        return False
    rows = imagenet22k_to_1k_rows()
    state["head.weight"] = weight[rows]
    if "head.bias" in state:
        state["head.bias"] = state["head.bias"][rows]
    return True


# Spec fields that make another network (tensor shapes, or what the weights compute),
# compared with the variant's defaults filled in on both sides: each side records or sets
# only what it overrides, so a key set on one side only (a width-16 demo checkpoint into a
# config that keeps the variant's 64 channels) went unchecked. Not compared: layer_scale
# unless both sides set it (a trunk without gammas takes fresh ones: load_init), and the
# classification head's cls_scale / use_clip_projector (a head missing from the
# checkpoint starts fresh).
COMPARED_ARCH = ("channels", "depths", "groups", "mlp_ratio", "offset_scale", "post_norm",
                 "dw_kernel_size", "res_post_norm", "level2_post_norm_block_ids",
                 "center_feature_scale")


def check_variant(meta: dict[str, str], variant: str, arch: dict, src: str | Path) -> None:
    """Fail clearly when the checkpoint's recorded variant/arch differs from the model's
    (``arch``: the config's overrides; both sides resolved against ``variant``'s spec)."""
    theirs = meta.get("variant")
    if theirs and theirs != variant:
        raise CheckpointError(f"{src} holds an {theirs} backbone but this run builds {variant}; "
                              "set model.name to the checkpoint's variant")
    if "arch" in meta:
        recorded = json.loads(meta["arch"])
        spec = VARIANTS[resolve_variant(variant)].kwargs()
        keys = [k for k in COMPARED_ARCH if k in recorded or k in arch]
        if "layer_scale" in recorded and "layer_scale" in arch:
            keys.append("layer_scale")

        def value(side: dict, key: str) -> list:
            return list(_seq(side[key] if key in side else spec[key]))

        diffs = [f"{k}={recorded.get(k, spec[k])} (checkpoint) vs {arch.get(k, spec[k])} "
                 f"(config{'' if k in arch else f': {variant} default'})"
                 for k in keys if value(recorded, k) != value(arch, k)]
        if diffs:
            raise CheckpointError(f"{src}: backbone architecture differs from the config: "
                                  + "; ".join(diffs))


def check_init_backbone(src: str | Path, variant: str, arch: dict) -> None:
    """Before any compute: refuse (``CheckpointError``) an init checkpoint whose recorded
    variant or architecture differs from the model's, from its metadata alone (no tensor
    read). A source that records none (a released ``.pth``) is checked by its shapes when
    :func:`load_init` loads it."""
    try:
        meta = read_metadata(src)
    except ValueError as err:  # its own record is at fault, not this run's config
        raise CheckpointError(f"{src}: cannot tell which backbone it holds: {err}") from None
    check_variant(meta, variant, arch, src)


def start_checks(cfg, check_data: Callable[..., None] | None, backbone_init: bool = True,
                 thorough: bool = True) -> None:
    """What a fine-tuning run refuses before anything is built: an ``init`` recording
    another backbone than ``cfg.model`` (a ``CheckpointError``; ``backbone_init=False``:
    the init is not a backbone, checked when it is loaded), then data its readers would not
    find (``check_data``: a ``ValueError`` naming the key). The init first: ``internimage
    submit`` refuses it but only warns about data (which the compute nodes may see where
    the login node does not). ``thorough=False`` (``internimage submit``, on a login node):
    only the data checks that cost no more than directory listings; those that read file
    contents (a COCO annotation file: ~15 s and ~3 GB of memory for train2017, far more
    for Objects365) are left to the job's own start."""
    if cfg.init and backbone_init:
        check_init_backbone(cfg.init, cfg.model.name, cfg.model.arch())
    if check_data is not None:  # None: a dry run (a plan is often made where the data is not)
        check_data(cfg, thorough=thorough)


def _seq(v):
    return v if isinstance(v, (list, tuple)) else [v]


def load_init(model: nn.Module, src: str | Path, *, variant: str, arch: dict | None = None,
              backbone_only: bool = False) -> LoadReport:
    """Load the backbone of ``src`` into ``model`` (an ``InternImage``) and report keys.

    The classifier (``head.*``) is dropped when its shape differs (new class count), except
    an ImageNet-22K head (21841 classes) going into a 1000-class model, which keeps its
    ImageNet-1K rows (as the released fine-tuning); with ``backbone_only`` (dense tasks)
    every classification-only key is dropped. Any other
    missing or unexpected key, or a shape mismatch, raises ``CheckpointError``.

    Under a process group every rank must call it (each builds the whole model): rank 0
    alone reads ``src`` (:func:`read_once`).
    """
    state, meta = read_once(read_backbone, src)
    return load_backbone_state(model, state, meta, src, variant=variant, arch=arch,
                               backbone_only=backbone_only)


def agreed_init(init: str | None) -> str | None:
    """Rank 0's ``init`` on every rank (one broadcast at a start). Whether a start loads
    ``--init`` is decided on each rank before the process group exists
    (launch/commands/finetune.py drops it where the run resumes, reading the run's
    ``latest``): a checkpoint published between two ranks' looks (a job still ending
    there) would have some ranks enter the collective read of the init (:func:`read_once`)
    and others not, all then waiting. A resume's checkpoint replaces the init's weights
    anyway, so a rank loading one it did not need loses nothing."""
    return broadcast_object(init)


def read_once(read: Callable[[Any], tuple[dict[str, torch.Tensor], Any]],
              src: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``read(src)`` (a state dict and its metadata) on rank 0 only, the tensors and the
    metadata broadcast to the other ranks (:func:`runtime.dist.decided_on_rank0`; the lone
    process reads without a process group). Collective: every rank calls it.

    Every rank reading a ZeRO directory would read the fp32 partitions of all its rank
    files (InternImage-H: 4.3 GB) and open each of them: at 64 ranks 275 GB from shared
    storage where one read and a broadcast do. A read that fails on rank 0 fails on
    every rank with a ``CheckpointError`` carrying its message (rank 0's own, if it was
    one), so none waits in a collective for tensors that never come and callers that
    agree on refusals see the same kind of error on every rank (and a lone process).
    """
    held: dict[str, dict[str, torch.Tensor]] = {}

    def read_and_hold():  # rank 0 alone: the tensors stay here, the metadata is carried
        state, meta = read(src)
        held["state"] = state
        return meta

    meta = decided_on_rank0(read_and_hold, CheckpointError, f"{src}: rank 0 could not read it")
    return broadcast_tensors(held.get("state")), meta


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor],
                        meta: dict[str, str], src: str | Path, *, variant: str,
                        arch: dict | None = None, backbone_only: bool = False) -> LoadReport:
    """:func:`load_init` of weights already read (``finetune.convert.read_backbone`` of
    ``src``), for a caller that looks at them first (finetune/eval_only.py); ``state`` is
    consumed (its dropped keys popped)."""
    check_variant(meta, variant, arch or {}, src)
    own = model.state_dict()
    report = LoadReport()
    mapped = not backbone_only and _keep_1k_rows_of_22k_head(state, own)
    if mapped:
        log.info("%s: its ImageNet-22K head (%d classes) keeps the rows of the %d ImageNet-1K "
                 "classes (%s)", Path(src), IMAGENET_22K_CLASSES, IMAGENET_1K_CLASSES,
                 MAP_22K_TO_1K.name)
    for key in list(state):
        droppable = key.startswith(CLASSIFIER_ONLY_PREFIXES if backbone_only else HEAD_PREFIXES)
        if droppable and (key not in own or own[key].shape != state[key].shape):
            state.pop(key)
            report.dropped.append(key)
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise CheckpointError(
            f"{src} does not fit {variant}: {len(shape_errors)} tensors differ in shape (a "
            f"checkpoint of another variant or width?): " + "; ".join(shape_errors[:4]))
    with torch.no_grad():
        result = model.load_state_dict(
            {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, strict=False)
    # A detection/segmentation trunk never had the classification-only modules
    # (finetune/backbone.py deletes them): a classifier built on it starts them fresh.
    # Only when the checkpoint holds none of them, so a classifier checkpoint that lost
    # some of its head still fails below.
    dense_trunk = not any(k.startswith(CLASSIFIER_ONLY_PREFIXES) for k in state)
    fresh = [k for k in result.missing_keys
             if ((backbone_only or dense_trunk) and k.startswith(CLASSIFIER_ONLY_PREFIXES))
             or k.startswith(HEAD_PREFIXES)]
    # a trunk trained without layer scale into a model with it (the released T det/seg
    # configs' layer_scale=1.0 from the T 1K classifier): its gammas start at their built
    # value, as the released backbone's non-strict load leaves them
    fresh += fresh_gammas(result.missing_keys, state)
    report.missing = [k for k in result.missing_keys if k not in fresh]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = len(state) - len(report.unexpected)
    if report.missing or report.unexpected:
        hint = layer_scale_hint(report.unexpected)
        raise CheckpointError(f"{src} does not match {variant} (another variant or depth?): "
                              f"{report}" + (f"; {hint}" if hint else ""))
    # the dropped classifier is fresh too, but the report already names it
    fresh = [k for k in fresh if k not in report.dropped]
    log.info("init from %s%s: %s%s", Path(src), _source_desc(meta), report,
             f"; {len(fresh)} not in the checkpoint, initialised fresh: "
             f"{', '.join(sorted({_fresh_name(k) for k in fresh}))}" if fresh else "")
    report.fresh = fresh
    return report


def fresh_head(report: LoadReport) -> bool:
    """Whether the classifier (``head.*``) of a model loaded by :func:`load_init` starts
    as built: the checkpoint held none, or one of another class count (dropped)."""
    return any(k.startswith(HEAD_PREFIXES) for k in [*report.fresh, *report.dropped])


def _fresh_name(key: str) -> str:
    """How the init log names a fresh key: its module (``head.*``), or the gammas."""
    return "levels.*.gamma1/gamma2" if is_gamma(key) else key.split(".")[0] + ".*"


def _source_desc(meta: dict[str, str]) -> str:
    """`` (a segmentation run's backbone, its head left out)`` for a task run's trunk."""
    if "task_backbone_prefix" not in meta:
        return ""
    return f" ({meta['task']} run's backbone, its head left out)"
