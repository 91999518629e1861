"""What a training start (`internimage pretrain`, `internimage finetune`) reports in one
line, exit 2, instead of a traceback: one list for both commands."""

from __future__ import annotations

import sys
from pathlib import Path

from launch.config import REFUSED_STATUS


def training_refusals() -> tuple[type[Exception], ...]:
    """A refused resume or start (``CheckpointError``, the run lock's included;
    ``RefusedStart``: precision, an empty epoch, a one-image BatchNorm), a store the data
    cannot be read from (``StorageAccessError``), a source whose samples are all skipped
    (``UnusableSourceError``). Imported when called: the command line starts without
    torch."""
    from data.loader import UnusableSourceError
    from data.shard_schedule import StorageAccessError
    from models import CheckpointError
    from runtime.loop import RefusedStart

    return CheckpointError, StorageAccessError, UnusableSourceError, RefusedStart


def refusal_line(err: BaseException) -> str:
    """The one line a refusal ``err`` prints: its message, or, for one raised in a
    DataLoader worker process, the worker's own message.

    torch re-raises a worker's exception in the trainer with its type kept and its message
    replaced by ``Caught <type> in DataLoader worker process <n>.`` and the worker's whole
    traceback (torch/_utils.py ``ExceptionWrapper.reraise``), whose last entry is
    ``<module>.<type>: <message>`` (``traceback.format_exception``): that message is taken
    out, so a refusal met while reading the data (a label outside the classes, a store
    refusing its credentials) reads as one line there too."""
    text = str(err)
    kind = type(err)
    if not text.startswith(f"Caught {kind.__name__} ") or "\nOriginal Traceback" not in text:
        return text
    prefix = f"{kind.__module__}.{kind.__qualname__}: "
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):  # the last entry: its message may span lines
        if lines[i].startswith(prefix):
            return " ".join([lines[i][len(prefix):], *lines[i + 1:]]).strip()
    return text


def first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None: it exists):
    what a start creates, and a refused fresh start removes again (empty)."""
    path, top = path.absolute(), None
    while not path.exists():
        path, top = path.parent, path
    return top


def remove_empty_up_to(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents up to ``top`` while they are empty."""
    path = path.absolute()
    while True:
        try:
            path.rmdir()
        except OSError:  # not empty (another rank's files, a user's): left as it is
            return
        if path == top:
            return
        path = path.parent


# the exit status of a command ended by SIGINT, as a shell reports it (128 + 2)
INTERRUPTED_STATUS = 130


def interrupted_line(run_dir: Path, how: str = "interrupted") -> str:
    """What a training run stopped by Ctrl-C (or ended early ``how``) prints (rank 0),
    instead of every rank's traceback: where it can go on from (a save cut short is never
    ``latest``)."""
    from runtime.checkpoint_path import CHECKPOINTS_DIR, LATEST

    latest = run_dir / CHECKPOINTS_DIR / LATEST
    tag = latest.read_text().strip() if latest.is_file() else ""
    if not tag:
        return f"{how} before its first checkpoint: nothing to resume, start it again"
    return (f"{how}; its last complete checkpoint is {run_dir / CHECKPOINTS_DIR / tag}"
            ": go on with --resume auto")


def signal_status(result: dict, command: str, run_dir: Path, is_main: bool) -> int | None:
    """The exit status of a run that a stop signal (``runtime.preemption.stop_on_signals``:
    SIGTERM) ended early, saved: 128 + the signal's number, as a shell reports a process
    the signal ended, so that torchrun, a Kubernetes Job or a retry script never takes the
    run for finished; rank 0 prints where it goes on from. None: the run was not stopped by
    a signal (a run that finished as the signal came exits 0)."""
    from runtime.preemption import stop_signal

    sig = stop_signal()
    if sig is None or not result.get("stopped_early"):
        return None
    if is_main:
        how = f"stopped by {sig.name} at step {result.get('step')}, saved"
        print(f"internimage {command}: {interrupted_line(run_dir, how)}", file=sys.stderr,
              flush=True)
    return 128 + int(sig)


_last_refusal: list[BaseException] = []


def take_refusal() -> BaseException | None:
    """The refusal :func:`end_failed_start` reported last in this process and not taken
    yet (None if none): the SLURM job wrapper records whether a retry can help it
    (launch/slurm/job.py)."""
    return _last_refusal.pop() if _last_refusal else None


def end_failed_start(err: BaseException, command: str, run_dir: Path, created: Path | None,
                     is_main: bool) -> int:
    """What `internimage pretrain|finetune` does when its run ended by ``err`` (a refusal,
    an interrupt or a crash): rank 0 drops its staged config, releases the run lock and
    removes the folders a fresh start created (``created``, from :func:`first_missing`)
    while empty; then Ctrl-C gives one line and :data:`INTERRUPTED_STATUS`, a refusal
    (:func:`training_refusals`) one line and 2, anything else is raised again."""
    from runtime import run_lock
    from runtime.checkpoint import discard_config

    if is_main:  # (this process's own files; nothing once the config was published)
        discard_config(run_dir)
        run_lock.release()  # before the folder it lies in is removed
        if created is not None:  # a failed fresh start leaves no empty folder either
            remove_empty_up_to(run_dir, created)
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C: one line, not a traceback per rank
        if is_main:
            print(f"internimage {command}: {interrupted_line(run_dir)}", file=sys.stderr)
        return INTERRUPTED_STATUS
    if not isinstance(err, training_refusals()):
        raise err
    print(f"internimage {command}: {refusal_line(err)}", file=sys.stderr)  # one line, exit 2
    _last_refusal[:] = [err]
    return REFUSED_STATUS
