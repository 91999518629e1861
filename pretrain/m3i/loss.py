"""The image-target loss: a regression of each predicted patch feature onto its target
(the EMA encoder's feature at that patch) plus a small decorrelation term; two forms.

``unigrad`` (the default): Siamese Image Modeling's ``compute_unigrad_loss``
(OpenGVLab/Siamese-Image-Modeling, models_sim.py; UniGrad, Tao et al. 2022), the form M3I
builds on. The raw prediction p is regressed onto the target t layer-normalised without
affine parameters (``teacher_norm``: LayerNorm, eps 1e-5, in fp32, no gradient), the
squared error summed over the D channels and averaged over patches; the decorrelation
term is p^T C p averaged over patches, with C = t^T t / N the targets' correlation matrix
averaged over the ranks (an all-reduce, without gradient); the sum, the second weighted
by ``--neg_weight`` (0.02 in main_pretrain.py), is divided by D. SiamIM forms the N x N
product ``P C P^T`` for its diagonal; here the row-wise sum gives the same values with D x D
memory. Cost at the InternImage-H preset (D = 1024 channels of the 14 x 14 target map,
2 x 32 images per GPU: N = 12,544 rows): C is 4 MiB in fp32, all-reduced once per
micro-step whatever the world size (ring all-reduce: ~8 MiB sent per rank), and two
N x D x D products of 13 G multiply-adds (26 GFLOP) each, plus the backward's. Not taken
over: SiamIM's target passes an EMA'd projector (``mm_decoder_embed``,
``mm_projector_decoder_blocks``) first; ours is the target encoder's map itself.

``cosine`` (ours, the form of runs before the published one was built): prediction and
target L2-normalised, their mean squared distance ||p/|p| - t/|t|||^2 = 2 - 2 cos(p, t)
(BYOL's loss, per patch), plus the mean squared cosine between different predicted
patches, which keeps the predictions from collapsing onto one direction (1 on collapsed
predictions, where SiamIM's term stays near 0).

Both terms are means over this rank's patches; DeepSpeed's gradient averaging over ranks
then gives the global mean (equal batch per rank, as SiamIM's DDP assumes too)."""

from __future__ import annotations

from typing import Any, get_args

import torch
import torch.nn.functional as F

from pretrain.config import ImageLoss
from runtime.dist import tensor_mean_over_ranks

IMAGE_LOSSES = get_args(ImageLoss)  # objective.image.loss's values


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


def unigrad_terms(prediction: torch.Tensor, target: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SiamIM's UniGrad terms, each divided by the width D: (the mean over patches of
    ||p - LN(t)||^2, the mean over patches of p^T C p), C the layer-normalised targets'
    correlation matrix averaged over the ranks (collective: every rank calls it)."""
    width = prediction.shape[-1]
    p = prediction.float().reshape(-1, width)
    with torch.no_grad():
        t = F.layer_norm(target.float().reshape(-1, width), (width,), eps=1e-5)
        correlation = tensor_mean_over_ranks(t.t() @ t / t.shape[0])
    regression = (p - t).pow(2).sum(-1).mean()
    decorrelation = ((p @ correlation) * p).sum(-1).mean()
    return regression / width, decorrelation / width


def image_target_loss(prediction: torch.Tensor, target: torch.Tensor, form: str,
                      decorrelation_weight: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(regression + weight * decorrelation, the two terms for logging) in ``form``
    (:data:`IMAGE_LOSSES`); inputs (..., D), no gradient to ``target``."""
    if form == "unigrad":
        regression, decorrelation = unigrad_terms(prediction, target)
    elif form == "cosine":
        regression = regression_loss(prediction, target)
        decorrelation = decorrelation_loss(prediction)
    else:
        raise ValueError(f"image loss {form!r}: not one of {IMAGE_LOSSES}")
    terms = {"loss_image_regression": regression, "loss_image_decorrelation": decorrelation}
    return regression + decorrelation_weight * decorrelation, terms


IMAGE_LOSS_KEY = "image_loss"  # trainer state: the image loss a checkpoint trained with


def image_loss_state(image) -> dict[str, Any]:
    """What a checkpoint records of the image loss (``image``: the config's
    ``objective.image``; nothing with the branch off)."""
    if not image.enabled:
        return {}
    return {IMAGE_LOSS_KEY: {"form": image.loss,
                             "decorrelation_weight": image.decorrelation_weight}}


def image_loss_change(state: dict[str, Any], image) -> str | None:
    """A warning when a resume trains another image loss than its checkpoint's (None:
    the same). A checkpoint that records none was saved before the published form became
    the default: it trained the cosine form (weight 0.1 unless set otherwise)."""
    saved = state.get(IMAGE_LOSS_KEY) or {"form": "cosine", "decorrelation_weight": None}
    form, weight = saved.get("form"), saved.get("decorrelation_weight")
    if form == image.loss and weight in (None, image.decorrelation_weight):
        return None
    shown = weight if weight is not None else 0.1
    unrecorded = "" if weight is not None else " (not recorded: the default then)"
    return (f"this checkpoint trained the image loss {form} with decorrelation_weight "
            f"{shown}{unrecorded}; this start trains {image.loss} with "
            f"{image.decorrelation_weight}. To continue as it was: "
            f"objective.image.loss={form} objective.image.decorrelation_weight={shown}")
