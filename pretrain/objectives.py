"""M3I-style objectives: InfoNCE between image embeddings and their targets' embeddings.

- image-text: symmetric InfoNCE over the *global* batch; embeddings from every rank are
  gathered with gradient, so each rank computes the loss of the whole global batch (the
  same value everywhere, equal to a single process's loss on that batch) and, after the
  engine averages gradients, the gradient is exactly the single-process one.
- image-tag: InfoNCE of each image against the tag vocabulary; a sample's tag set is a
  multi-label target (uniform over its tags, the single-label case being one-hot).
  Samples without tags contribute to the image-text term only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (rank order) keeping the autograd path."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def image_text_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    has_text: torch.Tensor | None = None, with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (all ranks' samples are negatives).

    Samples without a caption (``has_text`` False) take no part: they have no positive.
    """
    gather = gather_with_grad if with_grad else _gather_no_grad
    all_image, all_text = gather(image), gather(text)
    if has_text is not None:
        keep = _gather_no_grad(has_text.to(torch.uint8)).bool()
        if not bool(keep.all()):
            all_image, all_text = all_image[keep], all_text[keep]
        if all_image.shape[0] == 0:
            return image.sum() * 0.0
    logits = logit_scale * all_image @ all_text.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def image_tag_loss(image: torch.Tensor, tags: torch.Tensor, targets: torch.Tensor,
                   has_tags: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE of images against tag embeddings with multi-hot targets (tagged rows only)."""
    if not bool(has_tags.any()):
        return image.sum() * 0.0  # keeps the graph (and ZeRO's hooks) identical on all ranks
    logits = logit_scale * image[has_tags] @ tags.t()
    target = targets[has_tags].to(logits.dtype)
    target = target / target.sum(-1, keepdim=True).clamp_min(1.0)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@dataclass
class M3ILoss:
    """Weighted sum of the terms; returns the total and each term for logging."""

    image_text_weight: float = 1.0
    tag_weight: float = 0.5
    gather_with_grad: bool = True

    def __call__(self, image, text, tags, scale, has_text, tag_targets, has_tags):
        """Total loss and its terms; ``scale`` is the (clamped) inverse temperature."""
        terms: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        if self.image_text_weight > 0:
            terms["loss_image_text"] = image_text_loss(image, text, scale, has_text,
                                                       self.gather_with_grad)
            total = total + self.image_text_weight * terms["loss_image_text"]
        if self.tag_weight > 0:
            terms["loss_tag"] = image_tag_loss(image, tags, tag_targets, has_tags, scale)
            total = total + self.tag_weight * terms["loss_tag"]
        return total, terms
