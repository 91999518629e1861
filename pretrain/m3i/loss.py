"""The image-target loss: normalised-feature regression plus a small decorrelation term.

Regression: each predicted patch feature and its target (the EMA encoder's raw feature at
that patch) are L2-normalised, and the loss is their mean squared distance, ||p/|p| -
t/|t|||^2 = 2 - 2 cos(p, t) (BYOL's loss, per patch): our choice. Siamese Image Modeling's
``compute_unigrad_loss`` (models_sim.py) differs: the raw prediction (its ``student_norm``
is the identity unless ``--online_ln``) is regressed onto the target layer-normalised
without affine (``teacher_norm``), squared error summed over channels, averaged over
patches, divided by the width, the target taken after an EMA'd projector
(``mm_decoder_embed``, ``mm_projector_decoder_blocks``). Decorrelation: the mean squared
cosine between different predicted patches, which keeps the predictions from collapsing
onto one direction. This is our own form, in the spirit of UniGrad (Tao et al. 2022) but
not its term: Siamese Image Modeling's ``compute_unigrad_loss`` (OpenGVLab/Siamese-Image-
Modeling, models_sim.py) weighs the predictions against the correlation matrix of the
targets, all-reduced over ranks and without gradient, at weight 0.02. The two agree while
predictions follow their targets; on collapsed predictions ours is 1 where that term stays
near 0. Both terms here are means over this rank's patches; DeepSpeed's gradient averaging
over ranks then gives the global mean (equal batch per rank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over patches of ||p/|p| - t/|t|||^2; inputs (..., D); no gradient to target."""
    p = F.normalize(prediction.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    return (p - t).pow(2).sum(-1).mean()


def decorrelation_loss(prediction: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs i != j of cos(p_i, p_j)^2 over all predicted patches.

    With Z the (N, D) normalised rows: sum_{i,j} (z_i.z_j)^2 = ||Z^T Z||_F^2 (a D x D
    product, never N x N) and the N diagonal terms are 1 each."""
    z = F.normalize(prediction.float().reshape(-1, prediction.shape[-1]), dim=-1)
    n = z.shape[0]
    if n < 2:
        return z.sum() * 0.0
    return ((z.t() @ z).pow(2).sum() - n) / (n * (n - 1))


def image_target_loss(prediction: torch.Tensor, target: torch.Tensor,
                      decorrelation_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(regression + weight * decorrelation, the two terms for logging)."""
    terms = {"loss_image_regression": regression_loss(prediction, target),
             "loss_image_decorrelation": decorrelation_loss(prediction)}
    total = terms["loss_image_regression"] + decorrelation_weight * terms[
        "loss_image_decorrelation"]
    return total, terms
