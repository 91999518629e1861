"""Run metrics of every training job: ``metrics.jsonl``, TensorBoard and a tqdm bar.

``metrics.jsonl`` holds one JSON object per line, written by rank 0, exact across resumes.
A run killed after its last checkpoint has logged steps that its resumed run trains and
logs again. On resume the file is cut back to the checkpoint's step first, so it reads as
one uninterrupted run: every step once, with the values of the run that continued; the
TensorBoard writer hides those steps the same way (``purge_step``).

What a resume cuts is kept in ``metrics.jsonl.cut`` (:data:`CUT_SUFFIX`) until the resumed
run's first checkpoint (:meth:`MetricsLogger.checkpointed`): a rewind (a resume from an
earlier checkpoint) can be undone until then by resuming a later checkpoint of the old
branch, whose records it cut. The cut file lists the checkpoints past its step when it
was made; while no other is there, no checkpoint was saved since (a save published by a
run killed before it removed the cut file adds one: the cut file is then void), so the
records after its step in ``metrics.jsonl`` belong to no checkpoint: a resume builds the
run's lineage from the file up to the cut file's step plus the cut file, keeps it up to
its own step in ``metrics.jsonl`` (re-logged in TensorBoard past the purge) and the rest
in a new cut file (:func:`cut_back`). Each step is ordered so that a
kill in between leaves the same lineage to the next resume. Cost: the records after the
cut (what a run logged past its checkpoint, or the rewind's distance), never the history,
and one listing of ``checkpoints/`` (``run.keep_last`` folders and a few).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"  # a run's TensorBoard events, under its run directory


_BLOCK = 1 << 16  # bytes read at a time when looking for the cut from the end


LOG_FILE_BAR_S = 60.0  # seconds between progress-bar redraws when stderr is not a terminal


def _lines_backwards(f, end: int):
    """(offset, bytes) of each line of the binary file ``f`` up to offset ``end``, the
    last first; a line keeps its newline (the last one may have none)."""
    pos, tail = end, b""  # tail: the file's bytes from pos to the last line not yet given
    while tail or pos > 0:
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0 or pos == 0:
            yield pos + cut + 1, tail[cut + 1:]
            tail = tail[:cut + 1]
            continue
        start = max(0, pos - _BLOCK)
        f.seek(start)
        tail, pos = f.read(pos - start) + tail, start


def truncate_after(path: Path, step: int) -> None:
    """Drop the records of ``path`` whose ``step`` is past ``step`` (and lines cut short
    by a crash mid-write among them); a missing file is left missing.

    Steps never decrease down the file, so the cut is the end of the last whole record
    at or before ``step``, found by reading backwards from the end: a resume reads the
    lines it removes, not the whole file (its cost does not grow with the run's length),
    and the file is cut in place, never rewritten (a kill meanwhile loses nothing more).
    """
    if not path.is_file():
        return
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep, line = 0, b"\n"
        for offset, line in _lines_backwards(f, end):
            try:
                record = json.loads(line)
            except ValueError:  # cut short by a crash mid-write, or not a record at all
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep = offset + len(line)
                break
        else:
            line = b"\n"
        if keep < end:
            f.truncate(keep)
        if not line.endswith(b"\n"):  # a whole last record whose newline was not written
            f.seek(keep)
            f.write(b"\n")


CUT_SUFFIX = ".cut"


def _step(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:  # cut short by a crash mid-write, or not a record at all
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def _tail(path: Path, step: int) -> list[bytes]:
    """The whole records of ``path`` past ``step``, in file order (read from the end)."""
    if not path.is_file():
        return []
    lines = []
    with path.open("rb") as f:
        for _, line in _lines_backwards(f, f.seek(0, os.SEEK_END)):
            found = _step(line)
            if found is not None and found <= step:
                break
            if found is not None:
                lines.append(line if line.endswith(b"\n") else line + b"\n")
    return lines[::-1]


def _saves_past(path: Path, step: int) -> list[str]:
    """An identity (modification time and size of its ``trainer_state.json``, which a save
    writes last; kept by a rename) of each complete checkpoint past ``step`` in the run
    directory of ``path``, staging folders included: one listing of ``checkpoints/``."""
    from runtime.checkpoint_path import CHECKPOINTS_DIR

    out = []
    for folder in (path.parent / CHECKPOINTS_DIR).glob("step_*"):
        digits = folder.name[len("step_"):].split(".")[0]
        if not digits.isdigit() or int(digits) <= step:
            continue
        try:
            st = (folder / "trainer_state.json").stat()
        except OSError:  # incomplete, or a folder derived from a checkpoint
            continue
        out.append(f"{st.st_mtime_ns}-{st.st_size}")
    return sorted(out)


def _read_cut(path: Path, cut: Path) -> tuple[int, list[bytes]] | None:
    """(the step a resume cut back to, the records it cut) of a cut file, None when there
    is none, it is damaged, or a checkpoint was saved since it was made (one past its
    step that it does not list: a save published before the run could remove the cut
    file; then the file alone is the lineage, as before)."""
    try:
        head, *lines = cut.read_bytes().splitlines(keepends=True)
        meta = json.loads(head)
        step, known = int(meta["cut_after"]), set(meta["saves_past"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not set(_saves_past(path, step)) <= known:
        return None
    return step, [x for x in lines if _step(x) is not None]


def _write_cut(path: Path, cut: Path, step: int, lines: list[bytes]) -> None:
    """Replace ``cut`` atomically with the records ``lines`` cut back to ``step`` and the
    checkpoints past ``step`` there are now (removed when there are no records)."""
    if not lines:
        cut.unlink(missing_ok=True)
        return
    head = {"cut_after": step, "saves_past": _saves_past(path, step)}
    tmp = cut.with_name(cut.name + ".tmp")
    tmp.write_bytes(json.dumps(head).encode() + b"\n" + b"".join(lines))
    os.replace(tmp, cut)


def cut_back(path: Path, step: int, before_change: Callable[[int, list[dict[str, Any]]], None]
             | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Make ``path`` read as the run's lineage up to ``step`` (a resume from that step),
    keeping what follows in the cut file; returns (the first step TensorBoard must purge,
    the records put back past it, to re-log there). See the module docstring.

    ``before_change``: called with that pair before the file or the cut file is touched,
    and only where the lineage past ``step`` changes (the file holds records past ``step``
    or a cut file is there); a kill after it leaves the same repair to the next call."""
    cut = path.with_name(path.name + CUT_SUFFIX)
    saved = _read_cut(path, cut)
    if saved is None or step <= saved[0]:
        # the lineage past ``step`` is the file's past ``step`` (and, past the cut file's
        # step, the cut file's instead): kept first, then the file is cut in place
        later = _tail(path, step)
        if before_change is not None and (later or cut.exists()):
            before_change(step + 1, [])
        if saved is not None:  # the file's records past the cut file's step are no one's
            later = [x for x in later if _step(x) <= saved[0]] + saved[1]
        _write_cut(path, cut, step, later)
        truncate_after(path, step)
        return step + 1, []
    base, cut_lines = saved
    back = [x for x in cut_lines if _step(x) <= step]
    restored = [json.loads(x) for x in back]
    if before_change is not None:
        before_change(base + 1, restored)
    # the file first (the old cut file still describes the lineage if a kill comes
    # between), then the cut file
    truncate_after(path, base)
    with path.open("ab") as f:
        f.write(b"".join(back))
    _write_cut(path, cut, step, [x for x in cut_lines if _step(x) > step])
    return base + 1, restored


def records_at(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """The records ``run_dir``'s metrics file holds at ``step``, in file order, for a
    resume from ``step`` that trains nothing (a finished run): rank 0 only. The lineage is
    repaired first, as a training resume's :class:`MetricsFile` does (:func:`cut_back`: a
    rewind killed before its first checkpoint is undone, its cut records put back), then
    read from the end, stopping at the first record before ``step``: the cost does not
    grow with the run's length. Where the repair changes the lineage, the run's TensorBoard
    copy (if it has one) is mended as a training resume's :class:`MetricsLogger` mends it
    (:func:`mend_tensorboard`), before the file is changed: a kill in between leaves the
    repair to the next call."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    board = Path(run_dir) / TENSORBOARD_DIR

    def mend(purge_from: int, restored: list[dict[str, Any]]) -> None:
        if board.is_dir():  # a run logged without TensorBoard gains none
            mend_tensorboard(run_dir, purge_from, restored).close()

    cut_back(path, step, before_change=mend)
    found = []
    with path.open("rb") as f:
        for _, line in _lines_backwards(f, f.seek(0, os.SEEK_END)):
            at = _step(line)
            if at is not None and at < step:
                break
            if at == step:
                found.append(json.loads(line))
    return found[::-1]


class MetricsFile:
    """Appends records to ``run_dir/metrics.jsonl`` (only where ``enabled``: rank 0).

    ``resume_step``: the step this run starts from (the resumed checkpoint's; 0 for a fresh
    start); records past it are removed when the file is opened, into the cut file
    (:func:`cut_back`; None: append to whatever is there). ``purge_from`` and ``restored``
    are what TensorBoard must hide and re-log. ``timestamp``: add the wall-clock time to
    each record (first key, ``time``). ``before_change``: :func:`cut_back`'s hook, called
    with that pair before the file is touched where the cut changes the lineage.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None,
                 timestamp: bool = False,
                 before_change: Callable[[int, list[dict[str, Any]]], None] | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled, self.timestamp = enabled, timestamp
        self.purge_from = (resume_step or 0) + 1
        self.restored: list[dict[str, Any]] = []
        self._cut_pending = False
        if enabled and resume_step is not None:
            self.purge_from, self.restored = cut_back(self.path, resume_step, before_change)
            self._cut_pending = True

    def checkpointed(self) -> None:
        """A checkpoint of this run is complete: the records cut at its start belong to
        no checkpoint any more (a rewind is final once the old branch is pruned)."""
        if self._cut_pending:
            self.path.with_name(self.path.name + CUT_SUFFIX).unlink(missing_ok=True)
            self._cut_pending = False

    def logged_at(self, step: int) -> list[dict[str, Any]]:
        """The records this file holds at ``step``, in file order, read from the end (the
        cost does not grow with the run); [] where this rank writes nothing."""
        if not self.enabled:
            return []
        return [json.loads(x) for x in _tail(self.path, step - 1) if _step(x) == step]

    def write(self, step: int, **values: Any) -> dict[str, Any]:
        """Append one record for ``step``; returns it (as written, without the time)."""
        record = {"step": step, **values}
        if self.enabled:
            line = ({"time": round(time.time(), 3)} | record) if self.timestamp else record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        return record


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a record: finite numbers, and one level of nested dicts
    as ``key/sub`` (e.g. the per-source data mix)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
        elif isinstance(value, dict):
            out.update({f"{key}/{sub}": v for sub, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def mend_tensorboard(run_dir: Path, purge_from: int, restored: list[dict[str, Any]]):
    """A TensorBoard writer of ``run_dir`` that hides every step from ``purge_from`` on
    (``purge_step``: what a dead run or an abandoned branch logged there) and has re-logged
    ``restored`` (the records :func:`cut_back` put back past it), flushed to disk: the
    one mending of a repaired lineage's TensorBoard copy, by a training resume
    (:class:`MetricsLogger`, which logs on with the writer) and by a finished run's resume
    (:func:`records_at`, which closes it)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_from)
    for record in restored:  # an undone rewind's records, put back
        for tag, value in _scalars(record).items():
            if tag not in ("step", "time"):  # as :meth:`MetricsLogger.log` adds them
                writer.add_scalar(tag, value, record["step"])
    writer.flush()  # the purge too: on disk before the caller changes metrics.jsonl
    return writer


class MetricsLogger:
    """``metrics.jsonl`` (:class:`MetricsFile`), TensorBoard events under
    ``run_dir/tensorboard`` and the progress bar of one run; only rank 0 (``enabled``)
    writes or shows anything.

    ``start_step``: the step the run starts from (the resumed checkpoint's; 0 for a fresh
    start). What a dead run logged past it is dropped from ``metrics.jsonl`` and hidden in
    TensorBoard: the writer opens with ``purge_step=start_step + 1``, which TensorBoard
    documents as discarding the events of a crashed run from that step on (or from an
    undone rewind's step, with the records put back re-logged: :func:`mend_tensorboard`).
    Where the resume changes the lineage, that writer is opened, and its purge flushed,
    by :func:`cut_back`'s ``before_change`` hook, before ``metrics.jsonl`` or its cut file
    is touched, as :func:`records_at` does: a kill after the cut leaves TensorBoard
    mended, a kill before it leaves the cut (and the mending) to the next resume. The
    run logs on with that writer.
    """

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, *,
                 tensorboard: bool = True, progress: bool = True, desc: str = "train",
                 timestamp: bool = False):
        self.enabled = enabled
        self.writer = None
        self.bar = None

        def mend(purge_from: int, restored: list[dict[str, Any]]) -> None:
            self.writer = mend_tensorboard(run_dir, purge_from, restored)

        try:
            self.file = MetricsFile(run_dir, enabled, resume_step=start_step,
                                    timestamp=timestamp,
                                    before_change=mend if enabled and tensorboard else None)
        except BaseException:
            if self.writer is not None:  # its purge is on disk already
                self.writer.close()
            raise
        self.path = self.file.path
        if not enabled:
            return
        if tensorboard and self.writer is None:  # the lineage past start_step is unchanged
            self.writer = mend_tensorboard(run_dir, self.file.purge_from, self.file.restored)
        if progress:
            import sys

            from tqdm import tqdm

            # into a job's log file (not a terminal) each redraw is kept: at tqdm's 0.1 s
            # one per step, ~100 MB over a 800k-step run; there once a minute is plenty
            tty = sys.stderr.isatty()  # (tqdm's monitor redraws after maxinterval too)
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc,
                            dynamic_ncols=True, mininterval=0.1 if tty else LOG_FILE_BAR_S,
                            maxinterval=10.0 if tty else LOG_FILE_BAR_S)

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Record ``values`` for ``step`` (jsonl line and TensorBoard scalars); returns the
        record as written, without the time (also where this rank writes nothing)."""
        record = self.file.write(step, **values)
        if self.writer is not None:
            for tag, value in _scalars(values).items():
                self.writer.add_scalar(tag, value, step)
        return record

    def logged_at(self, step: int) -> list[dict[str, Any]]:
        """The records of ``step`` so far (rank 0; see :meth:`MetricsFile.logged_at`)."""
        return self.file.logged_at(step)

    def progress(self, step: int, **postfix: str) -> None:
        """Advance the bar to ``step``; ``postfix``: what it shows beside (loss, img/s)."""
        if self.bar is None:
            return
        if postfix:  # shown at the next redraw (refreshing here would redraw every step)
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def checkpointed(self) -> None:
        """A checkpoint is complete (runtime/loop.py): see :meth:`MetricsFile.checkpointed`."""
        self.file.checkpointed()

    def sync(self) -> None:
        """Put every record written so far on disk, durably: ``metrics.jsonl`` and the
        TensorBoard events (the writer buffers them; flushed, then fsynced). Called before
        each checkpoint's save (runtime/loop.py): a node that crashes after its publish
        would otherwise lose the records of the steps before it from the page cache, and
        the resume, which logs from the checkpoint's step on, would leave them missing for
        good. One fsync of each file per checkpoint, on rank 0."""
        from runtime.checkpoint import fsync_path

        paths = [self.path] if self.file.enabled and self.path.is_file() else []
        if self.writer is not None:
            self.writer.flush()
            # the writer's own event file, as tensorboard's EventFileWriter names it (else
            # every event file of the folder: one per start of the run)
            events = getattr(getattr(self.writer, "file_writer", None), "event_writer", None)
            name = getattr(events, "_file_name", None)
            paths += ([Path(name)] if name else
                      list(Path(self.writer.get_logdir()).glob("events.out.tfevents.*")))
        for path in paths:
            try:
                fsync_path(path)
            except OSError as err:  # the records' durability is not worth the run: rank 0
                # alone here, just before the collective save
                log.warning("could not fsync %s before the checkpoint: %s", path, err)

    def close(self) -> None:
        """Flush and close the writers (TensorBoard's events reach the disk here)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
