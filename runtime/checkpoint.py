"""Checkpoints that are never lost: DeepSpeed's shards plus our trainer state, with a
``latest`` pointer that only ever names a complete checkpoint. One format and one resume
resolver for pre-training and every DeepSpeed fine-tuning run.

Layout under ``RUN/checkpoints/``: ``step_XXXXXXX/`` (DeepSpeed's files from every rank,
each rank's own state in ``rank_states/<rank>.json``, then ``trainer_state.json`` written
by rank 0 once all ranks are done) and ``latest``, a text file with the tag (DeepSpeed's
own convention, so ``engine.load_checkpoint`` and ``zero_to_fp32`` read it too), replaced
atomically after the checkpoint is complete.

Per-rank state (RNG, data position: ~30 KB a rank) lives in one file per rank, so a save
and a same-size resume cost each rank O(1), not O(world size): ``trainer_state.json``
holds the shared state only (step, hashes, samples seen, world size; ``rank_states``: how
many rank files there are). A resume on the same world size reads this rank's file alone;
a resize reads them all (the data re-deal needs every old rank's position). Checkpoints
written before rank files (every rank's state inside ``trainer_state.json``, under
``ranks``) are read as before: :func:`load_rank_state` and :func:`load_rank_states` serve
both layouts.

A save never writes into a ``step_*`` folder: every rank writes into a staging folder,
``step_XXXXXXX.tmp-<token>`` (rank 0's random token, so a crashed earlier attempt's files
never mix in), which rank 0 renames into place once it is complete. The same step may
already have a folder: one of a branch the run abandoned (it was resumed from an earlier
checkpoint) or of a save that crashed after its rename; ``latest`` may name it. That one is
replaced only after the new one is complete, with ``latest`` naming the new one (under its
staging name) while the two are swapped, so ``latest`` never names anything incomplete.

Lineage: the checkpoint just saved is the newest of the run. Checkpoints of higher steps
belong to a branch the run abandoned when it was resumed from an earlier one; they are
deleted once the first checkpoint of the new branch is complete (until then, a rewind can
still be undone by resuming from them), and never count among the ``keep_last`` kept.

Deletion is off the critical path: rank 0 renames each folder that goes
(:func:`prune`, and an abandoned same-step checkpoint swapped out by a save) to
``deleting.tmp-<token>-<name>``, one atomic ``os.replace`` each, and a background thread
deletes it. Such a name is never a checkpoint: it does not match ``step_*``, so no
listing, resolver or ``latest`` sees it, and it contains ``.tmp-``, so a path given by hand
is refused as a staging folder. A deletion cut short (a crash, a kill) leaves such a
folder, never a half-deleted ``step_*`` one that looks complete; the next prune, or the
next start of the run (:func:`clear_leftovers`: a run that never saves again), finishes it.

What a save costs. Every rank: writing its DeepSpeed files and its rank file, one
broadcast of rank 0's step and 8-character staging token (each rank receives one; it was
an all-gather, every rank's token sent to every rank), one all-reduce of a flag (a rank at
another step), a barrier, and a broadcast of rank 0's
outcome (None, or its refusal: every rank raises it). Rank 0, between the barrier and the
broadcast: its side files, ``trainer_state.json``, the lock read once more, the publish
(renames and ``latest`` writes) and prune's decisions and renames, one metadata operation
per folder that goes,
whatever it holds. Unlinking those folders' files (an InternImage-H ZeRO-3 checkpoint at
512 ranks: ~1,024 files, ~13 GB of optimizer state; seconds on Lustre) is left to rank 0's
deletion thread, which starts on them as prune queues them and goes on while every rank
trains. At most one save's deletions are outstanding: a save whose predecessor's are not
done yet (a filesystem that cannot delete a checkpoint in a checkpoint interval) waits
for them before the broadcast, once its checkpoint is published, holding every rank as
every save did before, so checkpoints never pile up (a wait longer than the process
group's timeout fails the other ranks in the broadcast; the checkpoint is complete).
The thread is not a daemon and ends when it has nothing left: a normal exit waits for the
deletions already decided (the files go with the run), a kill leaves them to the next
prune.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError
from runtime.checkpoint_path import (
    LATEST,
    RESUMABLE,
    RESUMABLE_OR_INIT,
    STAGING,
    CheckpointPathError,
    is_staging,
    latest_tag,
    resolve_checkpoint,
)
from runtime.dist import (
    DistInfo,
    MainRankLostError,
    all_gather_objects,
    any_rank,
    barrier,
    broadcast_object,
    group_timeout,
)
from runtime.master_weights import MASTER_NAMES, master_names
from runtime.run_layout import SAVED_AT, TRAINER_STATE
from runtime.run_lock import RunLockError, lost_message

log = logging.getLogger(__name__)

RANK_STATES = "rank_states"  # a checkpoint's folder of per-rank state files
BEST = "best.json"  # the checkpoint whose evaluation scored best (runtime/best.py)
BEST_EMA = "best_ema.json"  # the one whose EMA weights scored best (classification)
BEST_POINTERS = (BEST, BEST_EMA)  # every pointer prune reads
EMA_FILE = "ema.pt"  # a classification run's EMA weights (rank 0 saves it), a full state_dict
CONFIG = "config.yaml"  # the resolved config a run directory's run started with
PENDING_CONFIG = ".config.yaml.pending"  # + this process's host and PID (_pending_config)


class ResumeError(CheckpointError):
    """A checkpoint that cannot be resumed under the current config or world size (a
    ``CheckpointError``: the command line reports it in one line, without a traceback)."""


class CheckpointSaveError(CheckpointError):
    """A save that failed writing its files (a full disk, a quota): ``latest`` still
    names the last complete checkpoint; reported in one line, with the room there is."""


def agree_on_refusal(refusal: CheckpointError | None) -> None:
    """Collective, right after a start's resume checks, before anything else collective:
    every rank passes its own refusal (None: its checks passed); a refusal on any rank is
    then raised on every rank (its own on a refusing rank; on the others a
    :class:`ResumeError` naming the first refusing rank and its message).

    Why: the checks read the same shared files, so the ranks refuse alike, each at once.
    Rank 0, which hosts the rendezvous store, could then exit while a slower rank was
    still inside the process group's set-up; that rank died of "Connection reset by peer"
    with a traceback in its log instead of the one-line refusal. Here no rank returns or
    raises before every rank has finished the set-up and its checks. Cost: one all-gather
    of ``None`` per rank at start (the message only where a rank refused)."""
    outcomes = all_gather_objects(None if refusal is None else str(refusal))
    if refusal is not None:
        raise refusal
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message]
    if failed:
        rank, message = failed[0]
        raise ResumeError(f"rank {rank} of {len(outcomes)} refused the resume: {message}")


def ranks_text(n: int) -> str:
    """``n`` ranks in words: "1 rank", "2 ranks" (a message said "resume with 1 ranks")."""
    return f"{n} rank" if n == 1 else f"{n} ranks"


def tag_for(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def fsync_path(path: Path) -> None:
    """Flush ``path`` to disk: a file's data, or a folder's entries (the names created,
    renamed or removed in it). The one place this module makes something durable.

    Why: a write, a ``torch.save`` or a rename that returned may sit in the node's page
    cache (or a Lustre/NFS client's cache) for seconds; a node that crashes then loses
    it, and a ``latest`` written after it could name a checkpoint whose files never
    reached the disk. On a parallel filesystem an fsync flushes the calling client's
    cache only: each rank flushes what it wrote itself."""
    fd = os.open(path, os.O_RDONLY)  # Linux fsyncs through a read-only descriptor too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write ``path`` atomically and durably: ``write(f)`` fills a hidden temporary file
    opened with ``mode``, which is fsynced, renamed over ``path``, and the folder fsynced
    (the rename too survives a node crash)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _atomic_write(path: Path, text: str) -> None:
    _durable_write(path, lambda f: f.write(text), "w")


# The tags the best pointers named at this process's last prune of each run (rank 0):
# what a prune keeps when the pointers cannot be read (see prune)
_LAST_BEST_TAGS: dict[Path, set[str]] = {}


def record_best(root: Path, best: dict[str, Any], pointer: str = BEST) -> None:
    """Rank 0: point ``root``'s ``pointer`` (one of :data:`BEST_POINTERS`) at the best
    checkpoint (``best["tag"]``; and ``best["pending"]["tag"]`` while it is saved),
    atomically and durably; :func:`prune` keeps what it names (runtime/best.py)."""
    root.mkdir(parents=True, exist_ok=True)  # a run's first save may be its first best
    _atomic_write(root / pointer, json.dumps(best) + "\n")
    known = _LAST_BEST_TAGS.get(root.resolve())
    if known is not None:  # what a prune keeps while the pointers cannot be read
        entries = (best, best.get("pending"))
        known |= {e["tag"] for e in entries if isinstance(e, dict)
                  and isinstance(e.get("tag"), str) and _is_tag(e["tag"])}


def read_best(root: Path, pointer: str = BEST) -> dict[str, Any] | None:
    """What ``root``'s ``pointer`` holds, or None (none, or not a JSON object). A read that
    fails (an ``OSError`` other than a missing file: EIO, ESTALE, a FUSE mount's hiccup)
    is raised: taken for "no best", it would have a prune delete the best checkpoint and
    a resume forget it (its first evaluation then "improving" on nothing)."""
    try:
        best = json.loads((root / pointer).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # not UTF-8, not JSON: written atomically, so damaged for good
        log.warning("%s is not JSON: taken as no best checkpoint", root / pointer)
        return None
    return best if isinstance(best, dict) else None


def _best_tags(root: Path) -> set[str]:
    """The tags :data:`BEST_POINTERS` name: each best and a pending one (runtime/best.py)."""
    entries: list[Any] = []
    for pointer in BEST_POINTERS:
        best = read_best(root, pointer)
        entries += [best, best.get("pending")] if best is not None else []
    tags = {e.get("tag") for e in entries if isinstance(e, dict)}
    return {t for t in tags if isinstance(t, str) and _is_tag(t)}


def save_torch_file(path: Path, obj: Any) -> None:
    """``torch.save`` atomically and durably (a side file of a checkpoint, e.g. an EMA's
    weights): a crash mid-write never leaves half a file under the final name, and a
    node crash after it returns does not lose it (it is fsynced, as the folder)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    _durable_write(path, lambda f: torch.save(obj, f), "wb")


def _deepspeed_files(engine, root: Path, tag: str) -> list[Path]:
    """The files ``engine.save_checkpoint(root, tag=tag)`` wrote on this rank, named as
    DeepSpeed (0.19.8) names them, by its own functions (deepspeed/runtime/engine.py):

    - ``_get_ckpt_name`` when the rank writes model states (``save_non_zero_checkpoint``):
      ZeRO-3, every rank its ``zero_pp_rank_R_mp_rank_00_model_states.pt``; ZeRO 0-2,
      data-parallel rank 0 alone ``mp_rank_00_model_states.pt`` (the whole module, and
      at ZeRO-0 the optimizer);
    - ``_get_zero_ckpt_name`` when it writes ZeRO optimizer state (``save_zero_checkpoint``,
      ZeRO 1-3): every rank its ``zero_pp_rank_R_mp_rank_00_optim_states.pt``, prefixed
      ``bf16_`` for a bf16 engine.

    Measured on 2 ranks at every stage in fp32 and bf16: exactly the files of the tag's
    folder (the recovery scripts DeepSpeed copies, ``zero_to_fp32.py``, go beside it, into
    ``root``: not part of a checkpoint). An object without these attributes (a test's
    stand-in engine) wrote nothing DeepSpeed names. Our models have no MoE layers (whose
    expert files DeepSpeed names otherwise)."""
    files = []
    if getattr(engine, "save_non_zero_checkpoint", False):
        files.append(Path(engine._get_ckpt_name(str(root), tag)))
    if getattr(engine, "save_zero_checkpoint", False):
        files.append(Path(engine._get_zero_ckpt_name(str(root), tag)))
    return files


def load_torch_file(path: Path, mmap: bool = False) -> Any:
    """A file written by :func:`save_torch_file` (the run's own file: trusted); ``mmap``:
    its tensors mapped from the file, not read (a peek at a file that may hold GBs)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def write_trainer_state(ckpt_dir: Path, state: dict[str, Any]) -> None:
    """Rank 0 writes the shared trainer state into a checkpoint directory (last: its
    presence marks the checkpoint complete)."""
    _atomic_write(ckpt_dir / TRAINER_STATE, json.dumps(state))


def rank_state_path(ckpt_dir: Path, rank: int) -> Path:
    """The file holding ``rank``'s own state in the checkpoint ``ckpt_dir``."""
    return ckpt_dir / RANK_STATES / f"{rank:05d}.json"


def write_rank_state(ckpt_dir: Path, rank: int, local_state: dict[str, Any]) -> None:
    """Every rank writes its own state (RNG, data position) into a checkpoint directory."""
    path = rank_state_path(ckpt_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(local_state))


def saved_ranks(state: dict[str, Any]) -> int:
    """How many ranks' own states the checkpoint whose trainer state is ``state`` holds."""
    if "ranks" in state:  # written before rank files: every rank's inside the shared file
        return len(state["ranks"])
    return int(state[RANK_STATES])


def load_rank_state(ckpt_dir: Path, state: dict[str, Any], rank: int) -> dict[str, Any]:
    """``rank``'s own state as saved in ``ckpt_dir`` (``state``: its trainer state): one
    small file read, whatever the world size."""
    if "ranks" in state:  # written before rank files: already parsed with the shared state
        return state["ranks"][rank]
    path = rank_state_path(ckpt_dir, rank)
    if not path.is_file():
        raise ResumeError(f"{ckpt_dir} is not a complete checkpoint: {path.relative_to(ckpt_dir)}"
                          f" missing (saved by {ranks_text(saved_ranks(state))})")
    return _read_json(path, ckpt_dir)


def _read_json(path: Path, ckpt_dir: Path) -> dict[str, Any]:
    """A checkpoint's JSON state file, or a ResumeError naming it when it is damaged (the
    saves write them atomically: a file cut short by a full disk or a bad copy) or cannot
    be read (EIO, ESTALE: a refusal the ranks agree on, where a bare ``OSError`` was
    raised by one rank alone while the others waited for its agreement)."""
    try:
        state = json.loads(path.read_text())
    except OSError as err:
        raise ResumeError(f"{ckpt_dir}: {path.relative_to(ckpt_dir)} cannot be read "
                          f"({err})") from err
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        state, why = None, f"not JSON ({err})"
    else:  # JSON, but no state (a hand edit, a bad copy): every reader calls .get on it
        why = f"not a JSON object (a {type(state).__name__})"
    if not isinstance(state, dict):
        raise ResumeError(f"{ckpt_dir}: {path.relative_to(ckpt_dir)} is damaged, {why}; "
                          f"resume from an earlier checkpoint (--resume "
                          f"{ckpt_dir.parent}/step_...)")
    return state


def load_rank_states(ckpt_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every saved rank's own state, in rank order: O(saved world size) reads, for what
    needs them all (a data position re-dealt over another world size)."""
    return [load_rank_state(ckpt_dir, state, r) for r in range(saved_ranks(state))]


def save_checkpoint(engine, root: Path, step: int, local_state: dict[str, Any],
                    shared_state: dict[str, Any], info: DistInfo, keep_last: int,
                    client_state: dict[str, Any] | None = None,
                    side_files: dict[str, Any] | None = None) -> Path:
    """Save on all ranks; point ``latest`` at it only once everything is on disk.

    ``local_state`` differs per rank (RNG, data position): each rank writes its own file
    (:func:`rank_state_path`); ``shared_state`` is the same everywhere (step, config hash,
    samples seen): rank 0 writes it, with the number of rank files, into
    ``trainer_state.json``, last; ``client_state``: per-rank tensors
    stored in DeepSpeed's own files (the EMA teacher's slices), returned on load, plus,
    for a 16-bit engine without ZeRO, its fp32 masters' names (runtime/master_weights.py);
    ``side_files``: name -> object that rank 0 writes into the checkpoint with
    :func:`save_torch_file` (an EMA's weights). Returns the checkpoint's directory.
    """
    # every rank must write into the same folder: rank 0's step and token name it; none
    # when another job took the run directory over from this one (runtime/run_lock.py):
    # then no rank writes anything
    lost = lost_message(root.parent) if info.is_main else None
    named = broadcast_object(None if lost else (step, secrets.token_hex(4)))
    if named is None:
        raise RunLockError(lost or f"rank 0 refused to save into {root}: another job "
                           "took its run directory over")
    main_step, token = named
    # Ranks at different steps hold states that belong to no one checkpoint (a bug, or
    # ranks that resumed different checkpoints): every rank refuses, before any write.
    # DeepSpeed's own tag check (checkpoint.tag_validation) is an ``assert``, gone under
    # ``python -O``, and a traceback; one all-reduce of a flag a save.
    if any_rank(step != main_step, engine.device):
        mine = f"; this rank is at step {step}" if step != main_step else ""
        raise CheckpointSaveError(
            f"not saved: the ranks are at different steps (rank 0 at step {main_step}"
            f"{mine}), so their states belong to no one checkpoint; latest still names "
            f"{read_latest(root) or 'nothing'}. This is a bug: please report it with the "
            "run's log")
    tag = tag_for(step)
    staging = f"{tag}{STAGING}{token}"
    client_state = dict(client_state or {})
    names = master_names(engine)
    if names is not None:
        client_state[MASTER_NAMES] = names
    try:
        engine.save_checkpoint(str(root), tag=staging, save_latest=False,
                               client_state=client_state)
        # DeepSpeed's torch.save returns with the data perhaps still in this node's cache
        # (a node crash after rank 0 wrote ``latest`` would leave it naming truncated
        # shards): each rank fsyncs the files it wrote itself (on Lustre/NFS an fsync
        # flushes the calling client's cache only), in parallel: InternImage-H at 512
        # ranks, ~34 MB a rank. Then the folder, for the names this rank created in it.
        for path in _deepspeed_files(engine, root, staging):
            fsync_path(path)
        # Each rank's own file (rank 0 used to gather them all into trainer_state.json:
        # 16 MB built and dumped by rank 0, then parsed by every rank, at 512 ranks).
        write_rank_state(root / staging, info.rank, local_state)
        fsync_path(root / staging)
    except (OSError, RuntimeError) as err:
        if _is_collective_failure(err):
            raise
        raise CheckpointSaveError(_save_failure(root, tag, err)) from err
    # What lets rank 0 publish: a rank enters the barrier only once engine.save_checkpoint
    # has returned (its shards written) and its files are fsynced (its rank file renamed
    # into place), and no rank leaves it before every rank has entered; so rank 0 finds
    # every rank's files on disk. O(1) per rank, where the gather it replaces carried
    # every state to rank 0.
    barrier()
    others_waiting_since = time.monotonic()  # the others wait in the broadcast below from now
    failure: CheckpointError | None = None
    if info.is_main:
        try:
            _complete_and_publish(root, staging, tag, shared_state, side_files, info,
                                  keep_last, others_waiting_since)
        except (CheckpointSaveError, RunLockError) as err:
            failure = err
    # The others return once the checkpoint is published, or raise rank 0's refusal with
    # it in one line (in a barrier rank 0 never reached they waited until srun killed
    # them or the collective timed out, with a traceback)
    told = broadcast_object(None if failure is None
                            else (isinstance(failure, RunLockError), str(failure)))
    if failure is not None:
        raise failure
    if told is not None:
        lock_lost, message = told
        raise (RunLockError if lock_lost else CheckpointSaveError)(f"rank 0: {message}")
    return root / tag


def _complete_and_publish(root: Path, staging: str, tag: str, shared_state: dict[str, Any],
                          side_files: dict[str, Any] | None, info: DistInfo, keep_last: int,
                          others_waiting_since: float) -> None:
    """Rank 0's part of :func:`save_checkpoint` once every rank's files are on disk: its
    side files and ``trainer_state.json``, the publish and the prune. A failed write is a
    :class:`CheckpointSaveError`, a run taken over meanwhile a ``RunLockError``."""
    try:  # an EMA's weights are the last large write: a disk may fill here too
        for name, obj in (side_files or {}).items():
            save_torch_file(root / staging / name, obj)
        write_trainer_state(root / staging, shared_state | {
            RANK_STATES: info.world_size, SAVED_AT: time.time()})
    except OSError as err:
        raise CheckpointSaveError(_save_failure(root, tag, err)) from err
    # the lock once more before the publish (the writes above may take minutes): a job
    # that took the run over meanwhile keeps its ``latest``, and its saves in progress are
    # not pruned here as crashed ones
    lost = lost_message(root.parent)
    if lost:
        raise RunLockError(lost)
    # a swap an earlier rank 0 died in is finished first: else the prune below would take
    # the run's checkpoint (still under its staging name) for a crashed save
    swapped_out = finish_interrupted_swap(root) + _publish(root, staging, tag)
    # At most one save's deletions outstanding: a filesystem too slow to delete a
    # checkpoint in a checkpoint interval would otherwise pile up 13 GB a save. Waited for
    # once the new checkpoint is published: a stop request's save cut short here (its
    # grace period is a minute) has lost nothing.
    _wait_for_previous_deletions(others_waiting_since if info.world_size > 1 else None)
    _DELETER.add(swapped_out)
    # renames only: the files are deleted by rank 0's deletion thread, so the broadcast
    # that ends the save does not hold every rank while rank 0 unlinks a thousand files
    prune(root, keep_last, wait=False)


# what gloo's and NCCL's transport errors say when a peer is gone (torch raises them as a
# plain RuntimeError, e.g. gloo's "Connection closed by peer" in torch 2.14)
_PEER_LOST = ("closed by peer", "reset by peer", "gloo", "nccl", "timed out", "timeout")


def _is_collective_failure(err: BaseException) -> bool:
    """A failure of the process group (a rank lost, a collective timed out): not the
    save's writes or the checkpoint's files, reported as it is."""
    import torch.distributed as dist

    if isinstance(err, (dist.DistError, MainRankLostError)):
        return True
    return (isinstance(err, RuntimeError) and not isinstance(err, OSError)
            and any(s in str(err).lower() for s in _PEER_LOST))


def _save_failure(root: Path, tag: str, err: BaseException) -> str:
    """What a save that failed writing says: the error (torch's for a full disk names no
    cause: "unexpected pos N vs M"), the room left beside the size of the last
    checkpoint, what ``latest`` still names, and how to go on."""
    reason = _first_line(err)
    latest = read_latest(root)
    room = ""
    try:
        free = shutil.disk_usage(root).free / 2**30
        room = f"; {free:.2f} GiB free in {root}"
        if latest:
            size = sum(p.stat().st_size for p in (root / latest).rglob("*") if p.is_file())
            room += (f", the last checkpoint took {size / 2**30:.2f} GiB (a save needs as "
                     "much again: the old ones are pruned once the new one is complete)")
    except OSError:
        pass
    kept = (f"latest still names {latest}, the last complete checkpoint: resume it with "
            "--resume auto once there is room (the failed save's folder is deleted then)"
            if latest else "no checkpoint of this run is complete yet")
    return f"saving {tag} failed ({type(err).__name__}: {reason}){room}; {kept}"


def _first_line(err: BaseException) -> str:
    """An error's message for a one-line report: its first line, at most 200 characters."""
    return (str(err).strip().splitlines() or [""])[0][:200]


def load_engine_checkpoint(engine, ckpt_dir: Path, rank: int,
                           load_dir: Path | None = None, tag: str | None = None) -> Any:
    """``engine.load_checkpoint`` of ``ckpt_dir`` (or of ``load_dir``/``tag``, a resize's
    universal form of it); returns DeepSpeed's client state. A checkpoint it cannot read
    is a ``ResumeError``: naming this rank's file that torch cannot open (truncated by a
    full disk or an interrupted copy; torch's "failed reading zip archive" names none)
    and the checkpoint before it to resume instead."""
    load_dir = load_dir if load_dir is not None else ckpt_dir.parent
    tag = tag if tag is not None else ckpt_dir.name
    try:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    except Exception as err:  # torch and pickle raise several types for damage
        if _is_collective_failure(err):
            raise
        raise ResumeError(_load_failure(ckpt_dir, load_dir / tag, rank, err)) from err
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {ckpt_dir}")
    return client_state


def _load_failure(ckpt_dir: Path, folder: Path, rank: int, err: BaseException) -> str:
    reason = f"{type(err).__name__}: {_first_line(err)}"
    damaged = _damaged_file(folder, rank)
    if damaged is not None:
        return _damage_message(ckpt_dir, damaged)
    # its files open: no advice to rewind (an earlier checkpoint would meet the same
    # cause, e.g. memory)
    return f"DeepSpeed could not load {ckpt_dir} ({reason})"


def check_engine_files(ckpt_dir: Path, rank: int) -> None:
    """Raise :class:`ResumeError` when one of the DeepSpeed files ``rank`` will load from
    ``ckpt_dir`` cannot be opened (truncated by a full disk or an interrupted copy): read
    before the engine exists, so that the callers' refusal agreement ends every rank
    together. Met only in ``engine.load_checkpoint``, after ``deepspeed.initialize``, the
    rank refused alone while the others went on into collectives (until the launcher or
    the process group's timeout ended them). Cost: each file's zip index and pickle,
    memory-mapped (no tensor read): a few reads per rank, once per resume."""
    damaged = _damaged_file(ckpt_dir, rank)
    if damaged is not None:
        raise ResumeError(_damage_message(ckpt_dir, damaged))


def _damaged_file(folder: Path, rank: int) -> tuple[Path, str] | None:
    """The first of ``rank``'s DeepSpeed files in ``folder`` (the shared model states,
    its own ZeRO shards) that torch cannot open, with why; None when all open."""
    import torch

    own = sorted(p for p in folder.glob("*.pt") if p.name.startswith("mp_rank_")
                 or f"zero_pp_rank_{rank}_" in p.name)
    for path in own:
        try:
            with path.open("rb") as f:
                head = f.read(4)
            # torch's zip format, memory-mapped: its index and pickle are read, no tensor
            # (a truncated one keeps its first bytes). The legacy format (DeepSpeed's
            # checkpoint_serialization: false; a pickle, b"\x80" first) cannot be mapped,
            # and reading it means reading it whole: left to DeepSpeed's load. Anything
            # else (an empty file: a save cut at its start) is no torch file.
            if head == b"PK\x03\x04":
                torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            elif not head.startswith(b"\x80"):
                raise ValueError(f"not a torch file ({len(head)} bytes at its start: "
                                 f"{head!r})")
        except Exception as bad:
            return path, f"{type(bad).__name__}: {str(bad).strip()[:160]}"
    return None


def _damage_message(ckpt_dir: Path, damaged: tuple[Path, str]) -> str:
    """A damaged file of ``ckpt_dir``, named, and the checkpoint before it to resume."""
    root, step = ckpt_dir.parent, _step_of(ckpt_dir.name)
    earlier = [p.name for p in sorted(root.glob("step_*")) if _is_tag(p.name)
               and step is not None and (_step_of(p.name) or 0) < step
               and (p / TRAINER_STATE).is_file()]
    instead = (f"resume from the checkpoint before it (--resume {root / earlier[-1]})"
               if earlier else "no earlier checkpoint of the run is kept")
    return (f"cannot load {ckpt_dir}: {damaged[0].name} cannot be read ({damaged[1]}): "
            f"damaged or truncated (a full disk, an interrupted copy?); {instead}")


def _publish(root: Path, staging: str, tag: str) -> list[Path]:
    """Rank 0: rename the complete ``staging`` folder to ``tag`` and point ``latest`` at
    it, ``latest`` on the staging name meanwhile. A folder already named ``tag`` (an
    abandoned branch's, which ``latest`` may name) is swapped out, then deleted:
    a crash at any point leaves ``latest`` naming a complete checkpoint (right after the
    rename, by its staging name, which ``checkpoint_path.latest_tag`` maps to ``tag``).
    The swapped-out folder is set aside under a garbage name (returned, for the caller
    to queue for deletion; a crash before that leaves it to the next prune)."""
    final = root / tag
    if final.exists():
        _atomic_write(root / LATEST, staging)
        aside = root / _garbage_name(tag)
        os.replace(final, aside)
        os.replace(root / staging, final)
        _atomic_write(root / LATEST, tag)
        return [aside]
    # latest names the complete staging folder first, as in the swap: a crash between the
    # rename and the write below then leaves latest naming it (latest_tag maps it to
    # ``tag``); written after the rename, a crash there left the run's first checkpoint
    # without a latest, and --resume auto started the run afresh
    _atomic_write(root / LATEST, staging)
    os.replace(root / staging, final)
    _atomic_write(root / LATEST, tag)
    # checkpoints/ itself, made by the run's first save: its name in the run directory
    # (one fsync of a small folder per save)
    fsync_path(root.parent)
    return []


def _latest_as_written(root: Path) -> str:
    """What ``latest`` holds, a staging folder's name too ("": no ``latest``)."""
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else ""


def _interrupted_swap(root: Path) -> str | None:
    """The staging folder ``latest`` names when rank 0 died in :func:`_publish`'s swap
    (the complete new checkpoint, not yet under its step's name), else None."""
    raw = _latest_as_written(root)
    return raw if is_staging(raw) and (root / raw).is_dir() else None


def finish_interrupted_swap(root: Path) -> list[Path]:
    """Rank 0: finish a swap of :func:`_publish` that a crash cut short (``latest`` still
    names the new checkpoint's staging folder): the same step's older folder, if still
    there, is set aside, the new one renamed to its step's name, ``latest`` rewritten.
    Returns what was set aside (to delete). Called by every save before its own publish;
    until then ``--resume auto`` resumes the staging folder, and a resume naming the
    step's folder is refused (:func:`resolve_resume`): it may be the abandoned branch's."""
    staging = _interrupted_swap(root)
    if staging is None:
        return []
    tag = staging.split(STAGING)[0]
    log.warning("finishing the swap of %s over %s that an earlier save did not complete",
                staging, tag)
    return _publish(root, staging, tag)


_TAG = re.compile(r"step_(\d+)")  # tag_for's names: step_<digits>


def _step_of(name: str) -> int | None:
    """The step of a folder ``step_<digits><anything>`` (None for any other name)."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def _is_tag(name: str) -> bool:
    """A checkpoint's own folder name (not a staging or derived folder)."""
    return _TAG.fullmatch(name) is not None


DELETING = f"deleting{STAGING}"  # a folder's name once it is set aside to be deleted


def _garbage_name(name: str) -> str:
    """The name the folder ``name`` is renamed to before it is deleted: not ``step_*``
    (no listing of checkpoints sees it), staging (refused when given by hand), unique
    (the same step's folder may be set aside twice before a deletion finishes)."""
    return f"{DELETING}{secrets.token_hex(4)}-{name}"


def is_garbage(name: str) -> bool:
    """True for a folder set aside to be deleted (whole or partly deleted already)."""
    return name.startswith(DELETING)


def derived_staging(name: str) -> str:
    """The hidden name a folder derived from a checkpoint (``name``: ``step_*<suffix>``,
    e.g. a resize's universal form, pretrain/resize.py) is written under before it is
    renamed to ``name``: a crash mid-write leaves nothing that looks complete."""
    return f".{name}.tmp"


def derived_aside(name: str) -> str:
    """The hidden name an outdated derived folder ``name`` is set aside under while its
    replacement is renamed into place."""
    return f".{name}.stale"


# what derived_staging and derived_aside name, as they are or followed by ``-<suffix>``
# (a resize's conversion adds its token: each writes its own folder, pretrain/resize.py):
# left behind only when the writer died, or by a job whose run lock was taken over
_DERIVED_LEFTOVER = re.compile(r"\.step_\d+.+\.(tmp|stale)(-.+)?")


def _leftovers(root: Path) -> list[Path]:
    """Folders of ``root`` an earlier process left behind and nothing else removes:
    garbage whose deletion was cut short (:func:`is_garbage`) and the hidden folders of a
    derived folder's write that was cut short (:func:`derived_staging`,
    :func:`derived_aside`; a universal form of InternImage-H: ~13 GB)."""
    return [p for p in root.glob("*") if (is_garbage(p.name)
            or _DERIVED_LEFTOVER.fullmatch(p.name)) and p.is_dir()]


def _crashed_saves(root: Path) -> list[Path]:
    """Staging folders of saves that died (``step_*.tmp-*``) but the one ``latest``
    names (a publish cut short: the run's newest complete checkpoint)."""
    raw = _latest_as_written(root)
    return [p for p in root.glob("step_*") if is_staging(p.name) and p.name != raw
            and not is_garbage(p.name) and p.is_dir()]


def _set_aside(root: Path, folders: list[Path]) -> list[Path]:
    """Rename each of ``folders`` (in ``root``) to a garbage name; returns the new paths.
    One that cannot be renamed is left, with a warning: the next prune tries again."""
    garbage = []
    for p in folders:
        aside = root / _garbage_name(p.name)
        try:
            os.replace(p, aside)  # atomic: never a half-deleted folder under its own name
        except OSError as err:  # rank 0 raising here would leave every rank at the barrier
            log.warning("could not set %s aside for deletion (%s); the next prune tries "
                        "again", p, err)
            continue
        garbage.append(aside)
    if garbage:
        # the renames reach the disk before the deletion thread unlinks anything: a node
        # crash mid-deletion then never brings back a half-deleted folder under its
        # ``step_*`` name (it may still hold trainer_state.json, and look complete)
        try:
            fsync_path(root)
        except OSError as err:
            log.warning("could not fsync %s after setting folders aside (%s)", root, err)
    return garbage


def clear_leftovers(root: Path) -> list[Path]:
    """Rank 0 of the job that holds the run directory's lock (runtime/run_lock.py), at its
    start, before it writes anything into ``root``: queue for the deletion thread what an
    earlier job of the run left behind (:func:`_leftovers`, and the staging folders of
    its saves that failed or were killed, :func:`_crashed_saves`). A run that never saves again
    (a resume of a finished run) would otherwise keep them for ever, as only a save's
    :func:`prune` deleted garbage. Safe: the lock means no other live job writes in the
    run directory, and this job's own derived folders are written later (a resize's
    conversion, in its restore). A holder whose lock was taken over while it was still
    alive (stalled past the lock's timeout) may be converting: its folder goes, and its
    conversion then refuses to publish what is left (pretrain/resize.py; each
    conversion writes a folder of its own name, so this job's never gets its files). Renames
    derived leftovers to garbage names first, as :func:`prune` does; returns the garbage
    queued. Best effort: a ``root`` that cannot be listed (EACCES, ESTALE) only warns,
    since rank 0 raising here, before the ranks agree on their resume checks, would leave
    the others waiting in a collective."""
    try:
        # a save that failed (a full disk) left its staging folder, which only the next
        # successful save's prune removed: a resume on the same disk failed again, short
        # of the room the first one took
        found = _leftovers(root) + _crashed_saves(root) if root.is_dir() else []
    except OSError as err:
        log.warning("could not look for what an earlier job left in %s (%s); the next "
                    "save's prune looks again", root, err)
        return []
    garbage = [p for p in found if is_garbage(p.name)]
    garbage += _set_aside(root, [p for p in found if not is_garbage(p.name)])
    if garbage:
        log.warning("deleting %d folder(s) an earlier job left in %s: %s", len(garbage), root,
                    ", ".join(p.name for p in garbage))
    _DELETER.add(garbage)
    return garbage


class _Deleter:
    """Deletes folders already renamed to garbage names, one after another, in one
    thread that exists only while it has work: a new batch of folders is queued behind
    the ones being deleted, never a second thread; a folder already queued is not queued
    again. Not a daemon: a normal exit of the process waits for the deletions already
    decided (finite work, no waiting for more), a kill leaves the rest to the next
    :func:`prune`, which recognises the garbage names."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Path] = deque()
        self._queued: set[Path] = set()  # queued or being deleted
        self._thread: threading.Thread | None = None

    def add(self, folders: Iterable[Path]) -> None:
        with self._cond:
            for folder in folders:
                if folder not in self._queued:
                    self._queued.add(folder)
                    self._queue.append(folder)
            if self._queue and self._thread is None:
                # daemon=False said outright: a thread takes its creator's flag, and the
                # SLURM job runs the trainer in a daemon thread (launch/slurm/job.py), where
                # the exit killed the deleter and left the last pruned checkpoint half
                # deleted in a finished run for good
                self._thread = threading.Thread(target=self._run, name="checkpoint-deleter",
                                                daemon=False)
                self._thread.start()

    def _run(self) -> None:
        done = None
        try:
            while True:
                with self._cond:  # in one hold: an add() either sees this thread or not
                    if done is not None:
                        self._queue.popleft()
                        self._queued.discard(done)
                    if not self._queue:
                        self._thread = None
                        self._cond.notify_all()
                        return
                    done = self._queue[0]
                try:
                    shutil.rmtree(done)
                except FileNotFoundError:
                    pass
                except Exception as err:  # left under its garbage name: retried by a prune
                    log.warning("could not delete %s (%s); the next checkpoint's prune "
                                "tries again", done, err)
        except BaseException:  # the thread dies: the next add() starts another
            with self._cond:
                self._thread = None
                self._queue.clear()
                self._queued.clear()
                self._cond.notify_all()
            raise

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._thread is None, timeout)


_DELETER = _Deleter()
# A forked child has none of its parent's threads, yet would inherit the deleter's state
# (a thread it takes for running, a queue it does not own, a lock perhaps held): it starts
# afresh, with nothing queued (the parent deletes what it queued).
os.register_at_fork(after_in_child=_DELETER.__init__)


def discard(root: Path, folders: Iterable[Path]) -> None:
    """Rank 0: delete ``folders`` of ``root`` (a run's ``checkpoints/``) off the critical
    path, as :func:`prune` does: each is renamed to a garbage name (one metadata
    operation; a deletion cut short is finished by the run's next start or save) and
    queued for the deletion thread. Returns at once, whatever the folders hold (a failed
    universal conversion's partial output, pretrain/resize.py)."""
    _DELETER.add(_set_aside(root, [p for p in folders if p.exists()]))


def delete_in_background(folders: Iterable[Path]) -> None:
    """Queue ``folders`` outside any run's ``checkpoints/`` (a universal conversion's
    scratch folder on node-local disk, pretrain/resize.py: its name is its own) for the
    deletion thread as they are; returns at once."""
    _DELETER.add(folders)


def wait_for_deletions(timeout: float | None = None) -> bool:
    """Block until every folder :func:`prune` (or a save) set aside is deleted: True, or
    False when ``timeout`` seconds passed first."""
    return _DELETER.wait(timeout)


def _wait_for_previous_deletions(others_waiting_since: float | None,
                                 warn_every_s: float = 60.0) -> None:
    """Rank 0, in a save: until the folders the previous saves set aside are deleted (at
    once, unless the filesystem could not delete them in a whole checkpoint interval),
    with a warning each ``warn_every_s`` seconds it waits.

    The other ranks wait meanwhile in the save's last barrier (since
    ``others_waiting_since``, a ``time.monotonic()``; None: no other rank), which fails
    them after the collective timeout: so the wait ends once they have waited half of it
    (rank 0's side files and publish count too; a rank 0 that outwaited it would end the
    run), and the save goes on with the deletions still queued."""
    timeout = group_timeout()
    deadline = (None if timeout is None or others_waiting_since is None
                else others_waiting_since + timeout.total_seconds() / 2)
    start = time.monotonic()
    while True:
        step = warn_every_s if deadline is None else min(warn_every_s,
                                                         deadline - time.monotonic())
        if wait_for_deletions(timeout=max(step, 0.0)):
            return
        waited = time.monotonic() - start
        if deadline is not None and time.monotonic() >= deadline:
            log.warning("this save waited %.0f s for the deletion of the checkpoints the "
                        "previous saves pruned and goes on without it: the other ranks "
                        "wait in a barrier that fails after %.0f s (the collective "
                        "timeout); the deletions go on in the background and more are "
                        "queued (a filesystem too slow to delete a checkpoint between "
                        "two saves: disk use grows)", waited, timeout.total_seconds())
            return
        log.warning("this save waits %.0f s now for the deletion of the checkpoints the "
                    "previous save pruned (a slow filesystem): they are deleted before more "
                    "are set aside, so they cannot pile up", waited)


def prune(root: Path, keep_last: int, wait: bool = True) -> None:
    """Keep the newest ``keep_last`` complete checkpoints of the run's lineage, ``latest``'s
    and the best evaluated one (:data:`BEST`); delete the rest of the ``step_*`` folders.

    The lineage is what ``latest`` has reached: checkpoints at or below its step. Those
    above it belong to a branch the run abandoned when it was resumed from an earlier
    checkpoint (rank 0 prunes right after pointing ``latest`` at the new branch's first
    checkpoint). Also deleted: staging folders (``step_*.tmp-*``: a save that crashed),
    incomplete checkpoints older than ``latest`` (a crashed save of an earlier version),
    and folders derived from a checkpoint (``step_*<suffix>``, e.g. a resize's universal
    form) other than ``latest``'s.

    Each folder that goes is first renamed to a garbage name (:func:`is_garbage`), then
    deleted by the background deletion thread, with any garbage a deletion cut short
    left behind (always deleted, lineage known or not). ``wait``: return only once they
    are gone; :func:`save_checkpoint` does not wait (rank 0 deletes while training on).
    """
    latest = read_latest(root)
    head = _step_of(latest) if latest else None
    folders = sorted((p for p in root.glob("step_*") if p.is_dir()),
                     key=lambda p: (_step_of(p.name) or 0, p.name))
    complete = [p.name for p in folders if _is_tag(p.name)
                and (head is None or _step_of(p.name) <= head)
                and (p / TRAINER_STATE).is_file()]
    keep = set(complete[-keep_last:]) | ({latest} if latest else set())
    # the best evaluated checkpoint of the lineage, and one pending (runtime/best.py)
    run = root.resolve()
    try:
        best_tags = _LAST_BEST_TAGS[run] = _best_tags(root)
    except OSError as err:
        # unknown now: what the pointers named at this run's last prune (only a save
        # changes them, and this process made every save since); at the first prune of
        # this process, every complete checkpoint (a pointer that stays unreadable from
        # then on fills the disk, said at each save)
        best_tags = _LAST_BEST_TAGS.get(run, set(complete))
        log.warning("the best checkpoint's pointer cannot be read (%s): keeping %s", err,
                    "what it named at the last save" if run in _LAST_BEST_TAGS
                    else "every complete checkpoint after this save")
    keep |= best_tags & set(complete)
    doomed = []
    for p in folders:
        name, step = p.name, _step_of(p.name)
        if name in keep:
            continue
        if head is None:  # no lineage known (no ``latest``): only surplus ones go
            gone = name in complete
        elif is_staging(name) or _is_tag(name):
            gone = True  # crashed save, abandoned branch, surplus or incomplete
        else:  # derived from a checkpoint
            gone = step != head
        if gone:
            doomed.append(p)
    # a derived folder's hidden leftovers go too: rank 0 prunes only in a save, never
    # during a conversion of its own (pretrain/resize.py converts before the first step)
    found = _leftovers(root)
    garbage = [p for p in found if is_garbage(p.name)]
    doomed += [p for p in found if not is_garbage(p.name)]
    _DELETER.add(garbage + _set_aside(root, doomed))
    if wait:
        wait_for_deletions()


def read_latest(root: Path) -> str | None:
    """The tag ``latest`` names, or None."""
    raw = _latest_as_written(root)
    return latest_tag(root, raw) if raw else None


def resolve_resume(resume: str | None, root: Path, warn: bool = True,
                   init: bool = False) -> Path | None:
    """The checkpoint directory to resume from, or None for a fresh start.

    ``auto``: ``root/latest`` if it exists. A path: whatever ``runtime.checkpoint_path``
    resolves to a ZeRO tag directory (a run directory, its ``checkpoints/``,
    ``checkpoints/latest``, a ``step_*`` directory). ``warn``: log which checkpoints a
    rewind abandons (off for a look-ahead whose caller resolves again to train).
    ``init``: the command has ``--init`` (fine-tuning), which a refusal of a weights file
    or of a path without a checkpoint then suggests; pre-training has none to suggest.
    """
    if not resume:
        return None
    if resume == "auto":
        tag = read_latest(root)
        return root / tag if tag else None
    try:
        source = resolve_checkpoint(resume, accepted=RESUMABLE_OR_INIT if init else RESUMABLE)
    except CheckpointPathError as err:
        raise ResumeError(f"--resume {err}") from None
    if not source.is_zero:
        raise ResumeError(f"--resume {resume}: a weights file holds no optimizer, schedule "
                          "or data state; resume from a training checkpoint (a run directory, "
                          f"its checkpoints/, checkpoints/{LATEST} or a step_* directory)"
                          + ("; fine-tuning starts from weights with --init" if init else ""))
    staging = _interrupted_swap(source.path.parent)
    if staging is not None and staging.split(STAGING)[0] == source.path.name:
        raise ResumeError(
            f"--resume {resume}: a save was cut short while replacing {source.path.name} "
            f"with the run's newer checkpoint of that step, {staging}; {source.path.name} "
            "may be the branch the run abandoned: --resume auto resumes the run's own (the "
            "next save puts it under its name)")
    if warn:
        _warn_rewind(source.path, root)
    return source.path


def is_own_checkpoint(ckpt_dir: Path, root: Path) -> bool:
    """``ckpt_dir`` is a checkpoint of the run whose checkpoints folder is ``root``."""
    return ckpt_dir.parent.resolve() == root.resolve()


def tags_after(root: Path, tag: str) -> list[str]:
    """The checkpoints of ``root`` later than ``tag``: what a resume from ``tag`` abandons
    (:func:`prune` deletes them once the resumed run's first checkpoint is complete)."""
    step = _step_of(tag) or 0
    return [p.name for p in sorted(root.glob("step_*"))
            if _is_tag(p.name) and _step_of(p.name) > step]


def _warn_rewind(ckpt_dir: Path, root: Path) -> None:
    """Say which checkpoints a resume from an earlier checkpoint of this run abandons."""
    latest = read_latest(root)
    if not latest or not is_own_checkpoint(ckpt_dir, root):
        return
    later = tags_after(root, ckpt_dir.name)
    if later:
        log.warning("resuming from %s, before %s (latest): %s will be deleted once this "
                    "run's first checkpoint is complete (until then, resuming from them "
                    "still works)", ckpt_dir.name, latest, ", ".join(later))


def load_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """Read and parse a checkpoint's ``trainer_state.json`` (clear error if absent)."""
    path = ckpt_dir / TRAINER_STATE
    if not path.is_file():
        raise ResumeError(f"{ckpt_dir} is not a complete checkpoint: {TRAINER_STATE} missing")
    return _read_json(path, ckpt_dir)


# DeepSpeed (0.19) loads a checkpoint only into an engine that writes the same files:
# ZeRO-0 keeps the optimizer in mp_rank_00_model_states.pt, ZeRO-1 and -2 share
# zero_pp_rank_*_optim_states.pt, ZeRO-3 adds per-rank model states; and a 16-bit
# engine's optimizer (loss scale, fp32 groups; bf16_-prefixed files) is not an fp32 one's.
# Measured over every pair of stages 0-3 x fp32/bf16: all others fail inside
# load_checkpoint (AssertionError, KeyError, FileNotFoundError, TypeError).
_ZERO_LAYOUT = {0: "0", 1: "1/2", 2: "1/2", 3: "3"}


def engine_layout(zero_stage: int, precision: str) -> dict[str, Any]:
    """What a run's DeepSpeed checkpoint files depend on besides the model: its ZeRO stage
    and the precision of the engine's weights (``fp32`` for detection and segmentation,
    which autocast over fp32 weights). Saved in ``trainer_state.json`` as ``engine``."""
    return {"zero_stage": zero_stage, "precision": precision}


PRETRAIN_TASK = "pretrain"  # what a trainer state without ``task`` was saved by


def _key(task: str, name: str) -> str:
    """The config key ``name`` (zero_stage, precision) of ``task``'s runs."""
    return f"{'engine' if task == PRETRAIN_TASK else 'run'}.{name}"


def _restart_hint(task: str) -> str:
    """How to start afresh from a checkpoint this run cannot resume (fine-tuning only:
    pre-training starts from no weights)."""
    return ("" if task == PRETRAIN_TASK else
            ", or convert it (internimage convert) and --init a new run")


def saved_task(state: dict[str, Any]) -> str:
    """The task whose run saved ``state``: its recorded ``task``, else pre-training or
    classification. Pre-training records no task but has always recorded
    ``samples_seen``, which no fine-tuning run writes; of the fine-tuning tasks only
    classification saved states without a task (before 2026-12)."""
    saved = state.get("task")
    if saved is None:
        return PRETRAIN_TASK if "samples_seen" in state else "classification"
    return saved


def task_name(task: str) -> str:
    """A task as a message names it."""
    return "pre-training" if task == PRETRAIN_TASK else task


def _check_task(state: dict[str, Any], task: str, ckpt_dir: Path) -> None:
    """A checkpoint of another task's run: said as such, before the engine and model
    checks, whose advice (another ZeRO stage, the run's own config) misled (the common
    mix-up of ``--resume`` with ``--init``)."""
    saved = saved_task(state)
    if saved == task:
        return
    if task == PRETRAIN_TASK:
        hint = (f"resume it with `internimage finetune {saved} --resume`; pre-training "
                "resumes its own runs only")
    elif saved == PRETRAIN_TASK:
        hint = (f"to fine-tune from its weights give it as --init (internimage finetune "
                f"{task} --init {ckpt_dir}), not --resume")
    else:
        hint = (f"to fine-tune from its backbone give it as --init (internimage finetune "
                f"{task} --init {ckpt_dir}), or resume it with `internimage finetune "
                f"{saved} --resume`")
    raise ResumeError(f"{ckpt_dir} is a checkpoint of a {task_name(saved)} run, this is a "
                      f"{task_name(task)} run: {hint}")


def _check_engine(state: dict[str, Any], engine: dict[str, Any], ckpt_dir: Path,
                  task: str) -> None:
    saved = state.get("engine") or {}
    # states saved before ``engine`` was recorded hold the stage alone (fine-tuning's)
    stage = saved.get("zero_stage", state.get("zero_stage"))
    if stage is not None and _ZERO_LAYOUT[int(stage)] != _ZERO_LAYOUT[engine["zero_stage"]]:
        raise ResumeError(
            f"{ckpt_dir} was saved with ZeRO stage {stage}, this run has stage "
            f"{engine['zero_stage']}: DeepSpeed resumes a checkpoint only in the ZeRO layout "
            f"that wrote it (stages 1 and 2 share one); resume with "
            f"{_key(task, 'zero_stage')}={stage} as in the run's config.yaml"
            f"{_restart_hint(task)}")
    precision = saved.get("precision")
    if precision is not None and precision != engine["precision"]:
        raise ResumeError(
            f"{ckpt_dir} was saved by a {precision} engine, this run's is "
            f"{engine['precision']}: DeepSpeed's optimizer state differs between them; resume "
            f"with {_key(task, 'precision')}={precision} as in the run's config.yaml"
            f"{_restart_hint(task)}")


def check_compatible(state: dict[str, Any], model_hash: str, world_size: int,
                     ckpt_dir: Path, allow_resize: bool = False,
                     engine: dict[str, Any] | None = None, task: str | None = None) -> None:
    """Refuse, before any compute, a resume the saved state cannot support
    (``allow_resize``: the caller resumes on another world size itself; ``engine``: this
    run's :func:`engine_layout`, checked against the saved one when given; ``task``: this
    run's, ``pretrain`` or a fine-tuning task's name, checked first when given)."""
    if task is not None:
        _check_task(state, task, ckpt_dir)
    if engine is not None:
        _check_engine(state, engine, ckpt_dir, task or PRETRAIN_TASK)
    if state["model_hash"] != model_hash:
        raise ResumeError(
            f"{ckpt_dir} was saved for a different model/text-tower config (hash "
            f"{state['model_hash']} vs {model_hash}); resume with the run's own config.yaml")
    if state["world_size"] != world_size and not allow_resize:
        saved = ranks_text(state["world_size"])
        raise ResumeError(
            f"{ckpt_dir} was saved by {saved}, this run has {world_size}: changing the world "
            f"size on resume is not supported (ZeRO partitions and each rank's data position "
            f"are per rank); resume with {saved}, or convert the checkpoint (internimage "
            f"convert) and start a new run from it")


def refuse_fresh_start(resume_dir: Path | None, root: Path, run_dir: Path) -> None:
    """Refuse a start in ``run_dir`` whose checkpoints ``root`` have a ``latest`` unless it
    continues that run: without ``--resume`` (``resume_dir`` None, from
    :func:`resolve_resume`) the new run would replace the run's metrics and, one save
    after another, its checkpoints; from another run's checkpoint, its first save would
    make ``latest`` and :func:`prune` delete this run's later checkpoints, all of them.
    Resuming this run's own checkpoints (``auto``, or a rewind, which
    :func:`resolve_resume` warns about) is allowed. Never lose a run."""
    tag = read_latest(root)
    if not tag:
        return
    if resume_dir is None:
        raise ResumeError(
            f"{run_dir} already holds a run (checkpoints/{LATEST} = {tag}); continue it with "
            f"--resume auto, or pass another --output-dir")
    if not is_own_checkpoint(resume_dir, root):
        raise ResumeError(
            f"{run_dir} already holds a run (checkpoints/{LATEST} = {tag}) and --resume "
            f"{resume_dir} is another run's checkpoint: continuing it here would delete this "
            f"run's checkpoints at its first save; pass another --output-dir (or --resume "
            f"auto to continue this run)")


def _pending_config(run_dir: Path) -> Path:
    """This process's staged config: named by host and PID (unique among live processes,
    read at each call: a forked process gets its own), so a second job started in the
    directory (refused by the run lock only after staging) neither replaces the config
    the first one is about to publish nor deletes it when its own start is refused."""
    return run_dir / f"{PENDING_CONFIG}-{socket.gethostname()}-{os.getpid()}"


def stage_config(run_dir: Path, write: Callable[[Path], None]) -> None:
    """Stage the resolved config a run is about to start with (``write(path)`` writes it):
    the run's ``config.yaml`` is replaced by it only once the run's resume checks have
    passed (:func:`publish_config`), so a refused start (the wrong config for a resume, a
    fresh start over a run) leaves the run's own config.yaml as it was."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write(_pending_config(run_dir))


# The run directories this process published a config in: their runs got past their start
# checks (launch/slurm/job.py tells a refused start from a run that trained and then
# failed, both exit 2, by it)
_published: set[str] = set()


def published_here(run_dir: Path, forget: bool = False) -> bool:
    """Whether this process called :func:`publish_config` for ``run_dir`` (its run passed
    its start checks); ``forget``: and forget it (a new attempt starts)."""
    key = os.path.realpath(run_dir)
    passed = key in _published
    if forget:
        _published.discard(key)
    return passed


def publish_config(run_dir: Path) -> None:
    """The staged config becomes ``run_dir/config.yaml`` (atomic; nothing to do when none
    is staged: a run started without the command line, or another rank published it). One
    that differs from the config the run last started with keeps that one and names the
    changed keys (runtime/config_history.py). Called once the start checks passed
    (:func:`published_here`)."""
    from runtime.config_history import keep_previous

    _published.add(os.path.realpath(run_dir))
    staged, current = _pending_config(run_dir), run_dir / CONFIG
    try:
        new = staged.read_text()
    except FileNotFoundError:
        return
    try:
        previous = current.read_text()
    except (OSError, ValueError):  # a fresh start (or a record unreadable, not UTF-8:
        previous = None  # nothing to compare with)
    try:
        os.replace(staged, current)
    except FileNotFoundError:
        return
    if previous is not None:
        try:
            keep_previous(run_dir, previous, new)
        except OSError as err:  # the record of a change is not worth the run
            log.warning("%s: could not keep the previous %s: %s", run_dir, CONFIG, err)


def discard_config(run_dir: Path) -> None:
    """Drop the staged config of a start that was refused."""
    _pending_config(run_dir).unlink(missing_ok=True)


def complete_message(ckpt_dir: Path, step: int, total: int,
                     recorded: dict[str, Any] | None, what: str, owed: str = "") -> str:
    """What rank 0 logs at a resume with nothing left to train, the one wording of
    pre-training and fine-tuning: the run's checkpoint ``ckpt_dir`` is at ``step``, the
    run's end (``total``, this config's last step) or past it, and ``recorded`` is what
    ``metrics.jsonl`` holds at that step (None or empty: nothing), ``what`` naming it
    ("values": pre-training's training and zero-shot records; "evaluation": fine-tuning's
    last evaluation). ``owed``: the evaluation the checkpoint owes (a stop skipped it,
    ``runtime.loop.owes_evaluation``; "" for none), named with how to make it, since a
    run with nothing left to train does not."""
    end = (f"step {step} of {total}" if step == total else
           f"step {step}, past this config's end at step {total}")
    found = (f"its last {what} (metrics.jsonl, step {step}): {recorded}" if recorded
             else f"metrics.jsonl records no {what} at step {step}")
    message = (f"the run is already complete: its checkpoint {ckpt_dir} is at {end}; "
               f"nothing to train or evaluate, nothing saved: the run's checkpoints and "
               f"{CONFIG} are left as they were; {found}")
    if owed:
        message += (f". NOTE: the {owed} due at step {step} was skipped by the stop that "
                    f"saved this checkpoint and is not made now: a resume of a run ending "
                    f"after step {step} makes it first")
    return message


def refuse_legacy_resume(resume: str | None, root: Path) -> None:
    """Refuse ``--resume auto`` when ``root`` holds only a ``last.pt`` (written by
    fine-tuning before it ran on DeepSpeed): starting afresh would silently overwrite it."""
    if resume != "auto":
        return
    if (root / "last.pt").is_file() and not (root / LATEST).is_file():
        raise CheckpointError(
            f"{root} holds a last.pt checkpoint of an earlier version (DDP); fine-tuning "
            f"now resumes DeepSpeed checkpoints (checkpoints/{LATEST}): finish that run with "
            "the version that wrote it, or start a new run in another directory")


def open_resume(resume: str | None, root: Path, model_hash: str,
                world_size: int) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint directory ``resume`` names under ``root`` and its trainer state,
    checked against this run (model hash, world size) before any compute; (None, None)
    for a fresh start."""
    ckpt_dir = resolve_resume(resume, root)
    if ckpt_dir is None:
        return None, None
    return ckpt_dir, checked_state(ckpt_dir, model_hash, world_size)


def checked_state(ckpt_dir: Path, model_hash: str, world_size: int,
                  engine: dict[str, Any] | None = None,
                  task: str | None = None) -> dict[str, Any]:
    """The trainer state of the resolved checkpoint ``ckpt_dir``, checked against this
    run (its task, model hash, world size, and ``engine``'s layout when given)."""
    state = load_trainer_state(ckpt_dir)
    check_compatible(state, model_hash, world_size, ckpt_dir, engine=engine, task=task)
    return state
