"""DINO numerics and cadence as the released InternImage DINO has them.

Released facts (OpenGVLab/InternImage, read at main, commit 31c962d):
- Every ``inverse_sigmoid`` on the DINO path passes ``eps=1e-3`` (mmdet 2.x's
  mmdet/models/utils/transformer.py ``inverse_sigmoid(x, eps=1e-5)``: clamp x to [0, 1],
  then ``log(max(x, eps) / max(1 - x, eps))``):
  detection/mmdet_custom/models/utils/transformer.py ``DinoTransformerDecoder.forward``
  (``tmp + inverse_sigmoid(reference_points, eps=1e-3)``, the refinement),
  detection/mmdet_custom/models/dense_heads/dino_head.py ``DINOHead.forward``
  (``inverse_sigmoid(inter_references[lvl], eps=1e-3)``, each layer's predicted box) and
  detection/mmdet_custom/models/utils/query_denoising.py ``DnQueryGenerator.forward``
  (``inverse_sigmoid(known_bbox_expand, eps=1e-3)``, the noised denoising boxes).
- query_denoising.py pads the denoising queries of an image with fewer boxes than the
  batch's most with ``padding_label = zeros(pad_size, hidden_dim)`` and ``padding_bbox =
  zeros(pad_size, 4)``: box *logits*, which transformer.py ``DinoTransformer.forward`` turns
  into reference boxes with ``reference_points.sigmoid()``, so 0.5 in every coordinate.
  Its attention mask treats a padding slot as any slot of its group (the matching queries
  cannot see it, the other groups cannot see it, its own group can); dino_head.py
  ``_get_dn_target_single`` makes box targets of ``t < len(gt_labels)`` slots only
  (``pos_inds = group * single_pad + t``), so a padding slot is never a positive.
- detection/configs/_base_/datasets/coco_detection.py ``evaluation = dict(interval=1, ...)``
  (epochs), which dino_4scale_internimage_{t,l}_1x_coco_layer_wise_lr.py and
  dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.py keep (they override only
  ``save_best``), and their ``checkpoint_config = dict(interval=1, ...)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from finetune.heads.dino import build_dino

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
TINY_TRUNK = {"channels": 16, "depths": (1, 1, 2, 1), "groups": (1, 2, 4, 8)}
TINY_HEAD = {"num_queries": 20, "d_model": 64, "encoder_layers": 1, "decoder_layers": 3,
             "num_heads": 4, "ffn_dim": 128, "train_sizes": (64,), "test_size": 64,
             "max_size": 96, "num_dn_queries": 10}
EPS = 1e-3  # the released DINO's inverse_sigmoid eps


def _tiny():
    torch.manual_seed(0)
    return build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, **TINY_HEAD)


def _release_logit(x: float) -> float:
    """mmdet's inverse_sigmoid at the released eps, written out."""
    x = min(max(x, 0.0), 1.0)
    return math.log(max(x, EPS) / max(1 - x, EPS))


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_decoder_boxes_clamp_their_logits_at_the_released_eps():
    """With every box branch at zero weights and bias ``c`` (its output is ``c`` whatever
    the query), the release's decoder gives, from reference ``r``: layer 0 predicts
    ``sigmoid(c + logit(r))`` (dino_head.py) and refines the reference to the same value
    (transformer.py), layer l predicts ``sigmoid(c + logit(prediction of l-1))``, ``logit``
    clamped at 1e-3. At c = 0 the clamp itself shows: from r = 0 every layer predicts
    ``sigmoid(log(1e-3)) = 1/1001`` and from r = 1 ``1000/1001`` (at eps 1e-5: ~1e-5 and
    1 - 1e-5); at c = 2 from r = 0 layer 0 predicts sigmoid(2 + log 1e-3) ~ 0.0073, which
    layer 1's logit takes unclamped (at 1e-5 the refined box, ~7e-5, is clamped again)."""
    model = _tiny().eval()
    refs = [0.0, 1.0, 0.3, 1e-4]
    with torch.no_grad():
        images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
        pixels, pixel_mask, *_ = model._prepare(images)
        enc = model._encode(pixels, pixel_mask)
        content, reference, _ = model._select_queries(enc)
        reference = reference.clone()
        reference[0, :len(refs)] = torch.tensor(refs)[:, None].expand(-1, 4)
        assert len(model.bbox_embed[0].layers) == 3
        for c in (0.0, 2.0):
            for branch in model.bbox_embed:
                branch.layers[-1].weight.zero_()
                branch.layers[-1].bias.fill_(c)
            _, boxes = model._decode(content, reference, enc, None)
            for q, r in enumerate(refs):
                prev = r
                for layer in range(TINY_HEAD["decoder_layers"]):
                    prev = _sigmoid(c + _release_logit(prev))
                    got = boxes[layer, 0, q]
                    torch.testing.assert_close(got, torch.full_like(got, prev), rtol=1e-5,
                                               atol=1e-7, msg=f"c={c} r={r} layer {layer}")
    # the boundary values themselves, for the record
    assert _sigmoid(_release_logit(0.0)) == pytest.approx(1 / 1001)
    assert _sigmoid(_release_logit(1.0)) == pytest.approx(1000 / 1001)


