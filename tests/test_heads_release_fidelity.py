"""The dense heads against the released code's formulas (OpenGVLab/InternImage):

- Mask2Former's mask and dice losses divide by the target masks averaged over all ranks
  (segmentation/mmseg_custom/models/decode_heads/mask2former_head.py ``loss_single``:
  ``num_total_masks = max(reduce_mean(num_total_pos), 1)``), two real gloo ranks;
- Mask2Former's semantic scores are formed at the mask resolution, then resized
  (mask2former_head.py ``forward_test`` + segmentors/encoder_decoder_mask2former.py
  ``encode_decode``);
- the feature maps' sine position embedding of DINO and Mask2Former is mmdet 2.28's
  ``SinePositionalEncoding`` (offset 0), in float32 also when the features are bfloat16.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)
M2F_HEAD = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1,
                decoder_layers=2, num_attention_heads=2, dim_feedforward=64,
                encoder_feedforward_dim=64, num_queries=8, train_num_points=64)
DINO_TRUNK = {"channels": 16, "depths": (1, 1, 2, 1), "groups": (1, 2, 4, 8)}
DINO_HEAD = {"num_queries": 20, "d_model": 64, "encoder_layers": 1, "decoder_layers": 2,
             "num_heads": 4, "ffn_dim": 128, "train_sizes": (64,), "test_size": 64,
             "max_size": 96, "num_dn_queries": 10}
MASKS_PER_RANK = (1, 5)  # their mean over the 2 ranks: 3
NUM_CLASSES = 6


def _point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """mmcv's ``point_sample(input, points)`` of (N, H, W) maps at (N, P, 2) points in
    [0, 1]: ``grid_sample`` at ``2 * points - 1``, ``align_corners=False``; (N, P)."""
    return F.grid_sample(maps[:, None], 2 * points[:, None] - 1, align_corners=False)[:, 0, 0]


def _released_losses(mask_logits, class_logits, targets, classes, src, tgt, points,
                     num_total_masks: float, no_object_weight: float = 0.1):
    """mask2former_head.py ``loss_single`` of one image (batch of 1) with the matching
    (``src`` queries to ``tgt`` targets) and sampled points given: class CE with
    ``class_weight = [1] * C + [0.1]`` averaged by ``class_weight[labels].sum()``; mmdet's
    naive DiceLoss (eps 1) summed over masks / ``num_total_masks``; point BCE summed /
    (``num_total_masks * num_points``)."""
    labels = torch.full((class_logits.shape[1],), NUM_CLASSES, dtype=torch.long)
    labels[src] = classes[tgt]
    weight = torch.ones(NUM_CLASSES + 1)
    weight[-1] = no_object_weight
    ce = F.cross_entropy(class_logits[0], labels, reduction="none")
    loss_cls = (weight[labels] * ce).sum() / weight[labels].sum()
    pred = _point_sample(mask_logits[0, src], points)
    target = _point_sample(targets[tgt], points)
    prob = pred.sigmoid()
    dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    loss_dice = dice.sum() / num_total_masks
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    loss_mask = bce.sum() / (num_total_masks * points.shape[1])
    return loss_cls, loss_mask, loss_dice


def _m2f_rank(_unused: str = "") -> None:
    """One rank: this rank's image holds MASKS_PER_RANK[rank] masks; the loss terms of the
    criterion build_mask2former installs equal the released ones with the normaliser 3."""
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from finetune.heads import build_mask2former

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    criterion = build_mask2former("internimage_t", NUM_CLASSES, backbone_kwargs=TINY,
                                  **M2F_HEAD).model.criterion
    g = torch.Generator().manual_seed(10 + rank)
    count = MASKS_PER_RANK[rank]
    mask_logits = torch.randn(1, 8, 16, 16, generator=g)
    class_logits = torch.randn(1, 8, NUM_CLASSES + 1, generator=g)
    targets = (torch.rand(count, 64, 64, generator=g) > 0.5).float()
    classes = torch.randperm(NUM_CLASSES, generator=g)[:count]

    assert criterion.get_num_masks([classes], torch.device("cpu")) == 3.0
    # record what the loss drew (the matching, the sampled points) to replay it
    seen = {}
    matcher_forward = criterion.matcher.forward
    sampler = criterion.sample_points_using_uncertainty

    def match(*args, **kwargs):
        seen["indices"] = matcher_forward(*args, **kwargs)
        return seen["indices"]

    def sample(*args, **kwargs):
        seen["points"] = sampler(*args, **kwargs)
        return seen["points"]

    criterion.matcher.forward = match
    criterion.sample_points_using_uncertainty = sample
    losses = criterion(mask_logits, class_logits, [targets], [classes])
    (src, tgt), = seen["indices"]
    want = _released_losses(mask_logits, class_logits, targets, classes, src, tgt,
                            seen["points"], num_total_masks=3.0)
    got = (losses["loss_cross_entropy"], losses["loss_mask"], losses["loss_dice"])
    for name, g_, w in zip(("class", "mask", "dice"), got, want):
        assert torch.allclose(g_, w, rtol=1e-5, atol=1e-7), (rank, name, g_.item(), w.item())
    dist.barrier()
    # skip interpreter teardown: gloo's destructors can abort when peers exit together
    sys.stdout.flush()
    os._exit(0)


def test_mask2former_mask_and_dice_losses_divide_by_the_mean_over_ranks():
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_m2f_rank", 2, "x", timeout=240)


DN_BOXES_PER_IMAGE = ([1, 2], [20, 30])  # the two ranks' images: 3 and 50 boxes


def _dino_rank(_unused: str = "") -> None:
    """One rank of DINO's denoising normaliser: this rank's images hold
    DN_BOXES_PER_IMAGE[rank] boxes, so transformers' group builder gives it its own group
    count (100 denoising queries // its most boxes in one image: 50 and 3). The released
    head divides the denoising terms by reduce_mean(positive denoising queries) =
    (3 * 50 + 50 * 3) / 2 = 150 on both ranks; the same collective runs on a rank whose
    batch has no box (no groups), and then the mean is (0 + 150) / 2."""
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist
    from transformers.models.rt_detr.modeling_rt_detr import (
        get_contrastive_denoising_training_group,
    )

    import finetune.heads.dino_criterion as dc

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    seen = []

    def weighted_terms(criterion, cfg, out, targets, indices, num_boxes):
        seen.append(num_boxes)
        zero = torch.zeros(())
        return zero, {"loss_ce": zero, "loss_bbox": zero, "loss_giou": zero}

    dc.weighted_terms = weighted_terms
    cfg = {"weight_class": 1.0, "weight_bbox": 5.0, "weight_giou": 2.0}
    for step, counts in enumerate((DN_BOXES_PER_IMAGE[rank],
                                   [0, 0] if rank == 0 else [20, 30])):
        targets = [{"class_labels": torch.zeros(n, dtype=torch.long),
                    "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25} for n in counts]
        meta = None
        if sum(counts):
            *_, meta = get_contrastive_denoising_training_group(
                targets, 80, 900, torch.nn.Embedding(81, 8), num_denoising_queries=100)
            assert meta["dn_num_group"] == 100 // max(counts)
        num_dn = meta["dn_num_split"][0] if meta else 0
        seen.clear()
        dc.dino_losses(None, lambda out, targets: None, cfg, torch.zeros(2, 2, num_dn + 4, 80),
                       torch.zeros(2, 2, num_dn + 4, 4), num_dn, {}, meta, targets,
                       torch.zeros(()))
        matching_norm = (sum(DN_BOXES_PER_IMAGE[0]) + sum(DN_BOXES_PER_IMAGE[1])) / 2
        if step == 0:
            # 2 decoder layers and the encoder: the mean box count; 2 denoising layers: 150
            assert seen == [matching_norm] * 3 + [150.0] * 2, (rank, seen)
        elif rank == 1:  # rank 0 has no box this time: (0 + 50 * 3) / 2
            assert seen[3:] == [75.0, 75.0], (rank, seen)
        else:
            assert len(seen) == 3, (rank, seen)  # no denoising queries on this rank
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def test_dino_denoising_terms_divide_by_the_positive_dn_queries_averaged_over_ranks():
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_dino_rank", 2, "x", timeout=240)


class _FixedMask2Former(torch.nn.Module):
    """Stands in for transformers' model: a fixed output at 1/4 of the input size."""

    def __init__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(num_labels=class_logits.shape[-1] - 1)
        self.out = SimpleNamespace(class_queries_logits=class_logits,
                                   masks_queries_logits=mask_logits)

    def forward(self, pixel_values):
        return self.out


def test_mask2former_scores_are_formed_at_mask_resolution_then_resized():
    from finetune.heads.mask2former import Mask2FormerSegmenter

    g = torch.Generator().manual_seed(0)
    class_logits = torch.randn(2, 10, 5, generator=g)          # 4 classes + no object
    mask_logits = 4 * torch.randn(2, 10, 8, 12, generator=g)    # 1/4 of 32 x 48
    images = torch.zeros(2, 3, 32, 48)
    head = Mask2FormerSegmenter(_FixedMask2Former(class_logits, mask_logits))
    # the release's three lines (forward_test, then encode_decode's resize)
    seg = torch.einsum("bqc,bqhw->bchw", F.softmax(class_logits, dim=-1)[..., :-1],
                       mask_logits.sigmoid())
    want = F.interpolate(seg, size=(32, 48), mode="bilinear", align_corners=False)
    got = head.semantic_scores(images)
    assert got.shape == (2, 4, 32, 48)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head(images), want, rtol=1e-6, atol=1e-7)


