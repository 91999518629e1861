"""DINO head (finetune/heads/dino.py): training reduces the loss, torchvision-style output,
contrastive denoising (query count, group isolation through the attention mask), the
Hungarian matcher, and the H preset's keys. Tiny widths so the file runs in ~30 s on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from finetune.heads.dino import DEFAULTS, build_dino

TINY_TRUNK = {"channels": 16, "depths": (1, 1, 2, 1), "groups": (1, 2, 4, 8)}
TINY_HEAD = {"num_queries": 20, "d_model": 64, "encoder_layers": 1, "decoder_layers": 2,
             "num_heads": 4, "ffn_dim": 128, "train_sizes": (64,), "test_size": 64,
             "max_size": 96, "num_dn_queries": 10}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def _tiny(**over):
    torch.manual_seed(0)
    return build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, **{**TINY_HEAD, **over})


def _scenes():
    """Two images with bright boxes on a dark ground, torchvision-style targets."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) * 0.2, torch.rand(3, 48, 64, generator=g) * 0.2]
    targets = [{"boxes": torch.tensor([[5.0, 5, 30, 40], [34, 20, 60, 60]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[8.0, 8, 40, 30]]), "labels": torch.tensor([2])}]
    for img, t in zip(images, targets):
        for x0, y0, x1, y1 in t["boxes"].long().tolist():
            img[:, y0:y1, x0:x1] = 0.9
    return images, targets


def test_training_steps_reduce_the_loss():
    model = _tiny()
    images, targets = _scenes()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    history = []
    for _ in range(12):
        loss, terms = model.loss(images, targets)
        assert torch.isclose(loss, sum(terms.values()))
        assert terms["loss_dn"] > 0 and terms["loss_enc"] > 0 and terms["loss_aux"] > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.85 * sum(history[:3]) / 3, history


def test_every_parameter_gets_a_gradient():
    """No idle parameters (DDP without find_unused_parameters needs this)."""
    model = _tiny().train()
    images, targets = _scenes()
    model.loss(images, targets)[0].backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle


def test_predict_follows_torchvision_convention():
    model = _tiny(num_select=15).eval()
    images, _ = _scenes()
    out = model(images)
    assert len(out) == 2
    for img, det in zip(images, out):
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape == (15, 4) and det["scores"].shape == (15,)
        assert det["labels"].dtype == torch.int64
        assert det["labels"].min() >= 1 and det["labels"].max() <= 3   # 0 = background
        h, w = img.shape[-2:]
        b = det["boxes"]
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert b.min() >= 0 and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_predicted_boxes_are_clipped_to_the_image(monkeypatch):
    """The released DINO head clips boxes to the (resized) image before scaling them back
    (OpenGVLab/InternImage detection/mmdet_custom/models/dense_heads/detr_head.py,
    _get_bboxes_single): boxes made nearly image-sized end on the borders, also for the
    shorter image of a padded batch, where unclipped they reach past them."""
    import finetune.heads.dino as dino

    model = _tiny(num_select=15).eval()
    with torch.no_grad():  # box logits + 6: widths/heights -> ~1, centres unchanged
        for branch in model.bbox_embed:  # one per decoder layer + the encoder's
            branch.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 6.0, 6.0]))
    images, _ = _scenes()
    for img, det in zip(images, model(images)):
        h, w = img.shape[-2:]
        b = det["boxes"]
        assert b.min() >= 0 and b[:, [0, 2]].max() <= w + 1e-4 and b[:, [1, 3]].max() <= h + 1e-4
        for side, edge in ((b[:, 0], 0), (b[:, 1], 0), (b[:, 2], w), (b[:, 3], h)):
            assert ((side - edge).abs() < 1e-4).any()  # clipped on every border
    monkeypatch.setattr(dino, "clip_boxes_to_image", lambda boxes, size: boxes)
    for img, det in zip(images, model(images)):
        h, w = img.shape[-2:]
        b = det["boxes"]
        assert b.min() < -1 or b[:, [0, 2]].max() > w + 1 or b[:, [1, 3]].max() > h + 1


