"""Detection evaluation: COCO bbox (and segm) AP with pycocotools."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from finetune.det_config import DetectionConfig
from finetune.det_data import CocoInstances, needs_masks
from finetune.eval_loader import share_batches
from runtime.dist import DistInfo
from runtime.lockstep import lockstep


def _sizes(cfg: DetectionConfig) -> tuple[list[int], int]:
    """(train shorter sides, test shorter side) of the detector in use."""
    if cfg.head.kind == "dino":
        return list(cfg.head.train_sizes), cfg.head.test_size
    return list(cfg.detector.train_sizes), cfg.detector.test_size


def val_batches(val_set: CocoInstances, cfg: DetectionConfig, d: DistInfo) -> Iterator[list]:
    """This rank's share of ``val_set``, in order, in lists of ``run.batch_size`` (image,
    target) items (the last one shorter), read by ``run.num_workers`` loader processes
    (:func:`finetune.eval_loader.share_batches`), so the images are decoded while the
    model runs on the batch before them (tens of milliseconds a COCO-size JPEG)."""
    return share_batches(val_set, d, cfg.run.batch_size, cfg.run.num_workers)


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
