"""Segmentation model: UperNet or Mask2Former on InternImage, built from the config, with
``--init`` / whole-segmenter checkpoint loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from finetune.datasets.base import IGNORE_INDEX
from finetune.seg_config import SegmentationConfig
from runtime.checkpoint import load_torch_file

log = logging.getLogger(__name__)


def _segmenter_tag_dir(path: str | Path) -> Path | None:
    """The DeepSpeed tag directory of a segmentation run that ``path`` names (its run
    directory, ``checkpoints/``, ``checkpoints/latest`` or a ``step_*`` directory), or None:
    the run's ``trainer_state.json`` names its task."""
    from runtime.checkpoint import TRAINER_STATE
    from runtime.checkpoint_path import resolve_checkpoint

    try:
        source = resolve_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a checkpoint form: the backbone loader reports
        return None
    state_file = source.path / TRAINER_STATE if source.is_zero else None
    if state_file is None or not state_file.is_file():
        return None
    return source.path if json.loads(state_file.read_text()).get("task") == "segmentation" \
        else None


def _legacy_segmenter_file(path: str | Path) -> bool:
    """A ``checkpoints/last.pt`` of a segmentation run from before DeepSpeed (the whole
    ``model`` state and a ``step``, the trunk under a prefix)."""
    if not Path(path).is_file() or Path(path).suffix != ".pt":
        return False
    try:  # mapped, not read: a peek at the keys of a file that may hold GBs of weights
        state = load_torch_file(Path(path), mmap=True)
    except Exception:  # noqa: BLE001 - not ours: let the backbone loader report on it
        return False
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and "step" in state):
        return False
    # A classification run's last.pt holds the trunk at the top level: a backbone init.
    return not any(k.startswith(("patch_embed.", "levels.")) for k in state["model"])


def is_segmenter_checkpoint(path: str | Path | None) -> bool:
    """Whether ``path`` is a segmentation run's training checkpoint (its DeepSpeed
    checkpoint in any form ``--resume`` takes, or an earlier run's ``last.pt``) rather than
    a backbone checkpoint (convert output, released ``.pth``, a classification run)."""
    if not path:
        return False
    return _segmenter_tag_dir(path) is not None or _legacy_segmenter_file(path)


def _whole_init(init: str | None) -> tuple[bool, Path | None]:
    """Whether ``init`` is a whole segmenter's checkpoint, and its DeepSpeed tag directory
    (None: a legacy ``last.pt``), decided by rank 0 and broadcast. Collective: every rank
    calls it. Each rank deciding alone could split them when ``init`` names a live run
    (its ``latest`` moving between the ranks' reads): some would enter the rank-0 read's
    broadcasts while the others loaded a trunk, and all would hang. A failure on rank 0
    fails every rank (``CheckpointError``), none left waiting."""
    from models import CheckpointError
    from runtime.dist import decided_on_rank0

    if not init:  # the same on every rank (finetune.init.agreed_init): nothing to agree on
        return False, None

    def look() -> tuple[bool, Path | None]:
        tag_dir = _segmenter_tag_dir(init)
        return tag_dir is not None or _legacy_segmenter_file(init), tag_dir

    # (a live run's prune removing its state file between two reads fails the look, say)
    return decided_on_rank0(look, CheckpointError, f"{init}: rank 0 could not tell whether "
                            "it is a whole segmenter's checkpoint")


def _segmenter_state(path: str, tag_dir: Path | None) -> dict[str, torch.Tensor]:
    if tag_dir is None:
        return load_torch_file(Path(path))["model"]
    from finetune.convert import read_zero_checkpoint
    from finetune.init import read_once

    # fp32, consolidated over ZeRO partitions, by rank 0 alone
    state, _ = read_once(read_zero_checkpoint, tag_dir)
    # the engine wrapped ``LossForward(model)``: its names carry the ``model.`` prefix
    return {k.removeprefix("model."): v for k, v in state.items()}


def _load_whole(model: nn.Module, path: str, tag_dir: Path | None,
                strict: bool = True) -> None:
    """Load a whole segmenter state (stage-2 init; ``tag_dir``: its DeepSpeed tag
    directory, None for a legacy ``last.pt``); a different head/arch fails clearly.

    ``strict=False``: tensors whose shape differs (class predictor and class weights of a
    dataset with another class count) keep their fresh initialisation and are logged;
    missing or unexpected names still fail (they mean another head or architecture).
    """
    from models import CheckpointError

    state = _segmenter_state(path, tag_dir)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if shapes and not strict and not (missing or unexpected):
        log.warning("init: %d tensors of %s differ in shape and keep their fresh "
                    "initialisation: %s", len(shapes), path, shapes)
        state = {k: v for k, v in state.items() if v.shape == own[k].shape}
        model.load_state_dict(state, strict=False)
        return
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} is a segmenter checkpoint of another head or architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape "
            f"mismatches; e.g. {(missing + unexpected + shapes)[:3]}); set head.kind / "
            "model.* / data.num_classes as in the run that wrote it")
    model.load_state_dict(state)
    log.info("init: whole segmenter loaded from %s (%d tensors)", path, len(state))


def build_segmentor(cfg: SegmentationConfig, init: str | None = None) -> nn.Module:
    """InternImage trunk + ``head.kind`` head; ``init``: a backbone checkpoint (trunk only)
    or a segmentation run's checkpoint of the same head (whole model loaded). Collective
    under a process group (rank 0 decides which ``init`` is, and reads it)."""
    whole, tag_dir = _whole_init(init)
    trunk_init = None if whole else init
    if cfg.head.kind == "mask2former":
        from finetune.heads import build_mask2former

        model: nn.Module = build_mask2former(
            cfg.model.name, cfg.data.num_classes, backbone_kwargs=cfg.model.build_kwargs(),
            init=trunk_init, ignore_index=IGNORE_INDEX, **cfg.head.mask2former_kwargs())
    else:
        from finetune.backbone import build_trunk
        from finetune.upernet import UperNetSegmentor

        model = UperNetSegmentor(build_trunk(cfg.model, trunk_init), cfg.data.num_classes,
                                 cfg.head_channels, cfg.aux_weight, IGNORE_INDEX)
    if whole:
        _load_whole(model, str(init), tag_dir, strict=cfg.init_strict)
    return model


def backbone_prefix(model: nn.Module) -> str:
    """Where ``model.backbone`` (the InternImage trunk) sits in ``model``'s parameter names."""
    trunk = model.backbone
    for name, module in model.named_modules():
        if module is trunk:
            return f"{name}." if name else ""
    raise ValueError("model.backbone is not a submodule of the model")


class LossForward(nn.Module):
    """Calls ``model.loss`` from ``forward``, so the engine wraps the training pass; its
    parameter names (and a checkpoint's) carry the ``model.`` prefix."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        """The wrapped model's loss (a tensor, or a dict of loss terms)."""
        return self.model.loss(images, labels)
