"""Ranks sum their data totals as one vector of fixed slots (data/stats.py count_slots):
one all-reduce of ~60 numbers at each log step and save, instead of gathering every rank's
dict to rank 0 (point-to-point under NCCL: rank 0 connected to every rank, with GPU
buffers per peer, NVIDIA/nccl#1685). The sum must be what merging the dicts gave, and a
name outside the slots must be noticed (the trainer then gathers, losing nothing)."""

from __future__ import annotations

from collections import Counter

from data.stats import EVENTS, SKIP_REASONS, DataStats, count_slots, from_slots, to_slots
from pretrain.trainer import _merge_counts


def _rank(samples, skipped_by_source, events) -> dict:
    skipped = Counter()
    for counts in skipped_by_source.values():
        skipped.update(counts)
    return DataStats(Counter(samples), skipped,
                     {s: Counter(c) for s, c in skipped_by_source.items()},
                     Counter(events)).to_dict()


def test_summed_slots_are_the_merged_totals_of_every_rank():
    sources = ["laion400m", "yfcc15m", "cc12m"]
    slots = count_slots(sources)
    assert len(slots) == len(sources) * (1 + len(SKIP_REASONS)) + len(SKIP_REASONS) + len(
        EVENTS)
    ranks = [_rank({"laion400m": 300, "yfcc15m": 12}, {"laion400m": {"missing_image": 2}},
                   {"shards_opened": 5, "storage_wait_seconds": 0.25}),
             _rank({"laion400m": 280, "cc12m": 40},
                   {"cc12m": {"truncated_shard": 1, "lost_samples": 7}},
                   {"shards_opened": 4, "unknown_tags": 3, "storage_wait_seconds": 1.5}),
             _rank({}, {}, {})]  # a rank that has read nothing yet
    vectors = [to_slots(r, slots) for r in ranks]
    summed = [sum(column) for column in zip(*vectors)]
    assert from_slots(summed, slots) == _merge_counts(ranks)
    assert from_slots(summed, slots)["events"]["storage_wait_seconds"] == 1.75


def test_a_name_outside_the_slots_is_noticed():
    slots = count_slots(["laion400m"])
    assert to_slots(_rank({"other_source": 1}, {}, {}), slots) is None
    assert to_slots(_rank({}, {}, {"a_new_event": 1}), slots) is None
    assert to_slots(_rank({}, {"laion400m": {"a_new_reason": 1}}, {}), slots) is None


def _sum_rank(_unused: str = "") -> None:
    """One of 2 gloo ranks: the sum on every rank; None on every rank when one rank
    holds a count outside the slots."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch.distributed as dist

    from runtime.dist import global_rank, sum_over_ranks

    dist.init_process_group("gloo")
    rank = global_rank()
    assert rank == dist.get_rank()
    assert sum_over_ranks([1.0 + rank, 2.5 * rank, 2.0**40], 3) == [3.0, 2.5, 2.0**41]
    assert sum_over_ranks(None if rank == 1 else [1.0, 2.0, 3.0], 3) is None
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def test_sum_over_ranks_on_two_ranks():
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_sum_rank", 2, "x", timeout=120)
