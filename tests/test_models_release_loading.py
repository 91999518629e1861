"""Loading and evaluating released InternImage checkpoints as the released code does.

Released facts checked here (OpenGVLab/InternImage):

- classification/dataset/build.py (build_transform, eval branch) with classification/
  config.py ``_C.TEST.CROP = True`` (no released config changes it): the evaluation resizes
  the short side to ``int(1.0 * IMG_SIZE)`` and centre-crops ``IMG_SIZE`` at every size.
- classification/models/intern_image.py (``InternImageLayer.forward``): with
  ``layer_scale`` set, only the ``post_norm`` and plain pre-norm branches exist;
  ``res_post_norm`` acts only without layer scale (its norms are built either way).
"""

from __future__ import annotations

import pytest
import timm
import torch

import models  # noqa: F401  (registers the timm names)
from models.intern_image import InternImageLayer
from models.variants import PRETRAINED_NAMES, VARIANTS

TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0)
TINY_H = dict(channels=32, depths=(1, 1, 6, 1), groups=(1, 2, 4, 8),
              level2_post_norm_block_ids=(1, 3), drop_path_rate=0.0)


def _tiny(name: str) -> dict:
    variant = PRETRAINED_NAMES.get(name, (name, 0))[0]
    return TINY_H if VARIANTS[variant].use_clip_projector else TINY


# ---------------------------------------------------------------- timm eval transform
@pytest.mark.parametrize("name", sorted(PRETRAINED_NAMES) + sorted(VARIANTS))
def test_timm_eval_transform_resizes_to_the_input_size_as_released(name):
    """Released build_transform (TEST.CROP=True): Resize(int(1.0 * IMG_SIZE)) then
    CenterCrop(IMG_SIZE), so crop_pct is 1.0 for every released name (224 px included:
    timm's 0.875 would resize T/S/B to 256 first and score another protocol)."""
    model = timm.create_model(name, pretrained=False, **_tiny(name))
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["crop_pct"] == 1.0
    size = cfg["input_size"][-1]
    if name in PRETRAINED_NAMES:
        assert size == PRETRAINED_NAMES[name][1]
    resize, crop = timm.data.create_transform(**cfg).transforms[:2]
    assert resize.size == size
    assert tuple(crop.size) == (size, size)


# ---------------------------------------------------------------- layer_scale + res_post_norm
def test_layer_scale_takes_precedence_over_res_post_norm_as_released():
    """Released InternImageLayer.forward with layer_scale set and post_norm False:
        x = x + gamma1 * dcn(norm1(x));  x = x + gamma2 * mlp(norm2(x))
    res_post_norm1/2 exist (same state-dict keys as the released layer) but are unused."""
    torch.manual_seed(0)
    layer = InternImageLayer(8, 2, layer_scale=0.5, res_post_norm=True,
                             dcn_backend="reference").double().eval()
    with torch.no_grad():  # non-trivial norms and gammas, so any misplaced one shows
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    # released build_norm_layer(channels, 'LN'): nn.Sequential(nn.LayerNorm) -> ".0."
    assert {k for k in layer.state_dict() if k.startswith("res_post_norm")} == {
        "res_post_norm1.0.weight", "res_post_norm1.0.bias",
        "res_post_norm2.0.weight", "res_post_norm2.0.bias"}
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        want = x + layer.gamma1 * layer.dcn(layer.norm1(x))
        want = want + layer.gamma2 * layer.mlp(layer.norm2(want))
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
