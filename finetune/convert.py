"""Checkpoint conversion: DeepSpeed ZeRO checkpoint (a run dir, ``checkpoints/``,
``checkpoints/latest`` or a ``step_*`` dir, resolved by ``runtime.checkpoint_path``) /
consolidated file / released ``.pth`` -> one safetensors file (backbone under the released
InternImage keys) or the released ``.pth`` layout.

Sources and where their InternImage trunk sits: a pre-training run under ``visual.`` (the
rest goes to ``pretrain.*``); a classification run, a released or converted file at the top
level; a detection or segmentation run under its task model's prefix (``model.backbone.``
for UperNet, ``backbone.body.`` for Mask R-CNN, ...), taken out to the released keys with
the task's head kept under ``task.<task>.*`` by the run's own names (``--format official``
leaves it out).

ZeRO shards are consolidated with DeepSpeed's own ``zero_to_fp32`` utilities in lazy mode:
the rank files are memory-mapped and each tensor is gathered on its own, so converting H
needs about one fp32 copy of the model in RAM (plus the mapped files), not one per rank.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import CheckpointError, read_state_dict
from models.checkpoint import PRETRAIN_PREFIX, TASK_PREFIX
from models.variants import InternImageSpec
from runtime.checkpoint import EMA_FILE, fsync_path, load_torch_file, read_latest
from runtime.checkpoint_path import resolve_checkpoint
from runtime.master_weights import read_master_weights

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "visual."  # M3IModel's image tower
# A tensor every InternImage has once (the stem's first conv): the text before it in a
# checkpoint's name is where the trunk sits in the model that was saved.
TRUNK_ANCHOR = "patch_embed.conv1.weight"
# Which task a trunk prefix comes from, for a source that does not record its task
# (a consolidated file, an earlier version's last.pt): the ends of the names each task
# model gives its trunk, with or without the engine's ``model.`` wrapper. First match wins.
TASK_TRUNKS = (("backbone.body.", "detection"),                # Mask R-CNN (InternImageFPN)
               ("detr.backbone.model.model.", "detection"),    # DINO
               ("pixel_level_module.encoder._backbone.model.", "segmentation"),  # Mask2Former
               ("backbone.", "segmentation"))                  # UperNet
FORMAT_TAG = "internimage-convert-v1"
# Architecture fields a fine-tuning run must copy to rebuild the same backbone.
ARCH_FIELDS = tuple(f for f in InternImageSpec.__dataclass_fields__
                    if f not in ("drop_path_rate", "extra"))
_STEP_DIR = re.compile(r"_model_states\.pt$")
_RANK_FILE = re.compile(r"_(model|optim)_states\.pt$")  # what zero_to_fp32 reads


@dataclass
class ConvertReport:
    """What a conversion wrote: counts, sizes and the provenance stored with it."""

    src: str
    dst: str
    format: str
    dtype: str
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    backbone_tensors: int = 0
    other_tensors: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {self.src} -> {self.dst} ({self.format}, {self.dtype})",
                 f"  tensors     {self.tensors} (backbone {self.backbone_tensors}, "
                 f"other {self.other_tensors})",
                 f"  parameters  {self.parameters:,}",
                 f"  bytes       {self.bytes:,} ({self.bytes / 2**20:.1f} MiB)"]
        meta = self.metadata
        if "task_backbone_prefix" in meta:  # say where a task run's two parts went
            head = ("left out" if self.format == "official"
                    else f"under {TASK_PREFIX}{meta['task']}.*")
            lines.append(f"  task        {meta['task']} (backbone from "
                         f"{meta['task_backbone_prefix']}*, head {head})")
        elif "task" in meta:
            lines.append(f"  task        {meta['task']}")
        for key in ("variant", "arch", "step", "config_hash"):
            if key in meta:
                lines.append(f"  {key:<11} {meta[key]}")
        return "\n".join(lines)


def _torch_load(path: Path) -> dict:
    """One DeepSpeed rank file, its tensors memory-mapped (not read). A file torch cannot
    open (truncated by an interrupted copy or a full disk, corrupt) is a ``CheckpointError``
    naming it, as a damaged ``.pth`` is (``read_source``): torch's own error names no file."""
    try:
        # DeepSpeed's own files pickle config objects; they are the user's own checkpoint.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises RuntimeError, pickle/EOF errors, ... for damage
        raise CheckpointError(f"cannot read {path} (a rank file of a DeepSpeed checkpoint, "
                              f"damaged or truncated?): {_reason(err)}") from err


