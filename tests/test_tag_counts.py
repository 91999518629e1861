"""`internimage shards tags`'s counts (data/tags.py's TagCounts): memory that grows by a
few bytes per tag of a sample, not a Python set per sample, and the coverage figure it
prints: the fraction of tagged samples with at least one tag in the vocabulary."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from data.tags import TagCounts


def test_tag_counts_keep_a_few_bytes_per_sample():
    # YFCC-15M (configs/pretrain/internimage_h_m3i.yaml's tag source): a Python set per
    # sample (~740 B) held ~10 GiB; ids in flat arrays are 4 B per tag + 8 per sample
    n, names = 50_000, [f"tag{i}" for i in range(500)]
    counts = TagCounts()
    tracemalloc.start()
    try:
        for i in range(n):
            counts.add([names[i % 500], names[(7 * i) % 500], names[(13 * i) % 500]])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts.tagged == n and counts.tags[names[0]] > 0
    per_tag_table = 256 * 1024  # the Counter and the id table: 500 tags, not per sample
    assert peak < 64 * n + per_tag_table, f"{(peak - per_tag_table) / n:.0f} B per sample"


def test_coverage_is_the_fraction_of_tagged_samples_with_a_vocabulary_tag(monkeypatch):
    import data.tags

    monkeypatch.setattr(data.tags, "_COVERAGE_BLOCK", 7)  # blocks end mid-way too
    rng = random.Random(0)
    names = [f"w{i}" for i in range(40)]
    samples = [[rng.choice(names) for _ in range(rng.randint(0, 4))] for _ in range(500)]
    counts = TagCounts()
    for tags in samples:
        counts.add(tags)
    tagged = [set(tags) for tags in samples if tags]
    assert counts.tagged == len(tagged)
    for vocab in (names[:1], names[:5], names[10:30], ["never seen"], names, []):
        brute = sum(1 for s in tagged if s & set(vocab)) / len(tagged)
        assert counts.coverage(vocab) == pytest.approx(brute, abs=1e-12), vocab
    assert TagCounts().coverage(names) == 0.0
