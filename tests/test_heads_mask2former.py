"""Mask2Former (transformers) on a tiny InternImage: targets, training, inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from finetune.heads import build_mask2former, multiscale_flip_scores  # noqa: E402
from finetune.heads.mask2former import semantic_targets  # noqa: E402

TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)
HEAD = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1,
            decoder_layers=2, num_attention_heads=2, dim_feedforward=64,
            encoder_feedforward_dim=64, num_queries=8, train_num_points=256)


def _scene(batch: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose colour channels encode the class, so the task is learnable."""
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    labels[:, : size // 2] = 1
    labels[:, :, : size // 4] = 2
    labels[0, : size // 8] = 255
    images = 0.1 * torch.randn(batch, 3, size, size)
    images[:, 0] += (labels == 1).float()
    images[:, 1] += (labels == 2).float()
    return images, labels


def test_semantic_targets_one_mask_per_present_class_ignoring_255():
    labels = torch.tensor([[[0, 0, 255], [3, 3, 255]], [[255, 255, 255], [255, 255, 255]]])
    masks, classes = semantic_targets(labels, num_classes=4)
    assert classes[0].tolist() == [0, 3]
    assert masks[0].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0]]]
    assert masks[1].shape == (0, 2, 3) and classes[1].numel() == 0
    with pytest.raises(ValueError, match="outside"):
        semantic_targets(torch.full((1, 2, 2), 4), num_classes=4)


def test_tiny_mask2former_loss_falls_and_inference_shapes():
    torch.manual_seed(0)
    model = build_mask2former("internimage_t", 3, backbone_kwargs=TINY, **HEAD)
    images, labels = _scene()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model.loss(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, 3, 64, 64)
        single = model.predict_semantic(images)
        multi = model.predict_semantic(images, scales=(0.5, 1.0, 1.5), flip=True)
    assert single.shape == multi.shape == (2, 64, 64)
    assert single.dtype == torch.long and int(single.max()) < 3
    # The trunk keeps released-checkpoint names (what --init loads).
    assert "levels.0.blocks.0.dcn.offset.weight" in model.backbone.state_dict()


def test_multiscale_flip_averages_views_at_input_size():
    calls = []

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        # Left half class 0, right half class 1, whatever the view's size.
        scores = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        scores[:, 0, :, : x.shape[-1] // 2] = 1
        scores[:, 1, :, x.shape[-1] // 2:] = 1
        return scores

    out = multiscale_flip_scores(score_fn, torch.zeros(1, 3, 64, 96), scales=(0.5, 1.0),
                                 flip=True)
    assert calls == [(32, 64), (32, 64), (64, 96), (64, 96)]
    assert out.shape == (1, 2, 64, 96)
    # A flipped view of a left/right-split scene votes the mirror image: averages to 0.5.
    torch.testing.assert_close(out, torch.full_like(out, 0.5))


def test_multiscale_averages_each_views_class_probabilities_as_released():
    """mmseg's aug_test averages ``inference`` outputs, each the softmax of a view's
    scores (encoder_decoder_mask2former.py in OpenGVLab/InternImage). One view sure of
    class 0 (scores 3, 0, 1.6), the other unsure between 1 and 2 (0, 2, 1.6): the mean
    probability picks class 0, where the mean raw score would pick class 2."""
    views = iter([torch.tensor([3.0, 0.0, 1.6]), torch.tensor([0.0, 2.0, 1.6])])

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        return next(views)[None, :, None, None].expand(x.shape[0], 3, *x.shape[-2:])

    out = multiscale_flip_scores(score_fn, torch.zeros(1, 3, 32, 32), scales=(1.0, 1.0),
                                 flip=False)
    assert int(out.argmax(1).unique()) == 0
    torch.testing.assert_close(out.sum(1), torch.ones(1, 32, 32))


def test_scaled_views_round_up_to_the_size_divisor():
    # 0.75 x 100 = 75 -> 96 (mmseg's ResizeToMultiple rounds up; rounding to the nearest
    # multiple would give 64, a smaller view than the scale asks for)
    sizes = []

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    multiscale_flip_scores(score_fn, torch.zeros(1, 3, 100, 64), scales=(0.75,), flip=False)
    assert sizes == [(96, 64)]


def test_init_checkpoint_loads_into_the_trunk(tmp_path):
    from models import build_model

    source = build_model("internimage_t", num_classes=5, **TINY)
    path = tmp_path / "cls.pth"
    torch.save({"model": source.state_dict()}, path)
    model = build_mask2former("internimage_t", 3, backbone_kwargs=TINY, init=str(path), **HEAD)
    got = model.backbone.state_dict()
    shared = [k for k in source.state_dict() if k in got]
    assert len(shared) > 50
    for key in shared:
        torch.testing.assert_close(got[key], source.state_dict()[key], msg=key)


def test_multiscale_interpolates_each_views_logits_to_the_original_size_before_softmax():
    """mmseg 0.x (``EncoderDecoder.whole_inference`` with ``rescale``, then ``inference``'s
    softmax, averaged by ``aug_test``; the same in OpenGVLab/InternImage's
    encoder_decoder_mask2former.py): each view's logits are resized to the original image
    size, then turned into probabilities. Before, the probabilities were averaged at the
    test size and resized to the original size afterwards, which moves boundaries."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 5, 5, padding=2)
    original = (75, 100)
    test = torch.randn(1, 3, 96, 128)
    scales = (0.5, 1.0, 1.5)

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        return net(x) * 4

    with torch.no_grad():
        ours = multiscale_flip_scores(score_fn, test, scales=scales, flip=True,
                                      out_size=original)
        expected = 0
        for scale in scales:  # the reference protocol, written out
            size = tuple(-(-round(side * scale) // 32) * 32 for side in (96, 128))
            view = F.interpolate(test, size, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                logits = score_fn(view.flip(-1) if flipped else view)
                logits = logits.flip(-1) if flipped else logits
                expected = expected + F.interpolate(
                    logits, original, mode="bilinear", align_corners=False).softmax(1)
        expected = expected / (2 * len(scales))
    assert ours.shape == (1, 5, *original)
    torch.testing.assert_close(ours, expected)


def test_a_loaded_state_keeps_this_configs_no_object_weight():
    """The no-object class weight is config (head.no_object_weight; transformers keeps it
    in the criterion's ``empty_weight`` buffer, saved with the model): a resume or a whole
    init with another value trains with this config's, strictly loaded as before. Before,
    the checkpoint's value replaced it without a word."""
    torch.manual_seed(0)
    saved = build_mask2former("internimage_t", 3, backbone_kwargs=TINY, no_object_weight=0.1,
                              **HEAD)
    model = build_mask2former("internimage_t", 3, backbone_kwargs=TINY, no_object_weight=0.5,
                              **HEAD)
    state = saved.state_dict()
    assert state["model.criterion.empty_weight"].tolist() == pytest.approx([1, 1, 1, 0.1])
    model.load_state_dict(state, strict=True)
    assert model.model.criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, 0.5])
    learned = {k for k in state if k != "model.criterion.empty_weight"}
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in learned)
