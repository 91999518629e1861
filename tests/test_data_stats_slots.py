"""Ranks sum their data totals over fixed keys (data/stats.py count_slots) with one
all-reduce of ~60 numbers at each log step and save (runtime/dist.py sum_counts), instead
of gathering every rank's dict to rank 0 (point-to-point under NCCL: rank 0 connected to
every rank, with GPU buffers per peer, NVIDIA/nccl#1685). The sum must be every rank's
totals added up, and a key outside the list on any rank must make every rank gather
instead, losing nothing."""

from __future__ import annotations

from collections import Counter

from data.stats import (
    EVENTS,
    SKIP_REASONS,
    DataStats,
    count_slots,
    flat_counts,
    nested_counts,
)


def _rank(samples, skipped_by_source, events) -> dict:
    skipped = Counter()
    for counts in skipped_by_source.values():
        skipped.update(counts)
    return DataStats(Counter(samples), skipped,
                     {s: Counter(c) for s, c in skipped_by_source.items()},
                     Counter(events)).to_dict()


RANKS = [_rank({"laion400m": 300, "yfcc15m": 12}, {"laion400m": {"missing_image": 2}},
               {"shards_opened": 5, "storage_wait_seconds": 0.25}),
         _rank({"laion400m": 280, "cc12m": 40},
               {"cc12m": {"truncated_shard": 1, "lost_samples": 7}},
               {"shards_opened": 4, "unknown_tags": 3, "storage_wait_seconds": 1.5}),
         _rank({}, {}, {})]  # a rank that has read nothing yet
# the three ranks' totals added up by hand
MERGED = {"samples": {"laion400m": 580, "yfcc15m": 12, "cc12m": 40},
          "skipped": {"missing_image": 2, "truncated_shard": 1, "lost_samples": 7},
          "skipped_by_source": {"laion400m": {"missing_image": 2},
                                "cc12m": {"truncated_shard": 1, "lost_samples": 7}},
          "events": {"shards_opened": 9, "unknown_tags": 3, "storage_wait_seconds": 1.75}}
SOURCES = ["laion400m", "yfcc15m", "cc12m"]


def test_summed_slots_are_the_merged_totals_of_every_rank():
    slots = count_slots(SOURCES)
    assert len(slots) == len(SOURCES) * (1 + len(SKIP_REASONS)) + len(SKIP_REASONS) + len(
        EVENTS)
    flats = [flat_counts(r) for r in RANKS]
    assert all(set(f) <= set(slots) for f in flats)
    summed = {slot: sum(f.get(slot, 0) for f in flats) for slot in slots}
    assert nested_counts(summed) == MERGED


def test_a_name_outside_the_slots_is_noticed():
    slots = set(count_slots(["laion400m"]))
    assert set(flat_counts(_rank({"other_source": 1}, {}, {}))) - slots
    assert set(flat_counts(_rank({}, {}, {"a_new_event": 1}))) - slots
    assert set(flat_counts(_rank({}, {"laion400m": {"a_new_reason": 1}}, {}))) - slots


def _sum_rank(_unused: str = "") -> None:
    """One of 2 gloo ranks: sum_over_ranks on every rank (None on every rank when one
    holds a count outside the slots); sum_counts on rank 0, by the all-reduce and, with a
    key outside the list on one rank, by the gather."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch.distributed as dist

    from runtime.dist import global_rank, sum_counts, sum_over_ranks

    dist.init_process_group("gloo")
    rank = global_rank()
    assert rank == dist.get_rank()
    assert sum_over_ranks([1.0 + rank, 2.5 * rank, 2.0**40], 3) == [3.0, 2.5, 2.0**41]
    assert sum_over_ranks(None if rank == 1 else [1.0, 2.0, 3.0], 3) is None

    slots = count_slots(SOURCES)
    summed = sum_counts(flat_counts(RANKS[rank]), slots)
    # RANKS[2] read nothing: ranks 0 and 1 add up to MERGED
    assert (nested_counts(summed) == MERGED) if rank == 0 else summed is None
    odd = RANKS[rank] if rank == 0 else _rank({"other_source": 5}, {}, {"a_new_event": 1})
    summed = sum_counts(flat_counts(odd), slots)
    if rank == 0:
        want = {**RANKS[0], "samples": {**RANKS[0]["samples"], "other_source": 5},
                "events": {**RANKS[0]["events"], "a_new_event": 1}}
        assert nested_counts(summed) == want
    else:
        assert summed is None
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def test_sum_over_ranks_and_sum_counts_on_two_ranks():
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_sum_rank", 2, "x", timeout=120)