def test_denoising_queries_and_group_isolation():
    """CDN: 2 * max_gt queries per group, num_dn // max_gt groups; a change in one group
    reaches neither the other groups nor the matching queries."""
    model = _tiny().eval()
    images, targets = _scenes()
    pixels, pixel_mask, _, _, tgts = model._prepare(images, targets)
    content_dn, boxes_dn, mask, meta = model._denoising(tgts)
    max_gt, groups = 2, 10 // 2
    assert meta["dn_num_group"] == groups
    assert content_dn.shape[1] == boxes_dn.shape[1] == 2 * max_gt * groups
    assert meta["dn_num_split"] == [2 * max_gt * groups, model.num_queries]

    enc = model._encode(pixels, pixel_mask)
    content, reference, _ = model._select_queries(enc)
    q = torch.cat([content_dn, content], 1)
    r = torch.cat([boxes_dn, reference], 1)
    with torch.no_grad():
        logits, boxes = model._decode(q, r, enc, mask)
        q2, r2 = q.clone(), r.clone()
        group = slice(2 * max_gt, 4 * max_gt)     # perturb group 1 only
        q2[:, group] += torch.randn_like(q2[:, group])
        r2[:, group] = r2[:, group].flip(-1)
        logits2, boxes2 = model._decode(q2, r2, enc, mask)
        unmasked, _ = model._decode(q2, r2, enc, None)
    changed = (logits2 - logits).abs().amax(dim=(0, 1, 3)) > 1e-5   # per query
    assert changed[group].all()
    assert not changed[:2 * max_gt].any() and not changed[4 * max_gt:].any()
    # Without the mask the perturbation leaks into the matching queries: the mask is what
    # isolates them.
    matching = slice(2 * max_gt * groups, None)
    assert (unmasked[:, :, matching] - logits[:, :, matching]).abs().max() > 1e-5


def test_matcher_finds_the_optimal_not_the_greedy_assignment():
    """Hand-made L1 costs (|dcx| only): greedy takes p0->t0 (0.05) then p1->t1 (0.30) = 0.35;
    the optimum is p0->t1 (0.15) + p1->t0 (0.10) = 0.25. p2 (far away) stays unmatched."""
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    matcher = DeformableDetrHungarianMatcher(class_cost=0.0, bbox_cost=1.0, giou_cost=0.0)
    preds = torch.tensor([[0.35, 0.5, 0.2, 0.2], [0.20, 0.5, 0.2, 0.2], [0.90, 0.5, 0.2, 0.2]])
    gts = torch.tensor([[0.30, 0.5, 0.2, 0.2], [0.50, 0.5, 0.2, 0.2]])
    (rows, cols), = matcher({"logits": torch.zeros(1, 3, 2), "pred_boxes": preds[None]},
                            [{"boxes": gts, "class_labels": torch.tensor([0, 1])}])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_box_sine_embedding_is_dinos_y_x_w_h_layout():
    """The positional query's input is DINO's gen_sineembed_for_position layout: for each
    coordinate, d_model // 2 features sin/cos-interleaved of 2 pi v / 10000 ** (2 (i // 2) / F),
    the coordinates concatenated as (y, x, w, h), so ref_point_head weights from DINO fit."""
    import math

    model = _tiny()
    feats = TINY_HEAD["d_model"] // 2

    def sine(v: float) -> torch.Tensor:  # written out independently of both libraries
        i = torch.arange(feats)
        angle = 2 * math.pi * v / 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / feats)
        return torch.where(i % 2 == 0, angle.sin(), angle.cos())

    cx, cy, w, h = 0.3, 0.65, 0.2, 0.1
    got = model.box_sine_embed(torch.tensor([[[cx, cy, w, h]]]))[0, 0]
    assert got.shape == (2 * TINY_HEAD["d_model"],)
    torch.testing.assert_close(got, torch.cat([sine(cy), sine(cx), sine(w), sine(h)]),
                               rtol=1e-4, atol=1e-5)
    # x first would differ: the test tells the two orders apart
    assert not torch.allclose(got, torch.cat([sine(cx), sine(cy), sine(w), sine(h)]), atol=1e-3)


def test_bad_inputs_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown keys"):
        build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, num_querys=5)
    model = _tiny().train()
    images, targets = _scenes()
    targets[0]["labels"] = torch.tensor([0, 3])       # 0 is background, not a class
    with pytest.raises(ValueError, match="labels must lie in"):
        model.loss(images, targets)


@pytest.mark.parametrize("name", ["det_dino_internimage_h_coco.yaml", "det_dino_demo.yaml"])
def test_configs_name_only_known_head_keys(name):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    head = dict(cfg["head"])
    assert head.pop("kind") == "dino"
    assert not set(head) - set(DEFAULTS)


def test_head_sampling_offsets_get_their_own_lr_multiplier_backbone_dcn_does_not():
    """The released DINO recipe's offset_lr_scale: the transformer's deformable-attention
    offsets at lr x 1e-3; the trunk's DCNv3 offset layers follow optim.dcn_lr_mult."""
    from runtime.param_groups import param_groups

    model = _tiny()
    groups = param_groups(model, 0.05, depths=TINY_TRUNK["depths"], dcn_lr_mult=0.5,
                          backbone_prefix=model.backbone_prefix, head_offset_lr_mult=1e-3)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    offsets = [n for n in scale if "sampling_offsets" in n]
    assert offsets and all(scale[n] == pytest.approx(1e-3) for n in offsets)
    trunk_dcn = [n for n in scale if n.startswith(model.backbone_prefix) and ".dcn.offset." in n]
    assert trunk_dcn and all(scale[n] == pytest.approx(0.5) for n in trunk_dcn)
    others = [n for n in scale if not n.startswith(model.backbone_prefix)
              and "sampling_offsets" not in n]
    assert others and all(scale[n] == 1.0 for n in others)