def _dn_targets():
    """DETR-format targets (normalised cxcywh): image 0 holds a box and one of 1e-4 a side
    in the corner, image 1 a single box, so image 1 has one padding slot per half-group."""
    return [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [1e-4, 1e-4, 1e-4, 1e-4]]),
             "class_labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[0.6, 0.5, 0.3, 0.2]]), "class_labels": torch.tensor([1])}]


def test_denoising_boxes_clamp_at_the_released_eps():
    """The noised copies of a box of 1e-4 a side in the corner stay within 3e-4 of 0 in every
    coordinate (box noise scale 1 moves a corner by at most its box's size), so the release's
    ``inverse_sigmoid(.., eps=1e-3)`` clamps them: their reference boxes are
    ``1e-3 / (1e-3 + 1 - x)``, within [0.999e-3, 1e-3] (at eps 1e-5 they stay below 3e-4)."""
    model = _tiny().train()
    for seed in range(3):
        torch.manual_seed(seed)
        _, boxes, _, meta = model._denoising(_dn_targets())
        groups = meta["dn_num_group"]
        tiny_slots = [2 * 2 * g + half * 2 + 1 for g in range(groups) for half in (0, 1)]
        got = boxes[0, tiny_slots]
        assert got.min() >= 0.999e-3 and got.max() <= 1e-3, got


def test_denoising_boxes_without_box_noise_are_the_ground_truth_boxes():
    """box_noise_scale 0: the release still takes ``inverse_sigmoid(known_bbox_expand,
    eps=1e-3)`` of the (un-noised) boxes, so the reference boxes are the ground truth's (the
    corner box's coordinates clamped to 1e-3 / (1e-3 + 1 - 1e-4)). RT-DETR's builder skips its
    inverse_sigmoid without box noise, so the boxes must not go through a sigmoid here."""
    torch.manual_seed(0)
    model = build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK,
                       **{**TINY_HEAD, "box_noise_scale": 0.0})
    targets = _dn_targets()
    _, boxes, _, meta = model._denoising(targets)
    corner = EPS / (EPS + 1 - 1e-4)
    for g in range(meta["dn_num_group"]):
        for half in (0, 1):
            slot = 4 * g + 2 * half
            torch.testing.assert_close(boxes[0, slot], targets[0]["boxes"][0])
            torch.testing.assert_close(boxes[0, slot + 1], torch.full((4,), corner))
            torch.testing.assert_close(boxes[1, slot], targets[1]["boxes"][0])
            assert torch.equal(boxes[1, slot + 1], torch.full((4,), 0.5))  # padding