def _mmdet_sine(pad: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """mmdet 2.28 ``SinePositionalEncoding.forward`` (mmdet/models/utils/
    positional_encoding.py) with ``normalize=True``, defaults ``scale=2*pi``, ``eps=1e-6``,
    ``offset=0.``, written out; ``pad``: (B, H, W), 1 at padded pixels (mmdet's mask)."""
    not_mask = 1 - pad.int()
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = (y + 0.0) / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = (x + 0.0) / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
    b, h, w = pad.shape
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), 4).view(b, h, w, -1)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), 4).view(b, h, w, -1)
    return torch.cat((pos_y, pos_x), 3).permute(0, 3, 1, 2)


def _padded_mask(height: int = 6, width: int = 167) -> torch.Tensor:
    """(2, H, W) valid-pixel mask (transformers' convention): image 1 padded at the
    bottom and the right. 167 columns: the stride-8 map of a 1333-pixel side."""
    valid = torch.ones(2, height, width, dtype=torch.bool)
    valid[1, height - 2:] = False
    valid[1, :, width - 40:] = False
    return valid


@pytest.fixture(scope="module")
def dino():
    from finetune.heads.dino import build_dino

    torch.manual_seed(0)
    return build_dino("internimage_t", 3, backbone_kwargs=DINO_TRUNK, **DINO_HEAD)


