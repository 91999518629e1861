"""M3I-style objectives: InfoNCE between image embeddings and their targets' embeddings.

- image-text: symmetric InfoNCE over the *global* batch (every rank's samples are
  negatives), computed as open_clip's "local loss" with gradients through the gather
  (open_clip 3.3.0, src/open_clip/loss.py ``ClipLoss`` with ``local_loss=True,
  gather_with_grad=True``): each rank scores only its own B rows against the N gathered
  columns, in both directions, instead of every rank building the same N x N matrix. Cost
  per rank: 2 B x N logits instead of N x N, so it stays flat as ranks are added (the
  full matrix grows with the world size squared). Each rank returns its share of the
  global loss, scaled so that DeepSpeed's gradient averaging gives exactly the
  single-process gradient (see ``image_text_loss``).
- image-tag: InfoNCE of each image against the tag vocabulary; a sample's tag set is a
  multi-label target (uniform over its tags, the single-label case being one-hot).
  Samples without tags contribute to the image-text term only. The term is the mean over
  the tagged samples of the *global* batch, however they fall on the ranks (one
  all-reduce of the count), so its gradient too equals the single-process one.

Both follow one convention: rank r returns l_r with mean_r l_r = L (the global loss, what
the trainer logs) and (1/W) sum_r dl_r = dL (what DeepSpeed applies: it divides each
rank's gradient by the world size and sums, deepspeed 0.19 runtime/zero/stage3.py
``__avg_scatter_contiguous_grads``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks (rank order) keeping the autograd path: the
    backward sums every rank's gradient for this rank's rows (torch.distributed.nn's
    all_gather; reduce-scatter on NCCL, all-to-all + sum on gloo)."""
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def infonce_rows(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor,
                 all_text: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                 all_keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sum over this rank's kept rows of both directions' cross-entropies of one symmetric
    InfoNCE problem (open_clip's local loss, before its mean).

    ``image``/``text`` (B, E): this rank's pairs; ``all_image``/``all_text`` (N, E): every
    rank's, with ``targets[i]`` the column of pair i there (rank * B + i). Pairs with
    ``keep``/``all_keep`` False have no caption: dropped as rows and as columns. Kept rows
    of all ranks together give each of the full N x N problem's rows exactly once (image ->
    text rows here, text -> image rows as the transposed matrix's), so the sum over ranks
    of this, divided by twice the number of kept pairs, is the full problem's loss.
    """
    if not bool(all_keep.all()):
        # renumber the targets among the kept columns; a dropped row's target (-1) only
        # needs to be some valid column: its term is multiplied by 0 below
        targets = (all_keep.cumsum(0) - 1)[targets].clamp_min(0)
        all_image, all_text = all_image[all_keep], all_text[all_keep]
    per_image = F.cross_entropy(scale * image @ all_text.t(), targets, reduction="none")
    per_text = F.cross_entropy(scale * text @ all_image.t(), targets, reduction="none")
    # every row keeps its place (weight 0 when dropped): the same graph on every rank,
    # however many captions each holds
    return ((per_image + per_text) * keep.to(per_image.dtype)).sum()


def _problem(image, text, all_image, all_text, keep, all_keep, scale) -> torch.Tensor:
    """This rank's share of one problem's loss: W * (its kept rows' sum) / (2 * kept
    pairs of the global batch); see the module docstring for why the factor W."""
    count = int(all_keep.sum())
    if count == 0:  # no caption anywhere (every rank agrees): zero, still using the
        # gathered tensors so that every rank's backward runs the gather's collective
        return (image.sum() + text.sum() + all_image.sum() + all_text.sum()
                + scale.sum()) * 0.0
    b = image.shape[0]
    targets = torch.arange(b, device=image.device) + _rank() * b
    rows = infonce_rows(image, text, all_image, all_text, targets, keep, all_keep, scale)
    return rows * (_world_size() / (2.0 * count))


def _gather_pairs(features: list[torch.Tensor], has_text: torch.Tensor,
                  partner: torch.Tensor | None = None):
    """Every rank's rows of each (B, E) tensor in ``features`` (one all-gather with
    gradient for all of them) and of ``has_text`` and the global index of ``partner``
    (one all-gather without)."""
    b = has_text.shape[0]
    gathered = gather_with_grad(torch.cat(features))  # (W * k * B, E), rank-major
    gathered = gathered.view(-1, len(features), b, gathered.shape[-1]).transpose(0, 1)
    all_features = [g.reshape(-1, g.shape[-1]) for g in gathered]
    meta = [has_text.to(torch.long)]
    if partner is not None:
        meta.append(partner.to(torch.long) + _rank() * b)
    all_meta = _gather_no_grad(torch.stack(meta, 1).to(has_text.device))
    return all_features, all_meta[:, 0].bool(), (all_meta[:, 1] if partner is not None
                                                  else None)


def image_text_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    has_text: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (all ranks' samples are negatives); this
    rank's share of it.

    With W ranks of B pairs, M of them captioned, and S_r this rank's sum of both
    directions' cross-entropies over its captioned rows, the global loss is
    L = (S_0 + ... + S_{W-1}) / (2M) and rank r returns W * S_r / (2M): the mean over
    ranks is L and, the gather's backward summing every rank's gradient for a rank's
    rows, the DeepSpeed-averaged gradient is exactly dL (with every pair captioned each
    rank's value is open_clip's local-loss mean over its rows). Samples without a caption
    (``has_text`` False) take no part: they have no positive.
    """
    if has_text is None:
        has_text = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
    (all_image, all_text), all_keep, _ = _gather_pairs([image, text], has_text)
    return _problem(image, text, all_image, all_text, has_text.bool(), all_keep, logit_scale)


def mixed_image_text_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                          has_text: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """The mean of the two InfoNCE problems of mixed inputs; this rank's share of it.

    ``image`` (2B, E): image A of each mix (sample i, paired with ``text[i]``), then image
    B (sample ``partner[i]``, paired with ``text[partner[i]]``). Each problem is
    ``image_text_loss`` over the global batch, with its own rows and negatives; the text
    embeddings are gathered once (with the images, one collective) and serve both: image
    B's columns are the gathered texts indexed by the partners' global indices.
    """
    b = text.shape[0]
    keep = has_text.bool()
    (all_a, all_b, all_text), all_keep, all_partner = _gather_pairs(
        [image[:b], image[b:], text], keep, partner)
    first = _problem(image[:b], text, all_a, all_text, keep, all_keep, logit_scale)
    second = _problem(image[b:], text[partner], all_b, all_text[all_partner], keep[partner],
                      all_keep[all_partner], logit_scale)
    return 0.5 * (first + second)


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
    image_weight: float = 0.0
    image_loss: str = "unigrad"  # pretrain/m3i/loss.py's IMAGE_LOSSES
    decorrelation_weight: float = 0.02

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

        terms: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        if self.image_text_weight > 0:
            terms["loss_image_text"] = mixed_image_text_loss(image, text, scale, has_text,
                                                             partner)
            total = total + self.image_text_weight * terms["loss_image_text"]
        if self.tag_weight > 0:
            terms["loss_tag"] = image_tag_loss(
                image, tags, torch.cat([tag_targets, tag_targets[partner]]),
                torch.cat([has_tags, has_tags[partner]]), scale)
            total = total + self.tag_weight * terms["loss_tag"]
        if self.image_weight > 0:
            image_loss, image_terms = image_target_loss(predictions, targets,
                                                        self.image_loss,
                                                        self.decorrelation_weight)
            terms |= {"loss_image": image_loss} | image_terms
            total = total + self.image_weight * image_loss
        return total, terms

    def __call__(self, image, text, tags, scale, has_text, tag_targets, has_tags):
        """Total loss and its terms; ``scale`` is the (clamped) inverse temperature."""
        terms: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        if self.image_text_weight > 0:
            terms["loss_image_text"] = image_text_loss(image, text, scale, has_text)
            total = total + self.image_text_weight * terms["loss_image_text"]
        if self.tag_weight > 0:
            terms["loss_tag"] = image_tag_loss(image, tags, tag_targets, has_tags, scale)
            total = total + self.tag_weight * terms["loss_tag"]
        return total, terms
