"""One process standing in for a rank of a 2-rank job, as far as
``runtime.dist.decided_on_rank0`` sees: for the unit tests of rank-0 decisions (the same
decisions run on real gloo ranks in tests/test_finetune_init_once.py and
tests/test_resume_choice_rank0.py)."""

from __future__ import annotations

import runtime.dist as dist


def as_rank(monkeypatch, rank: int, answer=None) -> list:
    """Make this process rank ``rank`` of 2: its broadcast records what it sends (the
    returned list) and receives rank 0's ``answer`` (rank 0 receives what it sent)."""
    sent = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return obj if rank == 0 else answer

    monkeypatch.setattr(dist, "group_size", lambda: 2)
    monkeypatch.setattr(dist, "global_rank", lambda: rank)
    monkeypatch.setattr(dist, "broadcast_object", broadcast)
    return sent