def test_dino_position_embedding_is_mmdets_without_offset(dino):
    # released DINO configs (detection/configs/coco/dino_4scale_internimage_*.py):
    # SinePositionalEncoding(num_feats=128, temperature=20, normalize=True); here d_model 64
    valid = _padded_mask()
    embed = dino.detr.position_embedding
    shape = (2, 64, *valid.shape[1:])
    got = embed(shape, valid.device, torch.float32, mask=valid)
    want = _mmdet_sine(~valid, num_feats=32, temperature=20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dino_position_embedding_under_bf16_is_the_float32_one_cast(dino):
    valid = _padded_mask()
    embed = dino.detr.position_embedding
    shape = (2, 64, *valid.shape[1:])
    want = _mmdet_sine(~valid, num_feats=32, temperature=20).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = embed(shape, valid.device, torch.bfloat16, mask=valid)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_mask2former_position_embeddings_in_bf16_are_the_float32_ones_cast():
    from finetune.heads import build_mask2former

    torch.manual_seed(0)
    model = build_mask2former("internimage_t", NUM_CLASSES, backbone_kwargs=TINY,
                              **M2F_HEAD).model.model
    shape = (1, 32, 6, 167)
    # the released Mask2Former: SinePositionalEncoding(num_feats=..., normalize=True),
    # default temperature 10000, no padding mask (all pixels valid)
    want = _mmdet_sine(torch.zeros(1, 6, 167), num_feats=16, temperature=10000)
    for embed in (model.pixel_level_module.decoder.position_embedding,
                  model.transformer_module.position_embedder):
        torch.testing.assert_close(embed(shape, "cpu", torch.float32), want,
                                   rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = embed(shape, "cpu", torch.bfloat16, None)
        assert torch.equal(got, want.to(torch.bfloat16))
