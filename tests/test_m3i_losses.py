"""M3I image branch (issue #16): the image-target loss terms on hand-computed inputs, the
text/tag terms with two images per mixed input, and the decoder's view of one image.

Loss definitions: BYOL (Grill et al. 2020, eq. 2) ||p/|p| - t/|t|||^2 = 2 - 2 cos, as
Siamese Image Modeling applies it per patch; UniGrad (Tao et al. 2022) the squared cosine
between different samples as the decorrelation term.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.m3i.decoder import MaskTokenDecoder
from pretrain.m3i.loss import decorrelation_loss, image_target_loss, regression_loss


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
    total, terms = image_target_loss(prediction, prediction, 0.1)
    assert float(terms["loss_image_regression"]) == pytest.approx(0.0, abs=1e-6)
    assert float(total) == pytest.approx(0.1 / 3)


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
