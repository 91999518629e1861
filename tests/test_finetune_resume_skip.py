"""A fine-tuning run resumed mid-epoch does not read the batches it already trained on.

Before, the resumed epoch's loader loaded and decoded every skipped batch again (to keep
the workers' random streams in step): a resume near the end of an ImageNet-22k epoch on
64 ranks re-read ~220k images per rank before its first step, a COCO one ~15k
multi-scale-resized images per rank, a cost growing with the position in the epoch. Now
each training sample's augmentation is drawn from a seed of its own, (run seed, epoch,
index), so the epoch's sampler starts at the first untrained sample and the batches that
follow are the uninterrupted run's. The same draws also make augmentations independent of
``run.num_workers`` (torch seeds each worker with base_seed + worker_id, torch.utils.data
docs, "Randomness in multi-process data loading": before, another worker count drew other
augmentations).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from runtime.dist import DistInfo


class _Draws(torch.utils.data.Dataset):
    """Each sample is its index and draws from the three generators an augmentation uses
    (torchvision from torch, timm's RandAugment from numpy and ``random``), made where the
    sample is loaded; ``loaded`` lists the indices read in this process."""

    def __init__(self, n: int = 40):
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.loaded.append(i)
        return torch.tensor([float(i), torch.rand(()).item(), np.random.rand(),
                             random.random()]), 0

    def counted_item(self, i: int):
        return self[i], 0


def _dense(data, world: int, rank: int, workers: int = 0, batch: int = 2):
    from finetune.dense_data import train_batches

    return train_batches(data, DistInfo(rank=rank, world_size=world), batch_size=batch,
                         grad_accum=1, seed=3, num_workers=workers)[0]


def _cls(data, world: int, rank: int, workers: int = 0):
    from finetune.classification import ClassificationConfig
    from finetune.cls_data import build_loaders
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, [f"run.num_workers={workers}",
                                                   "run.batch_size=2", "run.seed=3"])

    def batches(epoch: int, skip: int = 0):
        train, _, sampler = build_loaders(cfg, DistInfo(rank=rank, world_size=world), data,
                                          data, epoch, skip=skip)
        if sampler is not None:
            sampler.set_epoch(epoch)
        return train
    return batches


def _values(loader) -> list[torch.Tensor]:
    return [b.batch[0] if hasattr(b, "batch") else b[0] for b in loader]


@pytest.mark.parametrize("build", [_dense, _cls], ids=["detection-segmentation",
                                                       "classification"])
@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_epoch_reads_only_the_samples_it_has_not_trained_on(build, world):
    for rank in range(world):
        data = _Draws()
        whole = _values(build(data, world, rank)(1))
        data.loaded.clear()
        torch.manual_seed(7)
        before = torch.get_rng_state()
        resumed = _values(build(data, world, rank)(1, skip=3))
        # the first 3 batches of 2 are never read; the rest are the uninterrupted run's
        assert len(data.loaded) == 2 * (len(whole) - 3), (world, rank)
        assert len(resumed) == len(whole) - 3
        for got, want in zip(resumed, whole[3:], strict=True):
            assert torch.equal(got, want), (world, rank)
        # loading in this process leaves its generators as they were (training draws
        # dropout and drop-path masks from them)
        assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("build", [_dense, _cls], ids=["detection-segmentation",
                                                       "classification"])
def test_augmentations_do_not_depend_on_the_worker_count(build):
    in_process = _values(build(_Draws(), 2, 1, workers=0)(0))
    in_worker = _values(build(_Draws(), 2, 1, workers=1)(0))
    for got, want in zip(in_worker, in_process, strict=True):
        assert torch.equal(got, want)


def test_samples_draw_differently_per_epoch_and_index():
    epoch0 = torch.cat(_values(_dense(_Draws(), 1, 0)(0)))
    epoch1 = torch.cat(_values(_dense(_Draws(), 1, 0)(1)))
    for draws in (epoch0, epoch1):  # every sample's draws differ from every other's
        assert len({tuple(row[1:].tolist()) for row in draws}) == len(draws)
    first = {int(r[0]): r[1:] for r in epoch0}
    second = {int(r[0]): r[1:] for r in epoch1}
    assert all(not torch.equal(first[i], second[i]) for i in first)
