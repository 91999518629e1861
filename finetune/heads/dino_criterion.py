"""DINO's training criterion: focal + L1 + GIoU terms of every decoder layer (the last one
reported apart, the others summed as ``loss_aux``), of the encoder proposals
(``loss_enc``) and of the contrastive denoising queries (``loss_dn``).

The pieces are transformers' (``DeformableDetrImageLoss`` for the terms, the focal-cost
Hungarian matcher, RT-DETR's denoising match indices); what is written here is how DINO
weights and sums them. The model (finetune/heads/dino.py) owns the matcher and the loss
module, so its parameter and buffer names do not change; these functions only combine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.loss.loss_rt_detr import RTDetrLoss

from finetune.heads.common import rank_mean


def weighted_terms(criterion, cfg: dict, out: dict, targets: list[dict], indices,
                   num_boxes: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted focal + L1 + GIoU, the unweighted terms) of one set of predictions."""
    terms = {**criterion.get_loss("labels", out, targets, indices, num_boxes),
             **criterion.get_loss("boxes", out, targets, indices, num_boxes)}
    return (cfg["weight_class"] * terms["loss_ce"]
            + cfg["weight_bbox"] * terms["loss_bbox"]
            + cfg["weight_giou"] * terms["loss_giou"]), terms


def mean_num_boxes(targets: list[dict]) -> float:
    """Ground-truth boxes per rank, averaged over ranks as DINO does (at least 1)."""
    return rank_mean(sum(len(t["class_labels"]) for t in targets))


def dino_losses(criterion, matcher: Callable, cfg: dict, logits: torch.Tensor,
                boxes: torch.Tensor, num_dn: int, enc_out: dict, meta: dict | None,
                targets: list[dict], zero: torch.Tensor) -> tuple[torch.Tensor,
                                                                  dict[str, torch.Tensor]]:
    """Total DINO loss and its weighted terms, from the decoder's per-layer ``logits`` and
    ``boxes`` (the first ``num_dn`` queries are denoising ones), the encoder proposals
    ``enc_out`` and the denoising group ``meta`` (None without ground-truth boxes);
    ``zero``: the scalar the sums start from (the input's device and dtype)."""
    num_boxes = mean_num_boxes(targets)
    losses: dict[str, torch.Tensor] = {}
    aux = dn_total = zero
    last = len(logits) - 1
    for i in range(len(logits)):
        out = {"logits": logits[i, :, num_dn:], "pred_boxes": boxes[i, :, num_dn:]}
        total, terms = weighted_terms(criterion, cfg, out, targets, matcher(out, targets),
                                      num_boxes)
        if i == last:
            losses.update({"loss_ce": cfg["weight_class"] * terms["loss_ce"],
                           "loss_bbox": cfg["weight_bbox"] * terms["loss_bbox"],
                           "loss_giou": cfg["weight_giou"] * terms["loss_giou"]})
        else:
            aux = aux + total
    enc_total, _ = weighted_terms(criterion, cfg, enc_out, targets, matcher(enc_out, targets),
                                  num_boxes)
    # The denoising terms divide by the positive denoising queries (each box once per
    # group) averaged over the ranks, as released (OpenGVLab/InternImage detection/
    # mmdet_custom/models/dense_heads/dino_head.py: reduce_mean(num_total_pos) of
    # get_dn_target). A rank's group count is its own (num_dn_queries // its most boxes
    # in one image), so the mean box count times this rank's groups was not it. Called
    # on every rank, also one without boxes (meta None): it is a collective.
    dn_positives = sum(len(t["class_labels"]) for t in targets) * (
        meta["dn_num_group"] if meta else 0)
    dn_norm = rank_mean(dn_positives)
    if meta:
        dn_indices = RTDetrLoss.get_cdn_matched_indices(meta, targets)
        for i in range(len(logits)):
            out = {"logits": logits[i, :, :num_dn], "pred_boxes": boxes[i, :, :num_dn]}
            dn_total = dn_total + weighted_terms(criterion, cfg, out, targets, dn_indices,
                                                 dn_norm)[0]
    losses.update({"loss_aux": aux, "loss_enc": enc_total, "loss_dn": dn_total})
    return sum(losses.values()), losses
