"""The progress bar of a run whose stderr is a job's log file (SLURM's, not a terminal):
tqdm keeps every redraw there, so at its default 0.1 s interval a run of ~1 s steps writes
one redraw per step (~100 bytes each: ~100 MB over an 800k-step run). Into a file the bar
redraws at most once per ``LOG_FILE_BAR_S``; on a terminal it stays live."""

from __future__ import annotations

import time

from runtime import metrics
from runtime.metrics import MetricsLogger


def _redraws(run_dir, capsys, steps: int, pause_s: float) -> int:
    logger = MetricsLogger(run_dir, True, steps, 0, tensorboard=False, progress=True)
    capsys.readouterr()
    for step in range(1, steps + 1):
        time.sleep(pause_s)
        logger.progress(step, loss="1.0")
    written = capsys.readouterr().err  # what a log file would hold (capsys: not a tty)
    logger.close()
    return written.count("\r")


def test_a_bar_written_into_a_log_file_redraws_rarely(tmp_path, capsys, monkeypatch):
    assert metrics.LOG_FILE_BAR_S >= 30
    # 12 steps 0.15 s apart: at tqdm's own 0.1 s interval each would be a redraw
    assert _redraws(tmp_path / "a", capsys, 12, 0.15) <= 1
    # the same with a 0.05 s interval for the log file: every step redraws (what the
    # bound stops, measured the same way)
    monkeypatch.setattr(metrics, "LOG_FILE_BAR_S", 0.05)
    assert _redraws(tmp_path / "b", capsys, 12, 0.15) >= 10
