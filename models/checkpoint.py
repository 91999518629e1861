"""Loading released InternImage checkpoints (``.pth``) and our ``.safetensors`` files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

CLASSIFIER_KEYS = ("head.weight", "head.bias")
_CONTAINER_KEYS = ("model", "module", "state_dict", "model_state")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model as asked."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: keys that were missing, unexpected or dropped."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    loaded: int = 0

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors"]
        for name in ("missing", "unexpected", "dropped"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state_dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``.

    ``.pth`` files are read with ``weights_only=True`` (no code runs) and unwrapped from
    ``model``/``module``/``state_dict`` containers; a ``module.`` prefix (DDP) is stripped.
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
        except Exception as err:  # unpickling errors come in many types
            raise CheckpointError(
                f"cannot read {path} as a weights-only torch file: {err}") from err
        while isinstance(state, dict):
            inner = next(
                (state[k] for k in _CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


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

    ``drop_classifier``: ``True`` always skips ``head.*``; ``None`` (default) skips it only
    when its shape differs from the model's (a new class count); ``False`` never does.
    With ``strict=True`` any other missing or unexpected key, or a shape mismatch, raises
    ``CheckpointError`` naming them.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    report = LoadReport()
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
    report.missing = [k for k in result.missing_keys if k not in report.dropped]
    report.unexpected = list(result.unexpected_keys)
    report.loaded = len(state) - len(report.unexpected)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{path} does not match the model: {report}"
                              + _bn_stem_hint(report.unexpected))
    log.info("loaded %s: %s", path, report)
    return report
