"""Run metrics: ``metrics.jsonl`` (one JSON object per line), TensorBoard, a tqdm bar.

Only rank 0 writes. On resume, lines past the resumed step are dropped first, so the file
reads as one uninterrupted run (runtime/metrics.py, shared with fine-tuning).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from runtime.metrics import MetricsFile
from runtime.metrics import truncate_after as truncate_after  # re-exported (runtime/metrics.py)


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; drives the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        # the lines past ``start_step`` (left by a run that died after them) are dropped
        self.file = MetricsFile(run_dir, enabled, resume_step=start_step)
        self.path = self.file.path
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain",
                            dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record one line of metrics for ``step``."""
        if not self.enabled:
            return
        self.file.write(step, **values)
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self.writer.add_scalar(f"{key}/{sub}", v, step)

    def progress(self, step: int, loss: float, images_per_s: float) -> None:
        """Advance the bar to ``step`` and show loss and throughput."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")

    def close(self) -> None:
        """Flush and close the writers."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
