"""Resume pre-training on another world size: model and optimizer through DeepSpeed's
universal checkpoint where the files are per rank (the data side is :mod:`data.redeal`, the
schedule's re-planning: :func:`pretrain.engine.align_schedule`).

What a checkpoint's files depend on, by ZeRO stage (measured here, deepspeed 0.19.8, every
stage 2 -> 1 ranks, fp32 and bf16; REFERENCE.md):

- stage 0: one ``mp_rank_00_model_states.pt`` with the whole module, optimizer and
  scheduler, written by rank 0 and read by every rank; nothing in it depends on the world
  size, so DeepSpeed's ``load_checkpoint`` loads it directly on any number of ranks.
- stages 1 and 2: the optimizer (fp32 masters, Adam moments) is flat and cut into one
  ``*zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank. ``ds_to_universal`` converts
  them once it is told that the checkpoint needs no tensor-parallel merging
  (``--inject_missing_state`` adds the ``universal_checkpoint_info`` DeepSpeed's own save
  writes only for models with tensor-parallel metadata).
- stage 3: parameters too are per rank; ``ds_to_universal`` converts as saved.

A converted folder (one file per parameter: fp32 weights and Adam moments) loads
re-partitioned for any world size with ``"checkpoint": {"load_universal": true}`` (fp32
parameters and Adam moments bit-identical, step and scheduler restored). The universal path
does not restore module buffers or frozen parameters; the pre-training model trains every
parameter, and its buffers (BatchNorm statistics) are copied from rank 0's model states
(:func:`restore_buffers`).

The conversion runs once, on rank 0, into the resuming run's own
``checkpoints/<tag>_universal`` (never into another run's folder; written under a
temporary name and renamed, so a crash mid-conversion leaves nothing that looks complete;
what it leaves, hidden, is deleted by the run's next start or save:
``runtime.checkpoint.clear_leftovers`` and ``prune``; that name is the conversion's own,
with its token, so two jobs' conversions never write into one folder, and it is renamed
only while it still holds that token, so one whose folder a job that took the run over
removed mid-write publishes nothing),
with the identity of the checkpoint it was made from (:func:`source_identity`); a later
resize from the same checkpoint reuses it, one from a checkpoint saved again under the same
tag (a rewound run re-saving that step) converts again. ``runtime.checkpoint.prune``
deletes it once ``latest`` names another checkpoint. It holds DeepSpeed's state only: the
trainer state and every old rank's state file (``rank_states/``: the data positions a
resize re-deals) are read from the checkpoint itself, never copied (pretrain/trainer.py).
DeepSpeed's intermediate fragments (>2 million files for InternImage-H at 512 ranks) are
written to node-local scratch (``TMPDIR``), never to the run's filesystem, and whatever a
conversion leaves is deleted in the background, so the other ranks hear rank 0's outcome
(published, or its refusal) as soon as the conversion ends. A conversion holds a lock in
its scratch folder while it lives: the folder of one that was killed (SIGKILL, a node's
OOM killer, a cancelled job: about the optimizer state's size, 13 GB for InternImage-H) is
deleted by the next conversion on that node (:func:`_sweep_dead_scratch`).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models.checkpoint import CheckpointError
from runtime.checkpoint import (
    TRAINER_STATE,
    ResumeError,
    agree_on_refusal,
    delete_in_background,
    derived_aside,
    derived_staging,
    discard,
)
from runtime.dist import mark_done, wait_for_main

log = logging.getLogger(__name__)
_CALLS = itertools.count()  # resize_load calls in this process (its store keys)

SUFFIX = "_universal"
# How long rank 0's ds_to_universal may take, and the others wait for it (plus the publish):
# InternImage-H's optimizer state is ~13 GB (fp32 masters and two Adam moments), read from
# every old rank's file and written once per parameter: minutes on a parallel file system.
# A conversion still running after this is taken as hung (a stalled mount, the extract
# workers' hang of REFERENCE.md) and refused, so the job ends instead of idling to its
# time limit.
CONVERSION_TIMEOUT_S = 2 * 3600
_WAIT_MARGIN_S = 600  # rank 0's publish (renames) after the conversion, and its start
# inside a universal folder: the identity of the checkpoint it was converted from
SOURCE = "converted_from.json"
# ds_to_universal's fragment folder: <output_folder>/tmp, no argument moves it
# (deepspeed/checkpoint/ds_to_universal.py, main: temp_dir = os.path.join(
# args.output_folder, 'tmp')). It writes one file per parameter x old rank x state there
# (dump_param_fragment), merges them, then deletes them: InternImage-H (1,355 parameter
# tensors) at 512 ranks, >2 million files. So it is a link to a scratch folder on
# node-local disk (TMPDIR, which SLURM sites point at it), never on the run's parallel
# filesystem.
FRAGMENTS = "tmp"
# a scratch filesystem with less room than this left after a failed conversion filled it
# (a torch.save that hit ENOSPC says only "unexpected pos" or "file write failed")
_SCRATCH_FULL_BYTES = 256 * 2**20


def read_teacher_slices(ckpt_dir: Path, world_size: int, key: str, zero3: bool) -> list[dict]:
    """The EMA target encoder's saved moving average for a resume on another world size:
    each of the ``world_size`` saving ranks' client-state entry ``key``, in rank order
    (``pretrain.m3i.ema.MomentumTeacher.load_resized`` re-deals them). ZeRO-3 (``zero3``,
    the saved stage: a resume keeps it) keeps one slice per rank in each rank's
    model-states file; ZeRO 0-2 the whole tensors in rank 0's only. Mapped, not read: each
    rank reads the pages its own elements are on (InternImage-H: 4.3 GB in all, 8.4 MB per
    rank at 512 ranks), plus each file's index: O(old world size) file opens per rank, as
    the data re-deal's rank-state reads."""
    import torch

    files = ([ckpt_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
              for r in range(world_size)] if zero3
             else [ckpt_dir / "mp_rank_00_model_states.pt"])
    slices = []
    for path in files:
        if not path.is_file():
            raise ResumeError(f"{ckpt_dir}: {path.name} is missing (the EMA target "
                              f"encoder's saved average is read from it)")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file: one line, named
            raise ResumeError(f"{ckpt_dir}: {path.name} cannot be read for the EMA target "
                              f"encoder ({type(err).__name__}: {err})") from None
        if not isinstance(saved, dict) or key not in saved:
            raise ResumeError(f"{ckpt_dir} holds no EMA target encoder in {path.name} "
                              f"(saved with objective.image off?)")
        slices.append(saved[key])
    return slices


