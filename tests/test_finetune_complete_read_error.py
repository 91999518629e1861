"""A finished fine-tuning run's resume (``FinetuneRun.completed``): rank 0 reads the run's
metrics.jsonl before a broadcast every rank waits in, so a failure to read it is sent to
every rank and raised by all as one refusal (it was raised by rank 0 alone, before the
broadcast: the other ranks waited there until the process group's timeout)."""

from __future__ import annotations

from pathlib import Path

import pytest

import finetune.engine as engine
from runtime.checkpoint import ResumeError
from runtime.dist import DistInfo


def test_an_unreadable_metrics_file_is_a_refusal_sent_to_every_rank(tmp_path, monkeypatch):
    sent = []

    def broadcast(obj, src=0):  # what rank 0 sends is what every rank receives
        sent.append(obj)
        return obj

    def unreadable(run_dir: Path, step: int):
        raise OSError(116, "Stale file handle", str(run_dir / "metrics.jsonl"))

    monkeypatch.setattr(engine, "broadcast_object", broadcast)
    monkeypatch.setattr(engine, "records_at", unreadable)
    run = engine.FinetuneRun(tmp_path, tmp_path / "checkpoints" / "step_0000002",
                             {"step": 2})
    with pytest.raises(ResumeError, match="metrics.jsonl: cannot read the finished run"):
        run.completed(2, DistInfo())
    assert len(sent) == 1 and sent[0][0] is False  # the refusal went through the broadcast
    assert run.completed(3, DistInfo()) is None  # steps left: nothing read, no collective
    assert len(sent) == 1
