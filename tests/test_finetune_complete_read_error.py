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
from tests.fake_ranks import as_rank


def _unreadable(run_dir: Path, step: int):
    raise OSError(116, "Stale file handle", str(run_dir / "metrics.jsonl"))


def _finished_run(tmp_path: Path) -> engine.FinetuneRun:
    return engine.FinetuneRun(tmp_path, tmp_path / "checkpoints" / "step_0000002", {"step": 2})


def test_an_unreadable_metrics_file_is_a_refusal_sent_to_every_rank(tmp_path, monkeypatch):
    sent = as_rank(monkeypatch, 0)
    monkeypatch.setattr(engine, "records_at", _unreadable)
    run = _finished_run(tmp_path)
    with pytest.raises(ResumeError, match="metrics.jsonl: cannot read the finished run"):
        run.completed(2, DistInfo())
    assert len(sent) == 1 and sent[0][0] is False  # the refusal went through the broadcast
    assert "Stale file handle" in sent[0][1]
    assert run.completed(3, DistInfo()) is None  # steps left: nothing read, no collective
    assert len(sent) == 1


def test_the_other_ranks_raise_rank_zeros_refusal_without_reading(tmp_path, monkeypatch):
    refusal = "ResumeError: metrics.jsonl: cannot read the finished run's records (OSError)"
    sent = as_rank(monkeypatch, 1, answer=(False, refusal))

    def read(run_dir: Path, step: int):
        raise AssertionError("only rank 0 reads the file")

    monkeypatch.setattr(engine, "records_at", read)
    with pytest.raises(ResumeError, match="rank 0 refused: ResumeError: metrics.jsonl"):
        _finished_run(tmp_path).completed(2, DistInfo(rank=1, world_size=2))
    assert len(sent) == 1


def test_a_lone_process_refuses_an_unreadable_file_as_a_resume_error(tmp_path, monkeypatch):
    # no process group: the look runs here, still a refusal (exit status 2), not an OSError
    monkeypatch.setattr(engine, "records_at", _unreadable)
    with pytest.raises(ResumeError, match="Stale file handle"):
        _finished_run(tmp_path).completed(2, DistInfo())


def test_every_rank_returns_rank_zeros_evaluation(tmp_path, monkeypatch):
    evaluation = {"acc1": 81.5}
    as_rank(monkeypatch, 1, answer=(True, (evaluation, False)))
    monkeypatch.setattr(engine, "records_at", lambda run_dir, step: [])
    result = _finished_run(tmp_path).completed(2, DistInfo(rank=1, world_size=2))
    assert result == {"acc1": 81.5, "step": 2, "already_complete": True}