def is_per_rank(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir``'s optimizer (ZeRO 1-3) or parameters (ZeRO-3) are split into one
    file per rank: DeepSpeed writes ``*_optim_states.pt`` files only then."""
    return any(ckpt_dir.glob("*_optim_states.pt"))


def source_identity(ckpt_dir: Path) -> str:
    """A fingerprint of the checkpoint saved in ``ckpt_dir``: its trainer state's bytes (the
    save's time and step: different for every save) and the name, size and modification
    time of each of its files (the per-rank state files are not read: they are not
    converted, a resize reads them from ``ckpt_dir`` itself). Cheap (no shard is read) and
    different for a checkpoint saved again under the same tag."""
    digest = hashlib.sha256()
    state = ckpt_dir / TRAINER_STATE
    digest.update(state.read_bytes() if state.is_file() else b"")
    for path in sorted(ckpt_dir.iterdir()):
        st = path.stat()
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _converted_from(universal: Path) -> str | None:
    try:
        return json.loads((universal / SOURCE).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # made before identities were recorded, or damaged: not trusted


def _token_of(folder: Path) -> str | None:
    """The token the conversion that created ``folder`` wrote into it (None: none)."""
    try:
        return json.loads((folder / SOURCE).read_text())["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_own(tmp: Path, token: str, out: Path) -> None:
    """Refuse to publish ``tmp`` as ``out`` unless it is still the folder this conversion
    created (its ``token``). Another job that took the run directory's lock from this one
    while it was converting (runtime/run_lock.py: a holder stalled past the lock's
    timeout, e.g. the next step of the same SLURM job) deletes what it takes for a killed
    job's leftovers (``runtime.checkpoint.clear_leftovers``): this conversion's folder,
    renamed away mid-write. ds_to_universal then writes the rest of its files under the
    same name again (it creates folders with ``exist_ok=True``): a partial folder without
    the token; published, it would be loaded as the checkpoint's whole universal form.
    The name is this conversion's alone (its token in it), so the new job's own
    conversion is never in it, and this one's late files never in the new job's."""
    if _token_of(tmp) != token:
        raise ResumeError(
            f"{out}: the universal conversion's folder {tmp.name} was replaced while it was "
            "being written (another job took over the run directory: its start removes "
            "what it takes for a killed job's leftovers); nothing published, the run's "
            "checkpoints are as they were: resume again once this run directory has one job")


# ds_to_universal's own pointer: it writes the name of its output folder (basename of
# --output_folder) into this file beside it once it is done (deepspeed/checkpoint/
# ds_to_universal.py, main's end); our loads always pass the tag and never read it
POINTER = "latest_universal"


def _drop_pointer(into: Path, out: Path) -> None:
    """Remove ``into``'s ``latest_universal`` when it names a staging folder of ``out``
    (this conversion's, or another's of the same checkpoint): such a folder is renamed or
    deleted once its conversion ends, so the pointer would name nothing. Best effort."""
    pointer = into / POINTER
    try:
        if pointer.read_text().strip().startswith(derived_staging(out.name)):
            pointer.unlink(missing_ok=True)
    except OSError:
        pass  # none, or unreadable: nothing of ours to remove


SCRATCH_PREFIX = "internimage-universal-"
SCRATCH_OWNER = ".owner"  # in a scratch folder: locked (flock) while its conversion lives


def _scratch_folder(ckpt_dir: Path, token: str) -> tuple[Path, int]:
    """A new folder of this conversion's own (its ``token`` in the name) for
    ds_to_universal's fragments, in the node's temporary directory (``TMPDIR``), and the
    descriptor of its owner file, locked until it is closed (or this process dies).

    The owner file is locked under a name no sweep reads, then renamed into place (the
    lock stays with the open file): a conversion sweeping the node's scratch meanwhile
    sees either no owner file (a folder being created: kept) or a locked one, never the
    unlocked moment between creating and locking it (which it took for a dead
    conversion's, deleting the new folder under this one)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{token}-"))
        unpublished = folder / f"{SCRATCH_OWNER}.new"
        fd = os.open(unpublished, os.O_CREAT | os.O_WRONLY, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(unpublished, folder / SCRATCH_OWNER)
        return folder, fd
    except OSError as err:
        raise ResumeError(f"{ckpt_dir}: could not create the universal conversion's "
                          f"scratch folder in {tempfile.gettempdir()} (TMPDIR): {err}; set "
                          "TMPDIR to a writable node-local folder") from None


def _sweep_dead_scratch() -> list[Path]:
    """Queue for deletion (in the background) the scratch folders in ``TMPDIR`` whose
    conversion is dead: their owner file's lock is free (a lock ends with its process,
    SIGKILL included). A live conversion's (another job's on a shared ``/tmp``) is kept,
    as is a folder without an owner file (being created, or not ours). Returns them.
    Cost: one listing of ``TMPDIR`` and one open per scratch folder, per conversion."""
    dead = []
    try:
        folders = [p for p in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*")
                   if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    for folder in folders:
        try:
            fd = os.open(folder / SCRATCH_OWNER, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its conversion is running
            continue
        else:
            dead.append(folder)
        finally:
            os.close(fd)
    if dead:
        log.warning("deleting %d scratch folder(s) of killed universal conversions in %s: "
                    "%s", len(dead), tempfile.gettempdir(), ", ".join(p.name for p in dead))
        delete_in_background(dead)
    return dead


def _scratch_full(scratch: Path) -> str:
    """What to add to a failed conversion's refusal when its scratch filesystem is full
    (the fragments, not yet deleted, total about the checkpoint's optimizer state), else
    ''. One statvfs: asked only once a conversion failed."""
    try:
        free = shutil.disk_usage(scratch).free
    except OSError:
        return ""
    if free >= _SCRATCH_FULL_BYTES:
        return ""
    return (f"; the filesystem of its scratch folder {scratch.parent} (TMPDIR) is full "
            f"({free / 2**20:.0f} MiB left): the fragments it writes there total about the "
            "checkpoint's optimizer state; set TMPDIR to a node-local folder with room "
            "for them")


def _check_room(ckpt_dir: Path, scratch: Path, into: Path) -> None:
    """Refuse (``ResumeError``) a conversion that cannot fit, before it runs (it takes
    minutes to hours, then failed on a full disk): ds_to_universal writes its fragments
    into ``scratch`` (TMPDIR), then the universal form into ``into`` (the run's
    ``checkpoints/``), each about the size of the checkpoint's optimizer files (fp32
    weights and Adam moments, the ``*_optim_states.pt`` files summed). Free space that
    cannot be read is not refused (the conversion then tells)."""
    try:
        need = sum(f.stat().st_size for f in ckpt_dir.glob("*_optim_states.pt"))
    except OSError:
        return
    for folder, what in ((scratch, "its scratch folder's filesystem (TMPDIR)"),
                         (into, "the run's checkpoints folder")):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        if free < need:
            raise ResumeError(
                f"{ckpt_dir}: the universal conversion needs about {need / 2**30:.1f} GiB in "
                f"{what} {folder if folder is into else folder.parent} (the checkpoint's "
                f"optimizer state), {free / 2**30:.1f} GiB free; make room"
                + (" or set TMPDIR to a node-local folder with room" if folder is scratch
                   else ""))


def run_tool(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its output captured as text) in a process group of its own, and end
    the whole group once it returns, fails, times out (``subprocess.TimeoutExpired``) or
    this process is interrupted. ds_to_universal extracts and merges in pools of worker
    processes: killing only the main one at the timeout (what ``subprocess.run`` does)
    would leave workers writing fragments into the scratch folder being deleted."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()  # not communicate: a worker stuck in the kernel may hold the pipes
            raise
        _kill_group(proc.pid)  # workers that outlived it (none when it ends normally)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in group ``pgid`` (a group outlives its leader while
    members remain, so its id is not reused meanwhile)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left
        pass


def convert_to_universal(ckpt_dir: Path, into: Path | None = None) -> Path:
    """``ckpt_dir``'s universal form (``<tag>_universal``) in ``into``, the resuming run's
    own ``checkpoints/`` (default: beside ``ckpt_dir``), converted with DeepSpeed's
    ``ds_to_universal`` unless one made from this very checkpoint is there. A run resumed
    from another run's checkpoint writes nothing into that run (it holds no lock of it; it
    may be live, read-only, or pruning). Call on one process.

    DeepSpeed's intermediate fragments (one file per parameter x old rank x state) go to
    a scratch folder in ``TMPDIR`` (node-local disk on SLURM sites), not the run's
    filesystem. What a conversion leaves (its scratch folder; its partial folder if it
    failed, or the outdated form it replaced) is deleted by rank 0's deletion thread,
    after this returns (runtime.checkpoint.discard)."""
    into = ckpt_dir.parent if into is None else into
    into.mkdir(parents=True, exist_ok=True)
    out = into / (ckpt_dir.name + SUFFIX)
    identity = source_identity(ckpt_dir)
    if out.is_dir():
        if _converted_from(out) == identity:
            return out
        log.warning("%s was not converted from the current %s (saved again since, or made by "
                    "an older version): converting again", out.name, ckpt_dir.name)
    # this conversion's own folder: its token in the name, so a conversion of another job
    # (one that took the run over while this one converts, or the one this job took it
    # over from) never writes into it, nor this one's ds_to_universal, which runs on after
    # a refusal, into theirs (runtime.checkpoint's leftovers match the suffix); the token
    # is also written into it, checked before it is published (see _check_own)
    token = secrets.token_hex(8)
    tmp = into / f"{derived_staging(out.name)}-{token}"
    aside = into / f"{derived_aside(out.name)}-{token}"
    tmp.mkdir()
    (tmp / SOURCE).write_text(json.dumps({"source": ckpt_dir.name, "identity": identity,
                                          "token": token}))
    start = time.perf_counter()
    published = interrupted = False
    scratch: Path | None = None
    owner = -1
    try:
        _sweep_dead_scratch()
        scratch, owner = _scratch_folder(ckpt_dir, token)
        # ds_to_universal's own rmtree of the link does nothing (rmtree refuses a
        # symbolic link; it passes ignore_errors=True): the fragments are deleted below
        (tmp / FRAGMENTS).symlink_to(scratch, target_is_directory=True)
        _check_room(ckpt_dir, scratch, into)
        # its default worker counts: --num_extract_workers 1 with the default merge
        # workers hangs (REFERENCE.md). --inject_missing_state: ZeRO-1/2 checkpoints carry
        # no universal_checkpoint_info unless the model has tensor-parallel metadata (ours
        # has none: nothing to merge); ZeRO-3's conversion ignores the flag.
        try:
            proc = run_tool(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                 "--input_folder", str(ckpt_dir), "--output_folder", str(tmp),
                 "--inject_missing_state"], timeout=CONVERSION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ResumeError(f"{ckpt_dir}: DeepSpeed's ds_to_universal did not finish "
                              f"within {CONVERSION_TIMEOUT_S} s (hung?)") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ResumeError(f"{ckpt_dir}: DeepSpeed's ds_to_universal failed "
                              f"({proc.returncode}): {last}{_scratch_full(scratch)}")
        _check_own(tmp, token, out)
        (tmp / FRAGMENTS).unlink(missing_ok=True)  # the link: not part of the form
        if out.exists():  # a stale conversion: set aside, then gone once the new one is in
            os.replace(out, aside)
        os.replace(tmp, out)
        published = True
    except BaseException as err:
        interrupted = not isinstance(err, Exception)  # KeyboardInterrupt, SystemExit
        raise
    finally:
        # ds_to_universal's pointer names our staging folder, renamed or removed here;
        # left on no path (a refusal, a failure, a publish)
        _drop_pointer(into, out)
        if not published and aside.exists() and not out.exists():
            try:  # set aside, then the rename failed: put back
                os.replace(aside, out)
            except OSError:
                pass  # left hidden: deleted by the run's next start or save
        # Deleted in the background, never here: rank 0 signals the waiting ranks
        # (resize_load's mark_done) only once this returns, and unlinking a failed
        # conversion's files (~2 million fragments at 512 ranks, plus its partial
        # output) could outlast their wait, turning rank 0's refusal into their
        # MainRankLostError. Published: the outdated form it replaced; else this
        # conversion's own folder (its name is this conversion's alone: no other job's).
        # A process being interrupted leaves them, as a kill does, to the run's next start
        # or save: its exit would otherwise wait for the deletion thread.
        if not interrupted:
            discard(into, [aside] if published else [tmp])
            if scratch is not None:
                delete_in_background([scratch])
        if owner >= 0:  # unlocked: an interrupted one's folder is the next one's to sweep
            os.close(owner)
    log.warning("converted %s to a universal checkpoint in %.1f s (%s)", ckpt_dir,
                time.perf_counter() - start, out)
    return out


def resize_load(engine, ckpt_dir: Path, own_root: Path, is_main: bool) -> tuple[Path, str]:
    """``(load_dir, tag)`` to pass to ``engine.load_checkpoint`` to load ``ckpt_dir`` on
    this world size. A ZeRO-0 checkpoint is loaded as saved; otherwise rank 0 converts
    into ``own_root``, the run's own ``checkpoints/`` (the others wait for it, however
    long it takes: :func:`runtime.dist.wait_for_main`; every rank raises its refusal:
    :func:`runtime.checkpoint.agree_on_refusal`), and the engine is
    switched to DeepSpeed's universal loading (its ``checkpoint.load_universal`` config
    key, read at load time)."""
    if not is_per_rank(ckpt_dir):
        return ckpt_dir.parent, ckpt_dir.name
    # rank 0's refusal (a conversion that failed, or whose folder another job took) is
    # raised on every rank, in one line (agree_on_refusal). The others wait for the
    # conversion through the store, not in a collective: at InternImage-H size it may
    # outlast the collective timeout (NCCL's 10 min), which would end them mid-wait
    refusal: CheckpointError | None = None
    # one key per call (every rank calls alike): a second resize in this process, from a
    # checkpoint of the same name, must not find the first one's mark
    key = f"internimage/resize/{next(_CALLS)}/{ckpt_dir.name}"
    if is_main:
        try:
            convert_to_universal(ckpt_dir, into=own_root)
        except CheckpointError as err:
            refusal = err
        except OSError as err:  # the run's own checkpoints/ unwritable, full, ...
            refusal = ResumeError(f"{ckpt_dir}: its universal conversion into {own_root} "
                                  f"failed: {err}")
        # converted or refused (anything else unwinds rank 0 without the mark: its store
        # goes with it, or the launcher ends the others)
        mark_done(key)
    else:
        # rank 0 lost (killed, or hung past the bound) is a failure, not a refusal of the
        # resume: MainRankLostError goes up as it is (a crash, exit 1 with a traceback,
        # where rank 0's own error says why), not as a one-line exit-2 refusal that reads
        # as "fix your checkpoint"
        wait_for_main(key, f"the universal conversion of {ckpt_dir}",
                      bound_s=CONVERSION_TIMEOUT_S + _WAIT_MARGIN_S)
    agree_on_refusal(refusal)
    engine._config.load_universal_checkpoint = True
    return own_root, ckpt_dir.name + SUFFIX


def restore_buffers(module, ckpt_dir: Path) -> int:
    """Copy the module buffers saved by rank 0 in ``ckpt_dir`` into ``module`` (the
    universal load leaves them at their initial values: a tag other than the saved one
    from :func:`resize_load`); returns how many."""
    import torch

    # ZeRO-3: every rank writes zero_pp_rank_R_mp_rank_00_model_states.pt (rank 0's
    # holds the buffers); ZeRO 0-2: rank 0 alone writes mp_rank_00_model_states.pt
    files = (sorted(ckpt_dir.glob("zero_pp_rank_0_mp_rank_00_model_states.pt"))
             or sorted(ckpt_dir.glob("mp_rank_00_model_states.pt")))
    if not files:
        raise ResumeError(f"{ckpt_dir}: no rank-0 model states file to restore buffers from")
    # mmap: only the buffers' pages are read. At ZeRO 0-2 the file holds the whole module
    # (InternImage-H: 2.2 GB in bf16), which every rank would otherwise read in full on a
    # resize (measured on a 1 GiB file: 1.9 s and +1 GiB RSS loaded, 0.01 s mmapped).
    saved = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    buffers = dict(module.named_buffers())
    names = saved.get("buffer_names", [])
    missing = [n for n in names if n not in buffers]
    if missing:
        raise ResumeError(f"{ckpt_dir}: saved buffers {missing[:3]} are not in this model")
    with torch.no_grad():
        for name in names:
            buffers[name].copy_(saved["module"][name])
    return len(names)
