"""Detection evaluation: COCO bbox (and segm) AP with pycocotools."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.data_files import UnreadableFile
from finetune.det_config import DetectionConfig
from finetune.det_data import CocoInstances, needs_masks
from runtime.dist import DistInfo, rank_share
from runtime.lockstep import lockstep


def _sizes(cfg: DetectionConfig) -> tuple[list[int], int]:
    """(train shorter sides, test shorter side) of the detector in use."""
    if cfg.head.kind == "dino":
        return list(cfg.head.train_sizes), cfg.head.test_size
    return list(cfg.detector.train_sizes), cfg.detector.test_size


class _Unreadable:
    """An evaluation item whose image could not be read: the message of the
    :class:`UnreadableFile` it raised, carried to the evaluation loop, which raises it
    there (a DataLoader worker's exception reaches the main process as torch's
    ``Caught ... in DataLoader worker process`` text with the worker's traceback)."""

    def __init__(self, message: str):
        self.message = message


class _EvalItems(Dataset):
    """``val_set``'s items at ``indices`` (this rank's share, in order); an unreadable
    image's item is an :class:`_Unreadable`."""

    def __init__(self, val_set: CocoInstances, indices: range):
        self.val_set, self.indices = val_set, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        try:
            return self.val_set[self.indices[i]]
        except UnreadableFile as err:
            return _Unreadable(str(err))


def _as_list(batch: list) -> list:
    """The DataLoader's collate: the items as they are (images differ in size)."""
    return batch


def val_batches(val_set: CocoInstances, cfg: DetectionConfig, d: DistInfo) -> DataLoader:
    """This rank's share of ``val_set`` (:func:`runtime.dist.rank_share`), in order, in
    lists of ``run.batch_size`` items (the last one shorter), read by ``run.num_workers``
    loader processes (0: in this one) as training reads, so the images are decoded while
    the model runs on the batch before them (tens of milliseconds a COCO-size JPEG, which
    the model waited for when the evaluating process read the items itself)."""
    return DataLoader(_EvalItems(val_set, rank_share(len(val_set), d)),
                      batch_size=cfg.run.batch_size, shuffle=False,
                      num_workers=cfg.run.num_workers, collate_fn=_as_list)


@torch.no_grad()
def evaluate(model: nn.Module, val_set: CocoInstances, cfg: DetectionConfig,
             d: DistInfo) -> dict[str, float]:
    """COCO bbox (+ segm for Mask R-CNN) AP over the val set: each rank predicts a slice,
    rank 0 scores them all, and every rank returns rank 0's scores (whatever a rank does
    with them, e.g. ``train``'s return value, must not depend on which rank it is).

    The forward passes run in lock-step with the other ranks (runtime/lockstep.py), so a
    ZeRO-3 model evaluates whatever each rank's slice holds. The items are read by
    :func:`val_batches`; an image that cannot be read ends the evaluation with its
    :class:`UnreadableFile` (naming it), whichever process read it.
    """
    import torch.distributed as dist

    from finetune.metrics import coco_evaluate, detections_to_coco

    core = model
    core.eval()
    train_sizes, test_size = _sizes(cfg)
    core.transform.min_size = (test_size,)
    results = []

    def dummy_args() -> tuple[list[torch.Tensor]]:
        return ([torch.zeros(3, test_size, test_size, device=d.device)],)

    with lockstep(core, dummy_args, d.device) as forward:
        for batch in val_batches(val_set, cfg, d):
            for item in batch:
                if isinstance(item, _Unreadable):
                    raise UnreadableFile(item.message)
            images = [img.to(d.device) for img, _ in batch]
            for (_, target), out in zip(batch, forward(images)):
                results += detections_to_coco(out, target["image_id"], val_set.label_to_cat)
    core.transform.min_size = tuple(train_sizes)
    core.train()
    keys = ("bbox_AP", "bbox_AP50", "bbox_AP75")
    if needs_masks(cfg):
        keys += ("segm_AP", "segm_AP50")
    if d.world_size == 1:
        scores = coco_evaluate(val_set.coco, results)
        return {k: scores.get(k, 0.0) for k in keys}
    # COCOeval ranks the detections of all images together, so one rank scores them all
    # (only it holds every rank's detections) and shares the scores
    gathered = [None] * d.world_size if d.is_main else None
    dist.gather_object(results, gathered, dst=0)
    shared: list = [None]
    if d.is_main:
        scores = coco_evaluate(val_set.coco, [r for part in gathered for r in part])
        shared[0] = {k: scores.get(k, 0.0) for k in keys}
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