def test_denoising_padding_slots_get_the_released_box_content_mask_and_no_target():
    """Image 1 (1 box; the batch's most is 2) pads slot 1 of each half-group: its reference box
    is sigmoid(0) = 0.5 in every coordinate (the release's zero box logits), its content zero;
    the attention mask treats it as its group's other slots; no denoising target lands on it."""
    from transformers.loss.loss_rt_detr import RTDetrLoss

    model = _tiny().train()
    torch.manual_seed(0)
    targets = _dn_targets()
    content, boxes, mask, meta = model._denoising(targets)
    max_gt, groups = 2, TINY_HEAD["num_dn_queries"] // 2
    num_dn = 2 * max_gt * groups
    assert meta["dn_num_group"] == groups and boxes.shape[1] == num_dn
    pad = [s for s in range(num_dn) if s % max_gt == 1]
    assert torch.equal(boxes[1, pad], torch.full((len(pad), 4), 0.5))
    assert not content[1, pad].any()
    real = [s for s in range(num_dn) if s % max_gt == 0]
    assert (boxes[1, real] != 0.5).any() and content[1, real].abs().sum(-1).gt(0).all()
    assert (boxes[0] != 0.5).any(-1).all()  # image 0 fills every slot: nothing padded
    # additive mask: 0 = may attend, finfo.min = blocked; rows attend to columns
    blocked = mask[0, 0] == torch.finfo(mask.dtype).min
    assert not (mask[0, 0][~blocked]).any()
    size = 2 * max_gt
    for s in pad:
        g = s // size
        own = torch.zeros(num_dn + model.num_queries, dtype=torch.bool)
        own[g * size:(g + 1) * size] = True
        assert not blocked[s, own].any() and not blocked[own, s].any()   # its own group
        assert blocked[:num_dn, s][~own[:num_dn]].all()                  # other groups
        assert blocked[num_dn:, s].all()                                 # matching queries
    # denoising targets (RT-DETR's indices, our loss's): slot g * 2 * max_gt + t of image 1
    # for its only box t = 0, as the release's pos_inds; never a padding slot
    queries, gts = RTDetrLoss.get_cdn_matched_indices(meta, targets)[1]
    assert sorted(queries.tolist()) == [g * size for g in range(groups)]
    assert gts.tolist() == [0] * groups


@pytest.mark.parametrize("name", ["det_dino_internimage_t_1x_coco.yaml",
                                  "det_dino_internimage_l_1x_coco.yaml",
                                  "det_dino_internimage_l_1x_coco_0.1x_backbone_lr.yaml"])
def test_dino_1x_presets_evaluate_and_checkpoint_every_epoch_as_released(name, monkeypatch,
                                                                         tmp_path):
    """The released DINO 1x files evaluate every epoch (coco_detection.py ``interval=1``) and
    checkpoint every epoch; the presets' run.eval_every / run.checkpoint_every 0 must give
    the training loop one epoch's steps for both (the loop's inputs, captured; the data,
    model and optimizer are stand-ins, the cadence is what is checked)."""
    import finetune.detection as det
    import finetune.loop
    from launch.config import load_config

    cfg = load_config(det.DetectionConfig, CONFIGS / name)
    assert cfg.run.eval_every == 0 and cfg.run.checkpoint_every == 0
    steps_per_epoch = 7_329  # 117,266 filtered COCO train2017 images / (8 GPUs x 2)
    assert cfg.run.eval_interval(steps_per_epoch) == steps_per_epoch

    class _Set:
        cat_ids = list(range(80))

    captured = {}
    monkeypatch.setattr(det, "build_datasets", lambda cfg: (_Set(), _Set()))
    monkeypatch.setattr(det, "build_model", lambda cfg, n, init: torch.nn.Linear(1, 1))
    monkeypatch.setattr(det, "refuse_shared_head_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(det, "train_batches", lambda *a, **k: (None, steps_per_epoch))
    monkeypatch.setattr(det, "optimizer_and_schedule", lambda *a: (None, None))
    monkeypatch.setattr(finetune.loop, "run_loop", lambda **kw: captured.update(kw) or {})
    det.train(cfg, tmp_path)
    assert captured["eval_every"] == steps_per_epoch
    assert captured["checkpoint_every"] == steps_per_epoch
    assert captured["total_steps"] == 12 * steps_per_epoch   # 12 evaluations, one per epoch
