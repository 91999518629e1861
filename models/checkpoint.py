"""Loading released InternImage checkpoints (``.pth``) and our ``.safetensors`` files."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

CLASSIFIER_KEYS = ("head.weight", "head.bias")
_CONTAINER_KEYS = ("model", "module", "state_dict", "model_state")
# Released detection/segmentation checkpoints (mmdet/mmseg) hold the trunk under this
# prefix, next to their neck and heads (neck.*, rpn_head.*, decode_head.*, ...).
DET_SEG_BACKBONE_PREFIX = "backbone."
# `internimage convert` writes the backbone under the released keys and keeps the rest of
# the network it came from under these: the pre-training heads and text tower
# (``pretrain.*``), a detection/segmentation run's head (``task.<task>.*``).
PRETRAIN_PREFIX = "pretrain."
TASK_PREFIX = "task."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model as asked."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: keys that were missing, unexpected or dropped."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # the model's classifier keys a backbone-only file does not hold: left as built
    fresh: list[str] = field(default_factory=list)
    loaded: int = 0
    # "backbone." when the file was a detection/segmentation checkpoint whose trunk was
    # taken out of that prefix (its other keys are in ``dropped``)
    stripped_prefix: str = ""

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        if self.stripped_prefix:
            parts.append(f"the trunk taken from {self.stripped_prefix}* (a detection/"
                         f"segmentation checkpoint; its neck and heads are dropped)")
        for name in ("missing", "unexpected", "dropped", "fresh"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts)


def unwrap_containers(state: object) -> object:
    """``state`` with ``model``/``module``/``state_dict``/``model_state`` container dicts
    taken off (the released classification files keep the weights under ``model``,
    mmcv's det/seg files under ``state_dict``)."""
    while isinstance(state, dict):
        inner = next((state[k] for k in _CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    return state


def _unpickling_message(path: Path, err: BaseException) -> str | None:
    """The error for a ``.pth`` that holds pickled Python objects besides its tensors, or
    ``None`` when ``err`` has another cause (a damaged file)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a readable torch zip file: the caller says so
        return None
    if not names:
        return None
    # The released classification code's save_checkpoint stores its yacs config under
    # 'config' (and optimizer, scheduler, ...) next to 'model'; torch's weights-only
    # reader refuses the pickled CfgNode, and cannot skip that entry to read 'model' only.
    return (f"{path} holds pickled Python objects besides its weights ({', '.join(names)}): "
            f"a training checkpoint? (the released classification code's save_checkpoint "
            f"stores its yacs CfgNode as 'config'). They are not unpickled, since that can "
            f"run code from the file. If you trust the file, save its weights alone once: "
            f"python -c \"import torch; c = torch.load({str(path)!r}, map_location='cpu', "
            f"weights_only=False); torch.save(c['model'], 'weights.pth')\" (or the entry "
            f"that holds the weights) and load weights.pth")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state_dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``.

    ``.pth`` files are read with ``weights_only=True`` (no code runs) and unwrapped from
    ``model``/``module``/``state_dict`` containers; a ``module.`` prefix (DDP) is stripped.
    A file that also pickles Python objects (a training checkpoint with its config) is
    refused with a ``CheckpointError`` that says how to extract its weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            message = _unpickling_message(path, err)
            if message is None:
                raise CheckpointError(
                    f"cannot read {path} as a weights-only torch file: {err}") from err
            # no cause: callers that reword torch's own error (finetune.convert) keep ours
            raise CheckpointError(message) from None
        except Exception as err:  # unpickling errors come in many types
            raise CheckpointError(
                f"cannot read {path} as a weights-only torch file: {err}") from err
        state = unwrap_containers(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def state_for_model(
    state: dict[str, torch.Tensor], own_keys: Collection[str], source: str | Path,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The part of a checkpoint's ``state`` that a model with ``own_keys`` takes, and a
    report holding what was left out; ``load_pretrained`` and timm's
    ``pretrained_filter_fn`` (``models.timm_registry``) both go through it.

    A released detection/segmentation checkpoint holds the trunk under ``backbone.``
    (mmdet/mmseg): when ``state`` has such keys and the model has none, only those are
    kept, the prefix stripped, as the released det/seg backbones' ``init_weights`` strip
    it; the neck and head keys are reported as ``dropped``. A state holding none of the
    model's keys (another model's file) raises ``CheckpointError``, strict or not: loading
    it would change nothing and say nothing.
    """
    report = LoadReport()
    own = set(own_keys)
    prefix = DET_SEG_BACKBONE_PREFIX
    if (any(k.startswith(prefix) for k in state)
            and not any(k.startswith(prefix) for k in own)):
        report.stripped_prefix = prefix
        report.dropped = [k for k in state if not k.startswith(prefix)]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        log.info("%s: a detection/segmentation checkpoint: %d trunk tensors taken from %s*, "
                 "%d others (neck, heads) dropped", source, len(state), prefix,
                 len(report.dropped))
    rest = [k for k in state if k.startswith((PRETRAIN_PREFIX, TASK_PREFIX)) and k not in own]
    if rest:  # a converted file's other parts: never an InternImage's own weights
        report.dropped += rest
        state = {k: v for k, v in state.items() if k not in set(rest)}
        log.info("%s: %d tensors of the network it was converted from (%s*, %s*) dropped",
                 source, len(rest), PRETRAIN_PREFIX, TASK_PREFIX)
    if not any(k in own for k in state):
        shown = ", ".join(list(state)[:5]) or "no tensors"
        raise CheckpointError(f"{source} holds none of the model's weights (its keys: "
                              f"{shown}{' ...' if len(state) > 5 else ''}): a checkpoint of "
                              f"another model?")
    return state, report


def _bn_stem_hint(unexpected: list[str]) -> str:
    """Name the likely cause when a file has the BatchNorm stem that builds of this project
    made before the stem was fixed to the released LayerNorm one (``patch_embed.norm1.1``)."""
    if "patch_embed.norm1.0.running_mean" not in unexpected:
        return ""
    return ("; its stem is BatchNorm (patch_embed.norm1.0.running_mean), written by an "
            "older build of this project: released InternImage models and this one use a "
            "LayerNorm stem (patch_embed.norm1.1.*), so that file cannot be loaded strictly")


def load_pretrained(
    model: nn.Module, path: str | Path, *, strict: bool = True, drop_classifier: bool | None = None,
) -> LoadReport:
    """Load weights into ``model`` and report missing/unexpected keys.

    A released detection/segmentation checkpoint gives its trunk (``backbone.*``, see
    ``state_for_model``); a file holding none of the model's keys raises even with
    ``strict=False``.

    ``drop_classifier``: ``True`` always skips ``head.*``; ``None`` (default) skips it only
    when its shape differs from the model's (a new class count); ``False`` never does.
    With ``strict=True`` any other missing or unexpected key, or a shape mismatch, raises
    ``CheckpointError`` naming them.
    """
    own = model.state_dict()
    state, report = state_for_model(read_state_dict(path), own.keys(), path)
    holds_classifier = any(k in state for k in CLASSIFIER_KEYS)
    for key in CLASSIFIER_KEYS:
        if key not in state:
            continue
        mismatch = key in own and own[key].shape != state[key].shape
        if drop_classifier or (drop_classifier is None and mismatch):
            state.pop(key)
            report.dropped.append(key)
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise CheckpointError(f"{path}: {len(shape_errors)} tensors have the wrong shape (a "
                              f"different variant?): " + "; ".join(shape_errors[:5]))
    result = model.load_state_dict(state, strict=False)
    # a backbone-only file (a converted pre-training run, num_classes=0) into a classifier:
    # its head starts as built, as when the class count differs
    if not holds_classifier:
        report.fresh = [k for k in result.missing_keys if k in CLASSIFIER_KEYS]
    report.missing = [k for k in result.missing_keys
                      if k not in report.dropped and k not in report.fresh]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = len(state) - len(report.unexpected)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{path} does not match the model: {report}"
                              + _bn_stem_hint(report.unexpected))
    log.info("loaded %s: %s", path, report)
    return report
