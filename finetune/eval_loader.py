"""How a dense evaluation (detection: finetune/det_eval.py, segmentation:
finetune/seg_eval.py) reads its validation items: this rank's share of the set
(:func:`runtime.dist.rank_share`), in order, through a DataLoader with ``run.num_workers``
loader processes as training reads, so the images are decoded while the model runs on the
ones before them; the sequence of items, and so of forward passes each rank runs in
lock-step (runtime/lockstep.py), is the one a loop of ``val_set[i]`` over the share gives.

An item that cannot be read (:class:`~finetune.data_files.UnreadableFile`: a truncated
image, a label map that is no image) ends the evaluation with its own message naming the
file, whichever process read it: a loader worker's exception would otherwise reach the
evaluating process as torch's ``Caught ... in DataLoader worker process`` text around the
worker's traceback. (An evaluation over fewer items than the split holds would not be the
benchmark's number, so the item is not skipped.)"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data_files import UnreadableFile
from runtime.dist import DistInfo, rank_share
from runtime.preemption import loader_worker_init


class _Unreadable:
    """An item that could not be read: the message of the :class:`UnreadableFile` it
    raised, carried out of the loader worker to :func:`share_batches`, which raises it."""

    def __init__(self, message: str):
        self.message = message


class _ShareItems(Dataset):
    """``val_set``'s items at ``indices`` (this rank's share, in order); an unreadable
    item is an :class:`_Unreadable`."""

    def __init__(self, val_set: Sequence, indices: range):
        self.val_set, self.indices = val_set, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        try:
            return self.val_set[self.indices[i]]
        except UnreadableFile as err:
            return _Unreadable(str(err))


EVAL_LOADER_SEED = 0
"""Seed of every evaluation DataLoader's own generator (:func:`eval_generator`)."""


def eval_generator() -> torch.Generator:
    """A generator of its own for an evaluation ``DataLoader`` (``generator=``).

    Starting a DataLoader's iterator draws its workers' base seed from the loader's
    generator, or without one from torch's global RNG (even with ``num_workers=0``; torch
    docs, ``DataLoader(generator=)``), which training draws from too. An evaluation
    drawing there would shift every later random number of training: a run resumed after
    a stop at an evaluation step, or run with another ``eval_every``, would train on
    different randomness than the uninterrupted one. Evaluations draw nothing random
    themselves (their order and transforms are fixed), so one constant seed will do."""
    return torch.Generator().manual_seed(EVAL_LOADER_SEED)


def _as_list(batch: list) -> list:
    """The DataLoader's collate: the items as they are (images differ in size)."""
    return batch


def share_batches(val_set: Sequence, d: DistInfo, batch_size: int,
                  num_workers: int) -> Iterator[list]:
    """This rank's share of ``val_set`` (:func:`runtime.dist.rank_share`), in order, as
    lists of ``batch_size`` items (the last one shorter), read by ``num_workers`` loader
    processes (0: by this one), never drawing from torch's global RNG
    (:func:`eval_generator`).

    A batch holding an item that cannot be read is not yielded: its
    :class:`UnreadableFile` is raised here, with the message the read gave (naming the
    file), so the batches before it have been evaluated and none after it."""
    loader = DataLoader(_ShareItems(val_set, rank_share(len(val_set), d)),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_as_list, generator=eval_generator(),
                        worker_init_fn=loader_worker_init)
    for batch in loader:
        for item in batch:
            if isinstance(item, _Unreadable):
                raise UnreadableFile(item.message)
        yield batch
