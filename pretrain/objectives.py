"""M3I-style objectives: InfoNCE between image embeddings and their targets' embeddings.

- image-text: symmetric InfoNCE over the *global* batch; embeddings from every rank are
  gathered with gradient, so each rank computes the loss of the whole global batch (the
  same value everywhere, equal to a single process's loss on that batch) and, after the
  engine averages gradients, the gradient is exactly the single-process one.
- image-tag: InfoNCE of each image against the tag vocabulary; a sample's tag set is a
  multi-label target (uniform over its tags, the single-label case being one-hot).
  Samples without tags contribute to the image-text term only. The term is the mean over
  the tagged samples of the *global* batch, however they fall on the ranks (one
  all-reduce of the count), so its gradient too equals the single-process one.
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


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def global_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of true entries of ``mask`` summed over all ranks (a float scalar)."""
    count = mask.sum().to(torch.float64)
    if _world_size() > 1:
        dist.all_reduce(count)
    return count


def image_tag_loss(image: torch.Tensor, tags: torch.Tensor, targets: torch.Tensor,
                   has_tags: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE of images against tag embeddings with multi-hot targets, averaged over the
    tagged samples of the global batch; this rank's share of it, scaled for DeepSpeed.

    With N tagged samples over all W ranks and S_r the sum of per-sample losses on rank
    r, the global term is L = (S_0 + ... + S_{W-1}) / N. DeepSpeed averages gradients
    over ranks, (1/W) * sum_r dl_r, so rank r returns l_r = W * S_r / N: the averaged
    gradient is then exactly dL, and so is the mean of the returned values, L. (A per-rank
    mean would weight each tagged sample by 1/(tagged samples on its rank).)
    """
    tagged = has_tags.to(torch.bool)
    # Untagged rows get an all-zero target: their loss and gradient are exactly 0, and
    # every rank runs the same graph whatever its tag count (ZeRO-3's hooks stay aligned).
    target = targets.to(image.dtype) * tagged[:, None]
    target = target / target.sum(-1, keepdim=True).clamp_min(1.0)
    logits = logit_scale * image @ tags.t()
    per_rank_sum = -(target * F.log_softmax(logits, dim=-1)).sum()
    count = global_count(tagged).clamp_min(1.0).to(per_rank_sum.dtype)
    return per_rank_sum * (_world_size() / count)


@dataclass
class M3ILoss:
    """Weighted sum of the terms; returns the total and each term for logging.

    Called with one embedding per image (:meth:`__call__`), or on mixed inputs
    (:meth:`mixed`) where each mix holds image A (its own sample) and image B (sample
    ``partner[i]``), each with its own pooled embedding and image targets.
    """

    image_text_weight: float = 1.0
    tag_weight: float = 0.5
    gather_with_grad: bool = True
    image_weight: float = 0.0
    decorrelation_weight: float = 0.1

    def mixed(self, image, text, tags, scale, has_text, tag_targets, has_tags, partner,
              predictions, targets):
        """Total loss and its terms on mixed inputs.

        ``image`` (2B, E): rows 0..B-1 image A of each mix (paired with sample i's text and
        tags), rows B..2B-1 image B (sample ``partner[i]``'s). The image-text term is the
        mean of the two InfoNCE problems (each over the global batch, so each image of a
        mix has its own embedding and its own negatives); the tag term treats the 2B
        embeddings as samples; the image term compares ``predictions`` (2B, T, C) with
        the target encoder's ``targets`` (2B, T, C).
        """
        from pretrain.m3i.loss import image_target_loss

        b = text.shape[0]
        terms: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        if self.image_text_weight > 0:
            first = image_text_loss(image[:b], text, scale, has_text, self.gather_with_grad)
            second = image_text_loss(image[b:], text[partner], scale, has_text[partner],
                                     self.gather_with_grad)
            terms["loss_image_text"] = 0.5 * (first + second)
            total = total + self.image_text_weight * terms["loss_image_text"]
        if self.tag_weight > 0:
            terms["loss_tag"] = image_tag_loss(
                image, tags, torch.cat([tag_targets, tag_targets[partner]]),
                torch.cat([has_tags, has_tags[partner]]), scale)
            total = total + self.tag_weight * terms["loss_tag"]
        if self.image_weight > 0:
            image_loss, image_terms = image_target_loss(predictions, targets,
                                                        self.decorrelation_weight)
            terms |= {"loss_image": image_loss} | image_terms
            total = total + self.image_weight * image_loss
        return total, terms

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
