"""A resume cuts ``metrics.jsonl`` back to its checkpoint's step (runtime/metrics.py
``truncate_after``): exactly the records past it go, and the cost is that of what is
removed, not of the run's whole history (a long run resumes as fast as a short one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import metrics
from runtime.metrics import MetricsFile, truncate_after


def _write(path: Path, steps, tail: bytes = b"") -> None:
    with path.open("wb") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 1.0 / s}).encode() + b"\n")
        f.write(tail)


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("block", [7, 64, 1 << 16])  # cuts across read boundaries too
@pytest.mark.parametrize("resume", [0, 1, 5, 37, 38, 100])
def test_records_past_the_resume_step_go_and_the_rest_stays_byte_for_byte(
        tmp_path, monkeypatch, block, resume):
    monkeypatch.setattr(metrics, "_BLOCK", block)
    path = tmp_path / "metrics.jsonl"
    # evaluation records share their step with a training record; the dead run's last
    # line was cut short mid-write
    steps = [1, 2, 3, 4, 5, 5, 10, 20, 30, 37, 37, 38, 50]
    _write(path, steps, tail=b'{"step": 51, "lo')
    before = path.read_bytes()
    truncate_after(path, resume)
    kept = [s for s in steps if s <= resume]
    assert _steps(path) == kept
    assert before.startswith(path.read_bytes())  # cut in place, nothing rewritten


def test_a_whole_last_record_without_its_newline_is_kept_and_appends_stay_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2], tail=b'{"step": 3, "loss": 0.5}')
    file = MetricsFile(tmp_path, True, resume_step=3)
    file.write(4, loss=0.25)
    assert _steps(path) == [1, 2, 3, 4]


def test_a_missing_file_stays_missing_and_a_fresh_start_empties_it(tmp_path):
    truncate_after(tmp_path / "none.jsonl", 3)
    assert not (tmp_path / "none.jsonl").exists()
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3])
    truncate_after(path, 0)
    assert path.read_bytes() == b""


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux /proc/self/io")
def test_a_resume_reads_what_it_removes_not_the_whole_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 200_001))  # ~7 MB: a long run's history
    size = path.stat().st_size
    start = _bytes_read()
    truncate_after(path, 199_990)  # the dead run logged 10 steps past its checkpoint
    read = _bytes_read() - start
    assert _steps(path)[-1] == 199_990
    assert read < 1 << 18, f"read {read} bytes of a {size}-byte file to drop 10 lines"
