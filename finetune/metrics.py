"""Evaluation metrics: COCO AP through pycocotools, mIoU from a confusion matrix."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import torch

from finetune.datasets.base import IGNORE_INDEX

log = logging.getLogger(__name__)

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# mmdet 2.x CocoDataset.evaluate_det_segm (what the released detection code reports):
# cocoEval.params.maxDets = list(proposal_nums), (100, 300, 1000). pycocotools' summarize
# then reports AP at 100 detections and AP50, AP75, APs/m/l at the last, 1000; with its
# default (1, 10, 100) those were capped at 100 for the presets that output 300.
COCO_MAX_DETS = [100, 300, 1000]


def coco_evaluate(coco_gt, results: list[dict], iou_types=("bbox", "segm")) -> dict[str, float]:
    """COCOeval on ``results`` (COCO result dicts) -> ``{bbox_AP, bbox_AP50, ..., segm_AP}``.

    No detections at all gives 0.0 everywhere (pycocotools cannot load an empty result).
    ``results`` are left as given: ``loadRes`` writes into the dicts it loads (``area``,
    ``id``, and a box polygon as ``segmentation`` for results without a mask), so each pass
    loads copies. Mask results go to the segm pass without their ``bbox``, as mmdet
    (>= 2.12, ``CocoDataset.evaluate_det_segm``) does: pycocotools takes a result's area
    from its box when it has one, which would size masks by their boxes for APs/APm/APl.
    """
    from pycocotools.cocoeval import COCOeval

    out: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type == "segm":
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results
                    if "segmentation" in r]
        else:
            dets = [dict(r) for r in results]
        if not dets:
            out.update({f"{iou_type}_{k}": 0.0 for k in COCO_STATS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.maxDets = list(COCO_MAX_DETS)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # stats are -1 where a size range has no ground truth; report 0 rather than -1
        out.update({f"{iou_type}_{k}": max(0.0, float(v)) for k, v in zip(COCO_STATS, ev.stats)})
    return out


def detections_to_coco(output: dict[str, torch.Tensor], image_id: int, label_to_cat: list[int],
                       mask_threshold: float = 0.5) -> list[dict]:
    """One torchvision detection output (boxes xyxy, labels, scores, masks) -> COCO results."""
    from pycocotools import mask as mask_utils

    boxes = output["boxes"].detach().cpu().numpy()
    scores = output["scores"].detach().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy()
    masks = output.get("masks")
    results = []
    for i in range(len(boxes)):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        r = {"image_id": int(image_id), "category_id": int(label_to_cat[int(labels[i])]),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])}
        if masks is not None:
            m = (masks[i, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            r["segmentation"] = rle
        results.append(r)
    return results


class ConfusionMatrix:
    """Accumulates a confusion matrix ``mat[label, pred]`` of shape (C + 1, C);
    ``ignore_index`` pixels are skipped.

    Row C holds the predictions on pixels whose label is neither ``ignore_index`` nor a
    class id (outside [0, C): a ``data.num_classes`` set too small, a stray value in a
    label map). mmseg's ``intersect_and_union`` (mmseg/core/evaluation/metrics.py, the
    evaluation of OpenGVLab/InternImage's segmentation) drops only the ignore index, then
    bins with ``torch.histc(bins=C, min=0, max=C - 1)``: such a label falls in no bin (no
    label area, no intersection) while its pixel's prediction still counts in the
    predicted area. Keeping them in a row of the matrix lets the one all-reduce of
    ``mat`` sum them across ranks with the rest.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes + 1, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predictions (N,H,W class ids) against targets of the same shape."""
        c = self.num_classes
        keep = target != self.ignore_index
        label, pred = target[keep].long(), pred[keep].long()
        label = torch.where((label < 0) | (label >= c), c, label)  # no class: row C
        idx = label * c + pred
        self.mat += torch.bincount(idx.cpu(), minlength=(c + 1) * c).view(c + 1, c)

    @property
    def left_out(self) -> int:
        """Pixels whose label is outside [0, C) and not the ignore index (row C)."""
        return int(self.mat[self.num_classes].sum())

    def scores(self, class_names: list[str] | None = None) -> dict[str, float]:
        """``mIoU``, ``aAcc``, ``mAcc`` and ``IoU.<class>``, as mmseg's
        ``total_area_to_metrics`` + ``nanmean``: a class's IoU is undefined (left out)
        only when it is neither labelled nor predicted, so a class predicted where none is
        labelled counts with IoU 0; its accuracy is undefined when it is not labelled.
        Pixels labelled outside the classes (row C) are logged once here, one warning per
        evaluation."""
        c = self.num_classes
        if self.left_out and _is_main():  # the count is every rank's once mat is reduced
            log.warning("segmentation evaluation: %d pixels have label values outside "
                        "[0, data.num_classes - 1 = %d] (and not the ignore index %d): left "
                        "out of the label areas and accuracies (their predictions still "
                        "count in the predicted areas, as mmseg's); is data.num_classes "
                        "too small?", self.left_out, c - 1, self.ignore_index)
        mat = self.mat.double()
        tp = mat[:c].diag()
        # row C (labels outside the classes) adds to the predicted areas only, as mmseg's
        gt, pred = mat[:c].sum(1), mat.sum(0)
        union = gt + pred - tp
        iou = tp / union.clamp(min=1)
        seen, labelled = union > 0, gt > 0
        names = class_names or [str(i) for i in range(self.num_classes)]
        out = {"mIoU": iou[seen].mean().item() if seen.any() else 0.0,
               "aAcc": (tp.sum() / gt.sum().clamp(min=1)).item(),
               "mAcc": (tp / gt.clamp(min=1))[labelled].mean().item()
               if labelled.any() else 0.0}
        out.update({f"IoU.{names[i]}": iou[i].item() for i in range(self.num_classes)
                    if seen[i]})
        return out


def _is_main() -> bool:
    """Whether this process is rank 0 (or runs alone): it logs what every rank knows."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