def check_complete(step_dir: Path) -> tuple[int, int]:
    """(ZeRO stage, data-parallel world size) of a tag dir; raise naming missing rank files."""
    model_files = sorted(p for p in step_dir.iterdir() if _STEP_DIR.search(p.name))
    if not model_files:
        raise CheckpointError(f"{step_dir}: no *_model_states.pt file (incomplete checkpoint)")
    states = _torch_load(model_files[0])
    world = int(states.get("dp_world_size", 1))
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    names = {p.name for p in step_dir.iterdir()}
    missing = []
    for rank in range(world):
        if stage == 3 and f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" not in names:
            missing.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        if stage >= 1:
            optim = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            # bf16 runs prefix the optimizer shards with "bf16_"
            if optim not in names and f"bf16_{optim}" not in names:
                missing.append(optim)
    if missing:
        raise CheckpointError(
            f"{step_dir} is incomplete: ZeRO-{stage} checkpoint of {world} ranks is missing "
            f"{len(missing)} file(s): {', '.join(missing)}")
    if stage >= 1:
        # DeepSpeed's zero_to_fp32 reads every rank file and its errors name none of them:
        # open each here first (tensors memory-mapped, so this costs the pickles only) so a
        # damaged one is named. A stage-0 checkpoint is its one model file, read above.
        for path in sorted(step_dir.iterdir()):
            if path != model_files[0] and _RANK_FILE.search(path.name):
                _torch_load(path)
    return stage, world


def read_zero_checkpoint(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Consolidated fp32 state_dict of a ZeRO tag directory and its provenance metadata.
    A folder that goes while it is read (the live run that wrote it pruned it: a run
    keeps its newest checkpoints only) is a ``CheckpointError`` saying so."""
    try:
        return _read_zero_checkpoint(step_dir)
    except FileNotFoundError as err:
        if step_dir.is_dir():
            raise
        newest = read_latest(step_dir.parent)
        kept = f" (latest: {step_dir.parent / newest})" if newest else ""
        raise CheckpointError(
            f"{step_dir} was removed while it was read: the run that wrote it deletes all "
            "but its newest checkpoints as it saves new ones (pre-training: run.keep_last); "
            f"read one it keeps{kept}, or copy the folder first") from err


def _read_zero_checkpoint(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from deepspeed.utils import zero_to_fp32

    stage, world = check_complete(step_dir)
    if stage == 0:
        model_file = next(p for p in step_dir.iterdir() if _STEP_DIR.search(p.name))
        state = _stage0_state(model_file)
    else:
        lazy = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
        # one tensor gathered at a time from the memory-mapped rank shards
        state = {name: t.contiguous() for name, t in lazy.items()}
    meta = run_metadata(step_dir)
    meta.update({"zero_stage": str(stage), "zero_world_size": str(world)})
    return state, meta


def _stage0_state(model_file: Path) -> dict[str, torch.Tensor]:
    """A stage-0 checkpoint's weights in fp32: the fp32 masters where a 16-bit run kept
    them (runtime/master_weights.py), the module's tensors for the rest (buffers, frozen
    weights) and for an fp32 run."""
    states = _torch_load(model_file)
    module = states["module"]
    try:
        masters = read_master_weights(states)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{model_file}: its fp32 master weights do not fit the module's "
                              f"({type(err).__name__}: {err})") from err
    sixteen_bit = [k for k, v in module.items()
                   if v.is_floating_point() and v.dtype != torch.float32]
    if masters is None and sixteen_bit:
        log.warning("%s holds 16-bit weights (%d tensors, e.g. %s) and no names for its fp32 "
                    "masters (a checkpoint saved before they were recorded): converted from "
                    "the 16-bit weights, each up to half a bf16 ulp off its master",
                    model_file, len(sixteen_bit), sixteen_bit[0])
    masters = masters or {}
    return {k: masters[k] if k in masters else (v.float() if v.is_floating_point() else v)
            for k, v in module.items()}


def run_metadata(step_dir: Path) -> dict[str, str]:
    """Step, config hash, variant and arch overrides from the run's trainer state/config."""
    import yaml

    meta: dict[str, str] = {"source_tag": step_dir.name}
    trainer_state = step_dir / "trainer_state.json"
    if trainer_state.is_file():
        state = json.loads(trainer_state.read_text())
        # ``task``: fine-tuning runs record it (finetune/loop.py); a pre-training run does not
        for key in ("step", "config_hash", "task"):
            if key in state:
                meta[key] = str(state[key])
    for cfg_path in (step_dir.parent.parent / "config.yaml", step_dir.parent / "config.yaml"):
        if cfg_path.is_file():
            model = (yaml.safe_load(cfg_path.read_text()) or {}).get("model") or {}
            if model.get("name"):
                from models import resolve_variant

                meta["variant"] = resolve_variant(model["name"])
            arch = {k: v for k, v in model.items() if k in ARCH_FIELDS and v is not None}
            meta["arch"] = json.dumps(arch, sort_keys=True)
            break
    return meta


