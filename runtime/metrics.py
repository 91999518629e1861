"""Run metrics of every training job: ``metrics.jsonl``, TensorBoard and a tqdm bar.

``metrics.jsonl`` holds one JSON object per line, written by rank 0, exact across resumes.
A run killed after its last checkpoint has logged steps that its resumed run trains and
logs again. On resume the file is cut back to the checkpoint's step first, so it reads as
one uninterrupted run: every step once, with the values of the run that continued; the
TensorBoard writer hides those steps the same way (``purge_step``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


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


class MetricsFile:
    """Appends records to ``run_dir/metrics.jsonl`` (only where ``enabled``: rank 0).

    ``resume_step``: the step this run starts from (the resumed checkpoint's; 0 for a fresh
    start); records past it are removed when the file is opened (None: append to whatever
    is there). ``timestamp``: add the wall-clock time to each record (first key, ``time``).
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None,
                 timestamp: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled, self.timestamp = enabled, timestamp
        if enabled and resume_step is not None:
            truncate_after(self.path, resume_step)

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


class MetricsLogger:
    """``metrics.jsonl`` (:class:`MetricsFile`), TensorBoard events under
    ``run_dir/tensorboard`` and the progress bar of one run; only rank 0 (``enabled``)
    writes or shows anything.

    ``start_step``: the step the run starts from (the resumed checkpoint's; 0 for a fresh
    start). What a dead run logged past it is dropped from ``metrics.jsonl`` and hidden in
    TensorBoard: the writer opens with ``purge_step=start_step + 1``, which TensorBoard
    documents as discarding the events of a crashed run from that step on.
    """

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, *,
                 tensorboard: bool = True, progress: bool = True, desc: str = "train",
                 timestamp: bool = False):
        self.enabled = enabled
        self.file = MetricsFile(run_dir, enabled, resume_step=start_step, timestamp=timestamp)
        self.path = self.file.path
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        purge_step=start_step + 1)
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

    def progress(self, step: int, **postfix: str) -> None:
        """Advance the bar to ``step``; ``postfix``: what it shows beside (loss, img/s)."""
        if self.bar is None:
            return
        if postfix:  # shown at the next redraw (refreshing here would redraw every step)
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def flush(self) -> None:
        """Put the TensorBoard events written so far on disk (the writer buffers them):
        called with each checkpoint, so what a killed run leaves reaches its checkpoint."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the writers (TensorBoard's events reach the disk here)."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
