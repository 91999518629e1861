"""Training batches of the dense tasks (detection, segmentation): each epoch's DataLoader
and the optimizer steps it holds, derived from the one loader so they cannot disagree,
and the count of unreadable items replaced (``finetune.data_files.NextReadable``) that
travels with each batch to the training loop (:class:`Counted`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from runtime import rng
from runtime.dist import DistInfo
from runtime.loop import refuse_empty_epoch

# the reason the training loop logs the replaced items under (metrics.jsonl ``skipped``,
# by reason, as classification and pre-training log theirs)
UNREADABLE = "unreadable"


class Counted(NamedTuple):
    """A training micro-batch and how many unreadable items its items replaced."""

    batch: Any
    replaced: int


class CountedItems(Dataset):
    """``dataset``'s training items as ``(item, replaced)`` (its ``counted_item(i)``).

    The count is made where the item is read, in a DataLoader worker, and returns with it:
    a counter kept in the dataset would stay in the worker's copy of it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset.counted_item(i)


class CollateCounted:
    """Collate ``(item, replaced)`` pairs into one :class:`Counted`: the items through
    ``collate_fn``, the counts summed (a class, not a closure: workers started by
    ``spawn`` pickle it)."""

    def __init__(self, collate_fn: Callable | None = None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> Counted:
        return Counted(self.collate_fn([item for item, _ in pairs]),
                       sum(replaced for _, replaced in pairs))


def train_batches(train_set: Dataset, d: DistInfo, *, batch_size: int, grad_accum: int,
                  seed: int, num_workers: int, collate_fn: Callable | None = None,
                  ) -> tuple[Callable[[int], DataLoader], int]:
    """``(batches, steps_per_epoch)``: ``batches(epoch)`` is this rank's loader of that
    epoch; ``steps_per_epoch`` the optimizer steps (``grad_accum`` micro-batches each) it
    yields, at least 1 (``runtime.loop.EmptyEpochError`` otherwise, before anything is
    built on it). The loader yields :class:`Counted` batches, read through
    ``train_set.counted_item`` (what ``finetune.loop.run_loop`` takes).

    Several ranks share the set through a ``DistributedSampler`` that pads each rank's
    share to ceil(len / world_size) samples (its ``drop_last=False``), so the count comes
    from the loader itself, not from ``len(train_set)``: with 17 images on 2 ranks each
    rank draws 9 batches of 1, not 8, and the epochs the schedule counts end where the
    loader's do (what a mid-epoch resume and the epoch cadence rely on).
    """
    train_set, collate_fn = CountedItems(train_set), CollateCounted(collate_fn)
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
    steps = len(batches(0)) // grad_accum
    refuse_empty_epoch("training", steps, len(sampler) if sampler is not None
                       else len(train_set))
    return batches, steps
