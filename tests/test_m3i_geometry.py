"""M3I image branch geometry (issue #16): views, block-wise mixing, target positions.

Expected values are worked out by hand from the definitions the code follows: a view
patch's position is its centre in the input view's patch coordinates, measured from the
input view's top-left origin (M3I paper, Figure 2 text; Siamese Image Modeling, Tao et
al. 2022); the embedding is MAE's 2-D sine-cosine (facebookresearch/mae
util/pos_embed.py: omega = 1/10000^(k/(D/2)) per axis, [sin, cos]).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.m3i.mixing import block_mask, mix_masks, mix_views
from pretrain.m3i.pos_embed import grid_positions, relative_positions, sincos_embed
from pretrain.m3i.views import ViewGeometry, crop_views, two_views


def _geom(*boxes_flips) -> ViewGeometry:
    boxes = torch.tensor([b for b, _ in boxes_flips], dtype=torch.float32)
    return ViewGeometry(boxes, torch.tensor([f for _, f in boxes_flips]))


def test_cross_view_patches_continue_the_input_views_grid():
    # input view: the top-left 16x16 of a 32x32 image on a 2x2 grid (8 px per patch);
    # target view: the 16x16 right next to it. Its patch centres (20,4),(28,4),(20,12),
    # (28,12) are (x-0)/8-0.5 = columns 2 and 3 of the input view, rows 0 and 1.
    source = _geom(((0, 0, 16, 16), False))
    target = _geom(((16, 0, 32, 16), False))
    pos = relative_positions(target, source, (2, 2))
    assert pos[0].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]


def test_a_larger_target_view_lands_outside_and_between_patches():
    # input view (8,8)-(24,24): 8 source px per patch. Target = the whole 32x32 image on a
    # 2x2 grid: centres at 8 and 24 px -> (8-8)/8-0.5 = -0.5 and (24-8)/8-0.5 = 1.5.
    source = _geom(((8, 8, 24, 24), False))
    target = _geom(((0, 0, 32, 32), False))
    pos = relative_positions(target, source, (2, 2))
    assert pos[0].tolist() == [[-0.5, -0.5], [-0.5, 1.5], [1.5, -0.5], [1.5, 1.5]]


def test_flips_are_followed_on_both_sides():
    # same box, input flipped and target not: the target's left column (centre x=4) is
    # the flipped input's right column (1), and the other way round.
    unflipped = _geom(((0, 0, 16, 16), False))
    flipped = _geom(((0, 0, 16, 16), True))
    assert relative_positions(unflipped, flipped, (2, 2))[0].tolist() == [
        [0, 1], [0, 0], [1, 1], [1, 0]]
    assert relative_positions(flipped, unflipped, (2, 2))[0].tolist() == [
        [0, 1], [0, 0], [1, 1], [1, 0]]


def test_a_view_seen_from_itself_is_the_integer_grid():
    # intra-view targets: mask tokens sit exactly on the input view's own patches
    views = _geom(((3.5, 1.25, 27.0, 30.0), True), ((0, 4, 20, 10), False))
    pos = relative_positions(views, views, (3, 4))
    expected = grid_positions((3, 4)).expand(2, -1, -1)
    assert torch.allclose(pos, expected, atol=1e-5)


def test_sincos_embedding_values():
    # (row 1, column 2), width 8: omega = [1, 1/100] per axis (MAE's formula)
    emb = sincos_embed(torch.tensor([[1.0, 2.0]]), 8)[0]
    expected = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
                math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert emb.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_embed(torch.zeros(1, 2), 6)


def test_crop_views_resamples_the_box_like_bilinear_resize():
    images = torch.randn(2, 3, 32, 32)
    whole = _geom(((0, 0, 32, 32), False), ((0, 0, 32, 32), True))
    out = crop_views(images, whole)
    assert torch.allclose(out[0], images[0], atol=1e-5)
    assert torch.allclose(out[1], images[1].flip(-1), atol=1e-5)  # a flip mirrors columns
    # a 16x16 box scaled to 32x32: torch's bilinear resize (half-pixel centres, edges
    # clamped) of that region, per torch.nn.functional.interpolate's documentation;
    # the outermost output pixels blend in the neighbours outside the box, which the
    # resize of the cut-out region cannot see: compare inside them
    quarter = _geom(((16, 0, 32, 16), False), ((16, 0, 32, 16), False))
    expected = F.interpolate(images[:, :, :16, 16:], size=32, mode="bilinear",
                             align_corners=False)
    inner = (..., slice(1, -1), slice(1, -1))
    assert torch.allclose(crop_views(images, quarter)[inner], expected[inner], atol=1e-5)


def test_two_views_differ_and_carry_their_geometry():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    v1, v2, g1, g2 = two_views(images, (0.3, 1.0), 0.5)
    assert v1.shape == v2.shape == images.shape
    assert not torch.allclose(v1, v2)
    for g in (g1, g2):
        w, h = g.boxes[:, 2] - g.boxes[:, 0], g.boxes[:, 3] - g.boxes[:, 1]
        assert bool((g.boxes >= 0).all() and (g.boxes <= 32).all())
        # area share within torchvision's RandomResizedCrop range (clipping only shrinks)
        assert bool(((w * h) / 32**2 <= 1.0 + 1e-6).all())
        assert torch.allclose(crop_views(images, g), v1 if g is g1 else v2)


@pytest.mark.parametrize("grid,share", [((7, 7), 0.5), ((2, 2), 0.5), ((4, 6), 0.3),
                                        ((1, 2), 0.9)])
def test_block_mask_share_and_both_images_present(grid, share):
    torch.manual_seed(1)
    total = grid[0] * grid[1]
    for _ in range(20):
        mask = block_mask(*grid, share)
        count = int(mask.sum())
        assert count == min(max(round(share * total), 1), total - 1)
        assert 0 < count < total


def test_block_mask_refuses_a_single_patch_grid():
    with pytest.raises(ValueError, match="image_size"):
        block_mask(1, 1, 0.5)


def test_mix_views_takes_each_patch_from_one_image():
    torch.manual_seed(2)
    first, second = torch.zeros(3, 3, 32, 32), torch.ones(3, 3, 32, 32)
    masks = mix_masks(3, 4, 4, 0.5)
    mixed = mix_views(first, second, masks)
    # each 8x8 patch is all second-image (1) where the mask says so, else all first (0)
    patches = mixed[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)  # (B, 4, 4, 8, 8)
    assert torch.equal(patches.amin((-1, -2)), masks.float())
    assert torch.equal(patches.amax((-1, -2)), masks.float())
    with pytest.raises(ValueError, match="does not divide"):
        mix_views(first, second, torch.zeros(3, 5, 5, dtype=torch.bool))
