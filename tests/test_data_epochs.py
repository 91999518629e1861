"""Epochs without replacement (issue #14): every shard once per epoch whatever the slot
count, small sources split into disjoint sample ranges, the configured mix kept."""

from __future__ import annotations

from collections import Counter

import numpy as np
from s3_server import good_samples, write_tar

from data.config import S3Config
from data.epochs import deal, extra_offsets, first_slot, parts_per_shard, slot_units
from data.stats import SkipCounter
from data.stream import MixedStream, SourceCursor, SourceStream

# The shard counts of configs/pretrain/internimage_h_m3i.yaml, the recipe these epochs are
# for: Laion-400M s3://laion400m/{000000..041407}.tar (41,408 shards, img2dataset's
# 10,000-sample shards), YFCC-15M {000000..001499} (1,500) and CC12M {000000..001242}
# (1,243): 44,151 shards. Weights as in the recipe, proportional to the sizes
# (400 : 15 : 12).
H_SOURCES = {"laion400m": 41_408, "yfcc15m": 1_500, "cc12m": 1_243}
H_WEIGHTS = {"laion400m": 400.0, "yfcc15m": 15.0, "cc12m": 12.0}
SLOTS = 512 * 8  # 512 GPUs x 8 loader workers (issue #14's largest layout)


def _unit_sizes(counts: np.ndarray, parts: int) -> np.ndarray:
    """Samples in each unit (part r of m of a shard of c samples: indices r, r+m, ...)."""
    r = np.arange(parts)
    return ((counts[:, None] - r[None, :] + parts - 1) // parts).clip(min=0).reshape(-1)


def _deal_all(source: str, shards: int, counts: np.ndarray, epochs: int):
    """Per epoch: units each slot holds and samples they hold; checks the dealing."""
    parts = parts_per_shard(shards, SLOTS)
    sizes = _unit_sizes(counts, parts)
    units = [n * parts_per_shard(n, SLOTS) for n in H_SOURCES.values()]
    offsets, stride = extra_offsets(units, SLOTS)
    offset = offsets[list(H_SOURCES).index(source)]
    held, samples = np.zeros((epochs, SLOTS)), np.zeros((epochs, SLOTS))
    for epoch in range(epochs):
        dealt = deal(shards * parts, SLOTS, 0, source, epoch,
                     start=first_slot(SLOTS, epoch, offset, stride))
        held[epoch] = [len(units) for units in dealt]
        every = np.concatenate(dealt)
        # every unit (so every sample of every shard) dealt to exactly one slot
        assert np.array_equal(np.sort(every), np.arange(shards * parts)), source
        # every slot holds every source in every epoch: it can always draw it
        assert held[epoch].min() >= 1, (source, epoch)
        samples[epoch] = np.bincount(np.repeat(np.arange(SLOTS), held[epoch].astype(int)),
                                     weights=sizes[every], minlength=SLOTS)
    return held * SLOTS / (shards * parts), np.cumsum(samples, axis=0)


def test_full_scale_three_epochs_every_shard_once_and_the_mix_kept():
    rng = np.random.default_rng(0)
    names = list(H_SOURCES)
    weights = np.array([H_WEIGHTS[s] for s in names])
    # Shards of img2dataset hold up to 10,000 samples, fewer where downloads failed:
    # 9,000-10,000 per shard here (a model of the counts, which the loader never needs).
    counts = {s: rng.integers(9_000, 10_001, n) for s, n in H_SOURCES.items()}
    epochs = 5
    share, reach = zip(*(_deal_all(s, H_SOURCES[s], counts[s], epochs) for s in names),
                       strict=True)
    # Mixer draws per slot for 3 epochs of Laion-400M plus 8%, in steps of 1,000 draws
    # (41,408 shards over 4,096 slots: 448 slots hold 11 shards, the others 10, so an
    # epoch ends on a slot at most one shard after it ends on an average one);
    # within a step each slot picks sources with probability ~ weight x its epoch share
    # (data.stream.MixedStream; its own draw distribution is checked below).
    per_epoch = int(counts["laion400m"].sum()) / SLOTS / (weights[0] / weights.sum())
    drawn = np.zeros((SLOTS, len(names)), dtype=np.int64)
    slots = np.arange(SLOTS)
    for _ in range(int(1.08 * 3 * per_epoch / 1000) + 1):
        epoch = np.stack([(reach[k] <= drawn[:, k][None, :]).sum(axis=0)
                          for k in range(len(names))], axis=1)
        assert epoch.max() < epochs, "simulate enough epochs"
        p = weights[None, :] * np.stack([share[k][epoch[:, k], slots]
                                         for k in range(len(names))], axis=1)
        drawn += rng.multinomial(1000, p / p.sum(axis=1, keepdims=True))
    for k, source in enumerate(names):
        completed = (reach[k] <= drawn[:, k][None, :]).sum(axis=0)
        # 3 epochs completed by every slot: each shard read exactly once in each of them
        assert completed.min() >= 3, (source, np.bincount(completed))
        # and no slot runs more than an epoch ahead of another
        assert completed.max() - completed.min() <= 1, (source, np.bincount(completed))
    mix = drawn.sum(axis=0) / drawn.sum()
    np.testing.assert_allclose(mix, weights / weights.sum(), rtol=0.01)


def test_the_mixer_draws_sources_by_weight():
    # Counter-based draws (data.stream.MixedStream._pick): the frequencies must match the
    # configured weights (5 binomial standard deviations).
    mixer = MixedStream(lambda _: [], [400.0, 15.0, 12.0], seed=3, slot=17, block_size=1,
                        counter=SkipCounter())
    n = 60_000
    picks = Counter(mixer._pick(k, [0, 1, 2]) for k in range(n))
    for i, w in enumerate([400.0, 15.0, 12.0]):
        p = w / 427.0
        assert abs(picks[i] / n - p) < 5 * (p * (1 - p) / n) ** 0.5, (i, picks)


def test_a_source_with_fewer_shards_than_slots_is_read_once_per_epoch_in_parts(tmp_path):
    # 2 shards of 9 samples over 5 slots: each shard in 3 parts (samples i mod 3), 6 units
    # dealt over 5 slots; together the slots read each sample exactly once per epoch.
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 9, size=8)))
            for i in range(2)]
    assert parts_per_shard(2, 5) == 3
    for epoch in range(2):
        seen: Counter = Counter()
        for slot in range(5):
            stream = SourceStream("s", urls, slot, 5, seed=1, s3=S3Config(),
                                  counter=SkipCounter(), cursor=SourceCursor(epoch=epoch))
            n = 3 * len(slot_units(6, 5, slot, 1, "s", epoch))
            it = iter(stream)
            seen.update(next(it)["__key__"] for _ in range(n))
        assert seen == Counter({f"s{i}-{j:04d}": 1 for i in range(2) for j in range(9)}), \
            epoch
