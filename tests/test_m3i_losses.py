"""M3I image branch (issue #16): the image-target loss terms on hand-computed inputs, the
text/tag terms with two images per mixed input, and the decoder's view of one image.

Loss definitions. ``unigrad``: Siamese Image Modeling's ``compute_unigrad_loss``
(OpenGVLab/Siamese-Image-Modeling, models_sim.py): targets through
``LayerNorm(D, elementwise_affine=False)`` (util/misc.py's fp32 LayerNorm, torch's default
eps 1e-5), pos = mean_i ||p_i - t_i||^2, C = T^T T / N all-reduced and divided by the world
size, neg = mean(diag(P C P^T)), loss = (pos + neg_weight * neg) / D, neg_weight 0.02
(main_pretrain.py). ``cosine`` (ours): BYOL's (Grill et al. 2020, eq. 2) ||p/|p| -
t/|t|||^2 = 2 - 2 cos per patch, and the squared cosine between different patches as the
decorrelation term.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from pretrain.m3i.decoder import MaskTokenDecoder
from pretrain.m3i.loss import decorrelation_loss, image_target_loss, regression_loss
from tests.rank_launcher import run_file_function


def test_regression_is_the_distance_of_normalised_features():
    # patch 1: orthogonal -> |(1,0) - (0,1)|^2 = 2; patch 2: same direction -> 0
    prediction = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    target = torch.tensor([[[0.0, 2.0], [6.0, 8.0]]])
    assert float(regression_loss(prediction, target)) == pytest.approx(1.0)
    # 60 degrees apart: 2 - 2 cos(60) = 1
    p = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.5, math.sqrt(3) / 2]])
    assert float(regression_loss(p, t)) == pytest.approx(1.0, abs=1e-6)


def test_regression_sends_no_gradient_to_the_target():
    prediction = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, requires_grad=True)
    regression_loss(prediction, target).backward()
    assert prediction.grad is not None and target.grad is None


def test_decorrelation_is_the_mean_squared_cosine_of_different_patches():
    # (1,0), (0,1), (1,1): cos^2 = 0, 1/2, 1/2 for the three pairs; 6 ordered pairs
    prediction = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    assert float(decorrelation_loss(prediction)) == pytest.approx(2 * (0 + 0.5 + 0.5) / 6)
    # all patches on one direction: the collapse it penalises, value 1
    assert float(decorrelation_loss(torch.ones(5, 3))) == pytest.approx(1.0, abs=1e-6)


def test_total_weights_the_decorrelation():
    prediction = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]]])
    total, terms = image_target_loss(prediction, prediction, "cosine", 0.1)
    assert float(terms["loss_image_regression"]) == pytest.approx(0.0, abs=1e-6)
    assert float(total) == pytest.approx(0.1 / 3)


def _siamim_unigrad(pred: torch.Tensor, target: torch.Tensor, correlation=None,
                    neg_weight: float = 0.02) -> torch.Tensor:
    """compute_unigrad_loss as models_sim.py writes it (float64, one process unless
    ``correlation``, the all-reduced mean, is given): the N x N product for its diagonal."""
    norm = torch.nn.LayerNorm(target.shape[-1], elementwise_affine=False).double()
    with torch.no_grad():
        target = norm(target)
    dense_pred = pred.reshape(-1, pred.shape[-1])
    dense_target = target.reshape(-1, target.shape[-1])
    pos_term = ((dense_pred - dense_target) ** 2).sum(-1).mean()
    if correlation is None:
        correlation = (dense_target.T @ dense_target) / dense_target.shape[0]
    neg_term = torch.diagonal(dense_pred @ correlation @ dense_pred.T).mean()
    return (pos_term + neg_weight * neg_term) / pred.shape[-1]


def test_unigrad_by_hand():
    """Targets (3, 1) and (0, 2) layer-normalise to (1, -1) and (-1, 1) (up to eps 1e-5 in
    the variance 1), whose correlation is [[1, -1], [-1, 1]]; predictions (1, 0) and
    (0, 0): pos = (1 + 2) / 2, neg = (1 + 0) / 2, loss = (1.5 + 0.02 x 0.5) / 2."""
    prediction = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[3.0, 1.0], [0.0, 2.0]]])
    total, terms = image_target_loss(prediction, target, "unigrad", 0.02)
    assert float(terms["loss_image_regression"]) == pytest.approx(1.5 / 2, rel=1e-4)
    assert float(terms["loss_image_decorrelation"]) == pytest.approx(0.5 / 2, rel=1e-4)
    assert float(total) == pytest.approx(0.755, rel=1e-4)


def test_unigrad_equals_siamims_loss_and_gradient():
    torch.manual_seed(0)
    prediction = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 7, 16, dtype=torch.float64) * 3 + 1
    reference_prediction = prediction.detach().clone().requires_grad_()
    reference = _siamim_unigrad(reference_prediction, target.clone())
    reference.backward()
    target.requires_grad_()
    total, _ = image_target_loss(prediction, target, "unigrad", 0.02)
    total.backward()
    # ours computes in float32 (the loss of a bf16 run too)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(prediction.grad, reference_prediction.grad, rtol=1e-4,
                               atol=1e-7)
    assert target.grad is None  # no gradient to the target encoder


def test_an_unknown_image_loss_is_named():
    with pytest.raises(ValueError, match="'mse'"):
        image_target_loss(torch.ones(1, 2, 2), torch.ones(1, 2, 2), "mse", 0.02)


def _unigrad_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(4, 5, 8, dtype=torch.float64)


def _unigrad_worker(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prediction, target = (t[rank * 2:rank * 2 + 2] for t in _unigrad_batch())
    prediction.requires_grad_()
    total, _ = image_target_loss(prediction, target, "unigrad", 0.02)
    total.backward()
    torch.save({"loss": total.item(), "grad": prediction.grad}, os.path.join(
        out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # as test_objectives' worker: no gloo teardown race


@pytest.mark.distributed
def test_unigrad_on_two_ranks_uses_the_correlation_of_every_ranks_targets(tmp_path):
    """Each rank's decorrelation term weighs its predictions with the targets' correlation
    averaged over the ranks (SiamIM's all_reduce / world size): with equal shares, the
    mean of the ranks' losses is the loss of the whole batch in one process, and each
    rank's gradient, halved by DeepSpeed's average over 2 ranks, that loss's gradient."""
    run_file_function(__file__, "_unigrad_worker", 2, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    prediction, target = _unigrad_batch()
    prediction.requires_grad_()
    whole = _siamim_unigrad(prediction, target)
    whole.backward()
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(whole.item(), rel=1e-5)
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["grad"].double() / 2,
                                   prediction.grad[rank * 2:rank * 2 + 2], rtol=1e-4,
                                   atol=1e-7)
    # a rank's own correlation alone gives another loss: the all-reduce is what matches
    own, _ = image_target_loss(prediction[:2].detach(), target[:2], "unigrad", 0.02)
    assert abs(float(own) - ranks[0]["loss"]) > 1e-4


@torch.no_grad()
def test_decoder_reads_only_its_images_patches():
    torch.manual_seed(0)
    decoder = MaskTokenDecoder(in_dim=6, out_dim=5, width=16, depth=2, heads=2).eval()
    feature_map = torch.randn(2, 6, 3, 3)
    mix = torch.zeros(2, 3, 3, dtype=torch.bool)
    mix[:, :, 2] = True  # the last column shows image B
    pos_a, pos_b = torch.rand(2, 9, 2) * 3, torch.rand(2, 9, 2) * 5 - 1
    out = decoder(feature_map, mix, pos_a, pos_b)
    assert out.shape == (4, 9, 5)
    changed = feature_map.clone()
    changed[:, :, :, 2] += 10.0  # only image B's patches change
    again = decoder(changed, mix, pos_a, pos_b)
    # image A's predictions are exactly unaffected (up to float noise); image B's move
    assert float((again[:2] - out[:2]).abs().max()) < 1e-6
    assert float((again[2:] - out[2:]).abs().max()) > 1e-5
    # target positions steer the prediction (the mask tokens differ only by them)
    moved = decoder(feature_map, mix, pos_a + 1.0, pos_b)
    assert float((moved[:2] - out[:2]).abs().max()) > 1e-5
    assert float((moved[2:] - out[2:]).abs().max()) < 1e-6


def test_a_resume_that_changes_the_image_loss_says_how_to_keep_it():
    """Checkpoints record the image loss they trained (trainer state ``image_loss``); one
    saved before the record trained the cosine form at 0.1, the then default. A resume
    whose config trains another form or weight is warned, with the overrides that
    continue as it was; the same loss is not."""
    from pretrain.config import ImageTargetConfig
    from pretrain.m3i.loss import image_loss_change, image_loss_state

    unigrad = ImageTargetConfig(weight=1.0)
    assert image_loss_state(ImageTargetConfig()) == {}  # branch off: nothing recorded
    state = image_loss_state(unigrad)
    assert state == {"image_loss": {"form": "unigrad", "decorrelation_weight": 0.02}}
    assert image_loss_change(state, unigrad) is None
    old = image_loss_change({}, unigrad)  # a checkpoint from before the record
    assert old.endswith("objective.image.loss=cosine objective.image.decorrelation_weight=0.1")
    assert image_loss_change({}, ImageTargetConfig(weight=1.0, loss="cosine",
                                                   decorrelation_weight=0.1)) is None
    heavier = image_loss_change(state, ImageTargetConfig(weight=1.0, decorrelation_weight=0.1))
    assert "trains unigrad with 0.1" in heavier and heavier.endswith(
        "objective.image.loss=unigrad objective.image.decorrelation_weight=0.02")
