"""The one resolver from what a user types as a checkpoint to what is to be read.

A pre-training run directory is laid out as (see ``runtime/checkpoint.py``)::

    RUN/config.yaml
    RUN/checkpoints/latest              a text file holding a tag, e.g. ``step_0000300``
    RUN/checkpoints/step_0000300/       DeepSpeed's files (``*_model_states.pt``, ...)
                                        plus our ``trainer_state.json`` and
                                        ``rank_states/`` (one file per rank)

``latest`` is DeepSpeed's own convention (``engine.load_checkpoint`` and ``zero_to_fp32``
read it) and is replaced atomically only after a checkpoint is complete. A save writes into
a staging folder, ``step_XXXXXXX.tmp-<token>``, renamed into place once complete: such a
folder is never chosen unless ``latest`` names it (only while a complete checkpoint is
being swapped over an older one of the same step), and refused when given by hand. Users point at
any level of this tree, or at a weights file; :func:`resolve_checkpoint` maps each of them
to either a ZeRO tag directory or a weights file, and anything else to one line that says
what is accepted. ``internimage convert``, ``finetune --init`` and resume use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.checkpoint import CheckpointError
from runtime.run_layout import CHECKPOINTS_DIR, LATEST, STAGING

MODEL_STATES_SUFFIX = "_model_states.pt"  # every DeepSpeed tag directory holds one per rank
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
ACCEPTED = ("a run directory, its checkpoints/ directory, checkpoints/latest, a step_* "
            "directory, a released .pth (or .pt/.bin) or a .safetensors file")
# what --resume accepts: a weights file resolves, but holds no optimizer or data state
_RESUMABLE_FORMS = ("a run directory, its checkpoints/ directory, checkpoints/latest or a "
                    "step_* directory")
_WEIGHTS_ONLY = "a released .pth or .safetensors file holds weights only"
RESUMABLE = f"{_RESUMABLE_FORMS} ({_WEIGHTS_ONLY})"
# the same for a command that starts from weights with --init (fine-tuning; pre-training
# has no such option, so its refusal names none)
RESUMABLE_OR_INIT = (f"{_RESUMABLE_FORMS} ({_WEIGHTS_ONLY}: fine-tuning starts from one "
                     "with --init)")


class CheckpointPathError(CheckpointError):
    """A path that is none of the accepted checkpoint forms (the message says which are)."""


@dataclass(frozen=True)
class CheckpointSource:
    """What to read for a user-given checkpoint path.

    ``kind``: ``"zero"`` (``path`` is a DeepSpeed tag directory, ``step_XXXXXXX``) or
    ``"weights"`` (``path`` is a ``.safetensors``/``.pth``/``.pt``/``.bin`` file).
    """

    kind: Literal["zero", "weights"]
    path: Path
    given: str

    @property
    def is_zero(self) -> bool:
        """True for a DeepSpeed ZeRO tag directory."""
        return self.kind == "zero"


def is_staging(name: str) -> bool:
    """True for a folder a save is writing (or has abandoned): not a checkpoint."""
    return STAGING in name


def latest_tag(directory: Path, tag: str) -> str:
    """The tag that ``directory/latest`` holding ``tag`` means. ``latest`` names a staging
    folder only while rank 0 swaps a new checkpoint over an older one of the same step;
    when that folder is gone it was renamed to its step's own name (rank 0 died before
    rewriting ``latest``), which is where the checkpoint now is."""
    if is_staging(tag) and not (directory / tag).is_dir():
        return tag.split(STAGING)[0]
    return tag


def _fail(given: str | Path, why: str, accepted: str = ACCEPTED) -> CheckpointPathError:
    return CheckpointPathError(f"{given}: {why}; give {accepted}")


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(p.name.endswith(MODEL_STATES_SUFFIX) for p in path.iterdir())


def _follow_latest(latest: Path, given: str, accepted: str) -> Path:
    """The tag directory a ``latest`` file names (relative to the file's directory)."""
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(given, f"cannot read {latest} ({err})", accepted) from None
    if not tag or "\n" in tag or "/" in tag:
        raise _fail(given, f"{latest} does not hold a checkpoint tag (got {tag[:40]!r})",
                    accepted)
    tag = latest_tag(latest.parent, tag)
    step = latest.parent / tag
    where = "" if Path(given).expanduser() == latest else f"{given}: "
    if not step.is_dir():
        raise CheckpointPathError(f"{where}{latest} names tag {tag!r} but {step} does not "
                                  "exist (an incomplete or moved checkpoint)")
    if not _is_tag_dir(step):
        raise CheckpointPathError(f"{where}{step} holds no *{MODEL_STATES_SUFFIX} file (an "
                                  "incomplete checkpoint)")
    return step


def _resolve_dir(path: Path, given: str, accepted: str) -> Path:
    if is_staging(path.name):
        raise CheckpointPathError(
            f"{given}: a staging folder (a save in progress, or one that died before it was "
            f"complete); give a step_* directory or the run directory")
    if _is_tag_dir(path):
        return path
    for root in (path, path / CHECKPOINTS_DIR):  # a checkpoints dir, or a run dir above it
        if (root / LATEST).is_file():
            return _follow_latest(root / LATEST, given, accepted)
    for root in (path, path / CHECKPOINTS_DIR):
        steps = sorted(p.name for p in root.glob("step_*")
                       if p.is_dir() and not is_staging(p.name)) if root.is_dir() else []
        if steps:
            raise CheckpointPathError(
                f"{given}: no complete checkpoint: {root} has {', '.join(steps[-3:])} but no "
                f"'{LATEST}' file (written only once a checkpoint is complete); give a step_* "
                "directory to use one anyway")
    raise _fail(given, "a directory without a checkpoint (no 'latest' file, no step_* "
                       f"directory, no *{MODEL_STATES_SUFFIX} file)", accepted)


def resolve_checkpoint(path: str | Path, accepted: str = ACCEPTED) -> CheckpointSource:
    """Map any accepted checkpoint path to the ZeRO tag directory or weights file to read.

    Accepted: a run directory (``RUN``), ``RUN/checkpoints``, ``RUN/checkpoints/latest``, a
    ``step_*`` tag directory (or a ``*_model_states.pt`` file inside one), a released
    ``.pth``/``.pt``/``.bin`` or a ``.safetensors`` file. Anything else raises
    :class:`CheckpointPathError` with one line naming what is accepted: ``accepted``, the
    caller's wording of it (:data:`RESUMABLE`, or :data:`RESUMABLE_OR_INIT` for
    fine-tuning, for ``--resume``, which refuses a weights file: suggesting one there led
    to a second refusal).
    """
    given = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise _fail(given, "not found", accepted)
    if path.is_dir():
        return CheckpointSource("zero", _resolve_dir(path, given, accepted), given)
    if path.name == LATEST:
        return CheckpointSource("zero", _follow_latest(path, given, accepted), given)
    if path.name.endswith(MODEL_STATES_SUFFIX):  # a file inside a tag directory
        return CheckpointSource("zero", _resolve_dir(path.parent, given, accepted), given)
    if path.suffix in WEIGHT_SUFFIXES:
        return CheckpointSource("weights", path, given)
    raise _fail(given, f"not a checkpoint file (suffix {path.suffix or 'none'!r})", accepted)
