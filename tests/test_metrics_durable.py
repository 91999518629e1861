"""The records up to a checkpoint are fsynced before its save (runtime/loop.py ``_save``,
``MetricsLogger.sync``): a node crash after the publish used to lose, from the page
cache, the metrics.jsonl lines and TensorBoard events of the steps before it, and the
resume logs only from the checkpoint's step on (a gap for good). The checkpoint's own
files were fsynced already (runtime/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import runtime.checkpoint as ck
from runtime.loop import LoopPosition, TaskHooks, _save
from runtime.metrics import MetricsLogger


def test_metrics_and_events_are_on_disk_before_the_checkpoint_is_saved(tmp_path,
                                                                       monkeypatch):
    synced: list[str] = []
    monkeypatch.setattr(ck, "fsync_path", lambda path: synced.append(Path(path).name))
    metrics = MetricsLogger(tmp_path, True, 10, 0, tensorboard=True, progress=False)
    try:
        metrics.log(4, {"loss": 1.25})
        seen_at_save: list[list[str]] = []
        hooks = TaskHooks(batches=lambda epoch, skip: [], train_step=lambda b: None,
                          evaluate=dict, save=lambda pos: seen_at_save.append(list(synced)))
        _save(hooks, LoopPosition(4), metrics)
    finally:
        metrics.close()
    [before] = seen_at_save
    assert "metrics.jsonl" in before
    events = [p.name for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*")]
    assert events and set(events) <= set(before)  # the writer's file, flushed then synced
