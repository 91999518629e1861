"""The owed evaluation of a resume (runtime/loop.py ``_owed_evaluation``) asks rank 0
whether an earlier resume made it already (its marked record in metrics.jsonl). A read
that fails on rank 0 is every rank's refusal, raised together
(``runtime.dist.decided_on_rank0``): before, rank 0 raised alone and the others waited in
the broadcast of its answer until the collective timeout (10 minutes by default)."""

from __future__ import annotations

import pytest

import runtime.loop as loop
from runtime.checkpoint import ResumeError
from runtime.dist import DistInfo
from tests.fake_ranks import as_rank


class _UnreadableMetrics:
    def logged_at(self, step: int):
        raise OSError(116, "Stale file handle", "run/metrics.jsonl")


class _NotRead:
    def logged_at(self, step: int):
        raise AssertionError("only rank 0 reads the metrics file")


def _owed(metrics, rank: int):
    # nothing past the read is reached: no hooks, spec or best checkpoints needed
    return loop._owed_evaluation(None, None, loop.LoopPosition(6, eval_owed=True), metrics,
                                 DistInfo(rank=rank, world_size=2), ())


def test_rank_zero_sends_its_failure_to_read_and_raises_it(monkeypatch):
    sent = as_rank(monkeypatch, 0)
    with pytest.raises(ResumeError, match="step 6: rank 0 could not read .*Stale file"):
        _owed(_UnreadableMetrics(), 0)
    assert len(sent) == 1 and sent[0][0] is False and "Stale file handle" in sent[0][1]


def test_the_other_ranks_raise_it_without_waiting_or_reading(monkeypatch):
    as_rank(monkeypatch, 1, answer=(False, "OSError: [Errno 116] Stale file handle"))
    with pytest.raises(ResumeError, match="rank 0 could not read .*Stale file handle"):
        _owed(_NotRead(), 1)


def test_rank_zero_s_earlier_record_is_every_rank_s_result(monkeypatch):
    earlier = {"step": 6, "epoch": 1, "top1": 71.5, "time": 3.0, loop.OWED_MARK: True}
    as_rank(monkeypatch, 1, answer=(True, earlier))
    assert _owed(_NotRead(), 1) == {"top1": 71.5}


def test_a_lone_process_refuses_as_the_ranks_of_a_job_do():
    # one GPU, no process group: the same refusal (a one-line ResumeError), not an OSError
    with pytest.raises(ResumeError, match="step 6: rank 0 could not read .*Stale file"):
        loop._owed_evaluation(None, None, loop.LoopPosition(6, eval_owed=True),
                              _UnreadableMetrics(), DistInfo(), ())
