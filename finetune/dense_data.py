"""Training batches of the dense tasks (detection, segmentation): each epoch's DataLoader
and the optimizer steps it holds, derived from the one loader so they cannot disagree,
and the count of unreadable items replaced (``finetune.data_files.NextReadable``) that
travels with each batch to the training loop (:class:`Counted`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    default_collate,
    get_worker_info,
)

from runtime import rng
from runtime.dist import DistInfo
from runtime.loop import refuse_empty_epoch
from runtime.preemption import loader_worker_init

# the reason the training loop logs the replaced items under (metrics.jsonl ``skipped``,
# by reason, as classification and pre-training log theirs)
UNREADABLE = "unreadable"


class Counted(NamedTuple):
    """A training micro-batch and how many unreadable items its items replaced."""

    batch: Any
    replaced: int


class CountedItems(Dataset):
    """``dataset``'s training items of ``epoch`` as ``(item, replaced)`` (its
    ``counted_item(i)``), each augmented from its own seed (``runtime.rng.sample_seed`` of
    the run's ``seed``, the epoch and the index).

    The count is made where the item is read, in a DataLoader worker, and returns with it:
    a counter kept in the dataset would stay in the worker's copy of it. The seed makes an
    item's augmentation independent of what was loaded before it, in which worker: a
    resumed epoch starts its sampler at the first untrained sample
    (``runtime.rng.StartAt``) instead of loading the trained ones again, and
    ``run.num_workers`` changes no augmentation. Seeding costs ~15 us an item (the seed
    ~2 us, ``runtime.rng.seeded_host_rngs`` the rest; a decoded, augmented ImageNet image
    takes milliseconds); in the main process (no workers) the generators are given back
    after it (~140 us), since training draws dropout and drop-path masks from them."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        in_worker = get_worker_info() is not None
        with rng.seeded_host_rngs(rng.sample_seed(self.seed, self.epoch, i),
                                  restore=not in_worker):
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
                  ) -> tuple[Callable[..., DataLoader], int]:
    """``(batches, steps_per_epoch)``: ``batches(epoch, skip)`` is this rank's loader of
    that epoch from its micro-batch ``skip`` on (the samples before it are not read);
    ``steps_per_epoch`` the optimizer steps (``grad_accum`` micro-batches each) it yields,
    at least 1 (``runtime.loop.EmptyEpochError`` otherwise, before anything is built on
    it). The loader yields :class:`Counted` batches, read through
    ``train_set.counted_item`` (what ``finetune.loop.run_loop`` takes).

    Several ranks share the set through a ``DistributedSampler`` that pads each rank's
    share to ceil(len / world_size) samples (its ``drop_last=False``), so the count comes
    from the loader itself, not from ``len(train_set)``: with 17 images on 2 ranks each
    rank draws 9 batches of 1, not 8, and the epochs the schedule counts end where the
    loader's do (what a mid-epoch resume and the epoch cadence rely on).
    """
    collate_fn = CollateCounted(collate_fn)
    shared = DistributedSampler(train_set, d.world_size, d.rank, seed=seed) \
        if d.world_size > 1 else None

    def batches(epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's loader from micro-batch ``skip`` on (a resumed epoch's)."""
        g = rng.loader_generator(seed, d.rank, epoch)  # the order (one rank), worker seeds
        if shared is not None:
            shared.set_epoch(epoch)
        order = shared if shared is not None else RandomSampler(train_set, generator=g)
        return DataLoader(CountedItems(train_set, seed, epoch), batch_size,
                          sampler=rng.StartAt(order, skip * batch_size),
                          num_workers=num_workers, drop_last=True, collate_fn=collate_fn,
                          generator=g, worker_init_fn=loader_worker_init)

    # the loader's length: len(sampler) // batch_size whole batches (drop_last)
    steps = len(batches(0)) // grad_accum
    refuse_empty_epoch("training", steps, len(shared) if shared is not None
                       else len(train_set))
    return batches, steps
