"""InternImage-H's attention pooling of one image's patches of a mix, batched.

``M3IModel.region_pooled`` pools each mixed map over one image's region. For H (the CLIP
projector's attention pooling) it runs the head once over the batch, which needs every
region of a batch to hold the same number of patches: the mixing masks guarantee it (the
first test), and the batched result equals pooling each image alone (the second).
"""

from __future__ import annotations

import types

import pytest
import torch

from models import build_model
from pretrain.m3i.mixing import mix_masks
from pretrain.m3i_model import M3IModel


@pytest.mark.parametrize("share", [0.05, 0.3, 0.5, 0.75, 0.95])
def test_every_mask_marks_the_same_patch_count_whatever_the_grid(share):
    """block_mask never overshoots its target and fills the rest patch by patch, so each
    mask holds exactly round(share * h * w) clipped to [1, h * w - 1] patches of image B:
    the same for every mask of a batch (one grid and share per run). Grids from 1 x 2 to
    H's 64 x 64 (1024 px at stride 16)."""
    torch.manual_seed(0)
    grids = [(1, 2), (2, 1), (2, 2), (3, 5), (7, 7), (4, 6), (14, 14), (40, 40), (64, 64)]
    for h, w in grids:
        expected = min(max(round(share * h * w), 1), h * w - 1)
        masks = mix_masks(16 if h * w < 1000 else 4, h, w, share)
        counts = masks.flatten(1).sum(1)
        assert (counts == expected).all(), (h, w, counts.tolist())


def _tiny_h():
    torch.manual_seed(0)
    visual = build_model("internimage_h", num_classes=0, channels=16, depths=[1, 1, 1, 1],
                         groups=[1, 1, 1, 1], dcn_backend="reference").double().eval()
    return types.SimpleNamespace(visual=visual)


@torch.no_grad()
def test_batched_attention_pooling_equals_pooling_each_image_alone():
    model = _tiny_h()
    visual = model.visual
    assert visual.use_clip_projector
    unpooled = torch.randn(5, visual.num_features, 4, 6, dtype=torch.float64)
    mix = mix_masks(5, 4, 6, 0.4)
    calls = []
    visual.clip_projector.register_forward_hook(lambda *_: calls.append(1))
    for region in (mix, ~mix):
        calls.clear()
        batched = M3IModel.region_pooled(model, unpooled, region)
        # one call of the head for the batch (under ZeRO-3 one gather of its parameters),
        # not one per image (2B per step before)
        assert len(calls) == 1
        alone = torch.cat([
            visual.forward_head(t[:, r.flatten()][None, :, :, None], pre_logits=True)
            for t, r in zip(unpooled.flatten(2), region)])
        assert batched.shape == (5, visual.head_hidden_size)
        torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-12)


def test_unequal_regions_are_refused_naming_the_counts():
    model = _tiny_h()
    region = torch.zeros(2, 2, 2, dtype=torch.bool)
    region[0, 0, 0] = True
    region[1, :, 0] = True
    with pytest.raises(ValueError, match=r"equal patch counts.*\[1, 2\]"):
        M3IModel.region_pooled(model, torch.randn(2, model.visual.num_features, 2, 2,
                                                  dtype=torch.float64), region)