# ---------------------------------------------------------------- reading any source
def _reason(err: BaseException) -> str:
    """One line of why a file could not be read: torch's weights-only errors run to many
    lines of advice, the reason follows 'WeightsUnpickler error:'."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


WEIGHTS = ("model", "ema")  # what a source's weights are read from: the model's, its EMA


def read_ema(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A classification checkpoint's EMA weights (``ema.pt``, the released code's
    ``model_ema``: what ``top1_ema`` evaluated and ``best_ema.json`` picks) and the
    checkpoint's metadata (``weights: ema``)."""
    path = step_dir / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{step_dir} holds no EMA weights ({EMA_FILE}): only a "
                              "classification run with ema.enabled saves them")
    try:
        state = load_torch_file(path)
    except Exception as err:  # noqa: BLE001 - a damaged file: named in one line
        raise CheckpointError(f"cannot read {path}: {_reason(err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, run_metadata(step_dir) | {"weights": "ema"}


def read_source(src: str | Path, weights: str = "model"
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Any accepted source as (state_dict, metadata): see ``runtime.checkpoint_path`` for
    the accepted forms (a run dir, ``checkpoints/``, ``checkpoints/latest``, a ``step_*``
    dir, a released ``.pth``, a ``.safetensors`` file). ``weights="ema"``: a run's
    checkpoint's EMA weights instead (:func:`read_ema`; a file is refused)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    source = resolve_checkpoint(src)
    if weights == "ema":
        if not source.is_zero:
            raise CheckpointError(f"--weights ema reads a run's checkpoint (its {EMA_FILE}); "
                                  f"{source.path} is a weights file")
        return read_ema(source.path)
    if source.is_zero:
        return read_zero_checkpoint(source.path)
    src = source.path
    try:
        state = read_state_dict(src)
    except CheckpointError as err:
        if err.__cause__ is None:  # our own one-line message
            raise
        raise CheckpointError(f"cannot read {src} as a torch weights file (as torch.save "
                              f"writes): {_reason(err.__cause__)}") from err
    except Exception as err:  # safetensors' own error types for a file that is not one
        raise CheckpointError(f"cannot read {src} as a .safetensors file: "
                              f"{_reason(err)}") from err
    meta: dict[str, str] = {}
    if src.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            meta = dict(f.metadata() or {})
    return state, meta


def read_metadata(src: str | Path) -> dict[str, str]:
    """The metadata :func:`read_source` gives ``src``, read without its tensors (a run's
    trainer state and config, a ``.safetensors`` header); empty for a file that records
    none (a released ``.pth``) or that cannot be read (the loader reports on it)."""
    source = resolve_checkpoint(src)
    if source.is_zero:
        return run_metadata(source.path)
    if source.path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(source.path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file: read_source says why
        return {}


def trunk_prefix(state: dict[str, torch.Tensor], task: str | None = None) -> tuple[str, str]:
    """(where the InternImage trunk sits in ``state``'s names, the task that put it there).

    ``""`` for a released, converted or classification state (the trunk at the top level)
    and for a state without a trunk; a detection/segmentation state gives its task model's
    prefix and ``task`` (as its run recorded it), else the task ``TASK_TRUNKS`` names, else
    ``"unknown"``. Already converted ``pretrain.*``/``task.*`` tensors are not looked at.
    """
    prefixes = sorted({k[:-len(TRUNK_ANCHOR)] for k in state if k.endswith(TRUNK_ANCHOR)
                       and not k.startswith((PRETRAIN_PREFIX, TASK_PREFIX))})
    if len(prefixes) > 1:
        # two trunks (say a model and a copy of it): which one is meant is not ours to guess
        raise CheckpointError(f"the checkpoint holds {len(prefixes)} InternImage trunks, "
                              f"under {', '.join(repr(p) for p in prefixes)}; expected one")
    prefix = prefixes[0] if prefixes else ""
    if not prefix:
        return "", ""
    named = next((name for end, name in TASK_TRUNKS if prefix.endswith(end)), "unknown")
    return prefix, task or named


def split_state(state: dict[str, torch.Tensor], meta: dict[str, str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(backbone under released keys, everything else under ``pretrain.``/``task.<task>.``,
    ``meta`` plus, for a detection/segmentation source, its ``task`` and
    ``task_backbone_prefix``: what ``--init`` reports).

    A pre-training state has its backbone under ``visual.``; a detection/segmentation state
    under its task model's prefix (``trunk_prefix``; the task as its run recorded it in
    ``meta``), the rest of it is the task's head; a released, converted or classification
    state already uses the released keys (and converted files keep ``pretrain.*``/``task.*``
    as they are).
    """
    if any(k.startswith(BACKBONE_PREFIX) for k in state):
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items()
                    if k.startswith(BACKBONE_PREFIX)}
        other = {PRETRAIN_PREFIX + k: v for k, v in state.items()
                 if not k.startswith(BACKBONE_PREFIX)}
        return backbone, other, meta
    prefix, task = trunk_prefix(state, meta.get("task"))
    if prefix:
        backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        head = f"{TASK_PREFIX}{task}."
        other = {head + k: v for k, v in state.items() if not k.startswith(prefix)}
        return backbone, other, {**meta, "task": task, "task_backbone_prefix": prefix}
    converted = (PRETRAIN_PREFIX, TASK_PREFIX)
    backbone = {k: v for k, v in state.items() if not k.startswith(converted)}
    other = {k: v for k, v in state.items() if k.startswith(converted)}
    return backbone, other, meta


def split_source(src: str | Path, weights: str = "model"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Any accepted source (:func:`read_source`, its ``weights``) split by
    :func:`split_state`; refused when it holds no InternImage backbone."""
    state, meta = read_source(src, weights)
    backbone, other, meta = split_state(state, meta)
    if not backbone:
        raise CheckpointError(f"{src} holds no InternImage backbone weights")
    return backbone, other, meta


def read_backbone(src: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Backbone weights (released keys) and metadata from any accepted source."""
    backbone, _, meta = split_source(src)
    return backbone, meta


# ---------------------------------------------------------------- writing
def _own_storages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor filling a storage of its own, as safetensors requires
    (it refuses shared or partial storage). Only views and tensors sharing a storage are
    copied: cloning every tensor doubled the peak memory of a conversion (about 4.4 GB
    more for InternImage-H in fp32)."""
    out, seen = {}, set()
    for key, value in state.items():
        storage = value.untyped_storage()
        whole = (value.is_contiguous() and value.storage_offset() == 0
                 and storage.nbytes() == value.numel() * value.element_size())
        if not whole or storage.data_ptr() in seen:
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


# The destination suffixes each format may be written to: every reader (read_source, --init,
# models.load_pretrained) picks the format by the suffix alone (runtime.checkpoint_path)
FORMAT_SUFFIXES = {"safetensors": (".safetensors",), "official": (".pth", ".pt", ".bin")}


def check_destination(dst: str | Path, fmt: str) -> None:
    """Refuse a ``dst`` that cannot be written (an existing directory, a path under a
    file: a ``CheckpointError`` naming what is in the way), or whose suffix the readers
    would take for another format than ``fmt`` writes (safetensors bytes in a ``.pth``, a
    torch zip in a ``.safetensors``), or that no reader takes at all: a
    ``CheckpointError`` naming the suffix, the format and the suffixes accepted for it."""
    # where the final rename cannot put a file: found out before, not after, the
    # conversion (minutes for InternImage-H; it ended in an IsADirectoryError or
    # FileExistsError traceback). An existing file is replaced; missing folders are made.
    path = Path(dst).absolute()
    if path.is_dir():
        raise CheckpointError(f"{dst} is a directory: name the file to write in it")
    for folder in path.parents:
        if folder.is_dir():
            break  # the folders above a directory are directories
        if os.path.lexists(folder):  # a file (or a broken link) where a folder must be
            raise CheckpointError(f"{dst} cannot be written: {folder} is not a directory")
    suffix, accepted = Path(dst).suffix, FORMAT_SUFFIXES[fmt]
    if suffix in accepted:
        return
    names, named = "/".join(accepted), Path(dst).with_suffix(accepted[0]).name
    other = next((f for f, ends in FORMAT_SUFFIXES.items() if suffix in ends), None)
    if other is not None:
        raise CheckpointError(
            f"{dst}: --format {fmt} writes a {names} file, but a {suffix} file is read as "
            f"--format {other} writes it: name it {named} or pass --format {other}")
    what = f"{suffix} files" if suffix else "files without a suffix"
    raise CheckpointError(f"{dst}: --init and convert do not read {what}: --format {fmt} "
                          f"writes a {names} file (name it {named})")


def _umask() -> int:
    """The process's umask, read without changing it (Linux 4.7+ reports it in
    /proc/self/status; elsewhere set and restored, which another thread could race)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TMP_TAG = ".tmp-"
"""Between a destination's name and its writer's host, PID and a random token in the
temporary file's name (``.out.safetensors.tmp-HOST-PID-TOKEN``): a later convert to the
same destination removes what a killed one left (:func:`remove_abandoned`); the token
keeps two writers apart whose host name and PID agree (containers sharing a host name,
each its own PID namespace)."""


ABANDONED_AFTER_S = 600.0
"""How long a dead writer's temporary file must have been left unchanged before a later
convert removes it (:func:`remove_abandoned`)."""


def _temporary(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}{TMP_TAG}{socket.gethostname()}-{os.getpid()}-"
                         f"{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned(dst: Path) -> list[Path]:
    """Remove the temporary files of earlier converts to ``dst`` that were killed
    (SIGKILL, the OOM killer: no cleanup ran) on this host, whose PID runs no longer and
    which nothing wrote for :data:`ABANDONED_AFTER_S`; returns them. Another host's, or a
    running process's (a convert to the same destination beside this one), are left
    alone: this host cannot tell whether they still write. The quiet time covers a
    writer in another PID namespace under the same host name (a container), whose PID
    this process cannot see: a live writer's file changes as it is written, then is
    renamed away."""
    prefix = f".{dst.name}{TMP_TAG}{socket.gethostname()}-"
    removed = []
    for path in dst.parent.glob(f".{glob.escape(dst.name)}{TMP_TAG}*"):
        pid = path.name[len(prefix):].split("-")[0] if path.name.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            quiet = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        if quiet >= ABANDONED_AFTER_S:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _write_atomically(dst: Path, out: dict[str, torch.Tensor], fmt: str,
                      meta: dict[str, str]) -> None:
    """Write ``out`` to ``dst`` through a temporary file beside it, renamed into place
    once complete: a convert killed or failing mid-write (an H export is 4 GB) leaves
    ``dst`` as it was (a previous export, or nothing), never a truncated file an ``--init``
    then reads. The file gets the mode the umask gives (safetensors' writer creates
    0600 files: unreadable by the group on a shared filesystem). An error or SIGTERM
    (``internimage convert`` turns it into SystemExit) removes the temporary file; what
    a SIGKILL leaves, the next convert to ``dst`` removes (:func:`remove_abandoned`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for path in remove_abandoned(dst):
        log.warning("removed %s, left by a convert that was killed while writing", path)
    tmp = _temporary(dst)
    try:
        if fmt == "official":
            # under 'model', as every released classification loader reads it
            # (classification/utils.py load_checkpoint, export.py, huggingface/convert.py:
            # checkpoint['model']); load_pretrained and the det/seg backbones' init_weights
            # take it too (they unwrap 'model' or 'state_dict', else the plain dict)
            torch.save({"model": out}, tmp)
        else:
            from safetensors.torch import save_file

            save_file(out, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        # on disk before it takes the final name, and the name after: a node crash soon
        # after a convert then never leaves an empty or truncated file under ``dst``
        fsync_path(tmp)
        os.replace(tmp, dst)
        fsync_path(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def convert(src: str | Path, dst: str | Path, fmt: str = "safetensors",
            dtype: str = "fp32", weights: str = "model") -> ConvertReport:
    """Convert ``src`` into ``dst``; see the module docstring. Returns what was written.
    A ``dst`` whose suffix is not ``fmt``'s is refused before ``src`` is read
    (:func:`check_destination`). ``weights="ema"``: a classification checkpoint's EMA
    weights (:func:`read_ema`)."""
    if fmt not in ("safetensors", "official"):
        raise ValueError(f"format must be 'safetensors' or 'official', got {fmt!r}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    # before the source is read: consolidating a large ZeRO run takes minutes
    check_destination(dst, fmt)
    backbone, other, meta = split_source(src, weights)
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    out = backbone if fmt == "official" else {**backbone, **other}
    out = _own_storages({k: v.to(target) if v.is_floating_point() else v
                         for k, v in out.items()})
    meta = {**meta, "format": FORMAT_TAG, "dtype": dtype, "source": str(src)}
    dst = Path(dst)
    _write_atomically(dst, out, fmt, meta)
    report = ConvertReport(
        src=str(src), dst=str(dst), format=fmt, dtype=dtype, tensors=len(out),
        parameters=sum(v.numel() for v in out.values()),
        bytes=sum(v.numel() * v.element_size() for v in out.values()),
        backbone_tensors=len(backbone), other_tensors=len(out) - len(backbone), metadata=meta)
    log.debug("%s", report)  # the CLI prints it
    return report
