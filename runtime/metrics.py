"""``metrics.jsonl``: one JSON object per line, written by rank 0, exact across resumes.

A run killed after its last checkpoint has logged steps that its resumed run trains and
logs again. On resume the file is cut back to the checkpoint's step first, so it reads as
one uninterrupted run: every step once, with the values of the run that continued.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of ``path`` whose ``step`` is past ``step`` (and lines cut short by a
    crash mid-write); a missing file is left missing."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in keep))


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
