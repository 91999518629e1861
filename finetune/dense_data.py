"""Training batches of the dense tasks (detection, segmentation): each epoch's DataLoader
and the optimizer steps it holds, derived from the one loader so they cannot disagree."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from runtime import rng
from runtime.dist import DistInfo


def train_batches(train_set: Dataset, d: DistInfo, *, batch_size: int, grad_accum: int,
                  seed: int, num_workers: int, collate_fn: Callable | None = None,
                  ) -> tuple[Callable[[int], DataLoader], int]:
    """``(batches, steps_per_epoch)``: ``batches(epoch)`` is this rank's loader of that
    epoch; ``steps_per_epoch`` the optimizer steps (``grad_accum`` micro-batches each) it
    yields, at least 1 (the training loop refuses an epoch without one).

    Several ranks share the set through a ``DistributedSampler`` that pads each rank's
    share to ceil(len / world_size) samples (its ``drop_last=False``), so the count comes
    from the loader itself, not from ``len(train_set)``: with 17 images on 2 ranks each
    rank draws 9 batches of 1, not 8, and the epochs the schedule counts end where the
    loader's do (what a mid-epoch resume and the epoch cadence rely on).
    """
    sampler = DistributedSampler(train_set, d.world_size, d.rank, seed=seed) \
        if d.world_size > 1 else None

    def batches(epoch: int) -> DataLoader:
        if sampler is not None:
            sampler.set_epoch(epoch)
        g = rng.loader_generator(seed, d.rank, epoch)  # workers' seeds: per rank and epoch
        return DataLoader(train_set, batch_size, shuffle=sampler is None, sampler=sampler,
                          num_workers=num_workers, drop_last=True, collate_fn=collate_fn,
                          generator=g)

    # the loader's length: len(sampler) // batch_size whole batches (drop_last)
    return batches, max(1, len(batches(0)) // grad_accum)
