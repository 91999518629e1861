"""A classifier head the --init does not provide starts scaled by model.head_init_scale.

The released recipe of InternImage-H joint->1K 224 sets ``TRAIN.RAND_INIT_FT_HEAD: true``
(OpenGVLab/InternImage classification/configs/internimage_h_jointto1k_224.yaml, removed
upstream in 1e92a2d), and its loader then multiplies the fresh head by 0.001
(classification/utils.py ``load_pretrained``: ``model.head.weight.data *
0.001``): with no warm-up in that recipe, a head at its built scale (std 0.02, logits of
std ~0.5 over 1000 classes) sent random gradients into the pre-trained trunk, and seeded
the EMA with them. Our preset sets ``model.head_init_scale: 0.001``.
"""

from __future__ import annotations

import pytest
import torch

from finetune.classification import ClassificationConfig
from finetune.cls_build import build_classifier
from launch.config import ConfigError, load_config
from models import build_model


def _file(tmp_path, cfg, num_classes: int) -> str:
    """A released-style checkpoint ({"model": state_dict}) of the config's variant."""
    torch.manual_seed(1)
    src = build_model(cfg.model.name, num_classes=num_classes, **cfg.model.build_kwargs())
    path = tmp_path / f"{num_classes}.pth"
    torch.save({"model": src.state_dict()}, path)
    return str(path)


def test_a_fresh_head_starts_scaled_and_a_loaded_one_as_loaded(tmp_path):
    cfg = load_config(ClassificationConfig, None, ["model.head_init_scale=0.001"])
    torch.manual_seed(0)
    built = build_classifier(cfg)  # the head as built (no --init)
    for classes in (0, 7):  # a backbone-only file (convert output); another class count
        path = _file(tmp_path, cfg, classes)
        torch.manual_seed(0)  # the head built as above
        model = build_classifier(cfg, init=path)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(model.head, name),
                                       getattr(built.head, name) * 0.001, rtol=0, atol=0)
        assert model.head.weight.std() < 1e-3 * 0.03
    # a file with this class count: its head is the run's, never scaled
    path = _file(tmp_path, cfg, cfg.data.num_classes)
    model = build_classifier(cfg, init=path)
    saved = torch.load(path)["model"]
    torch.testing.assert_close(model.head.weight, saved["head.weight"], rtol=0, atol=0)
    # the default leaves a fresh head as built
    plain = load_config(ClassificationConfig, None, [])
    path = _file(tmp_path, plain, 0)
    torch.manual_seed(0)
    model = build_classifier(plain, init=path)
    torch.testing.assert_close(model.head.weight, built.head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.001"])
def test_a_head_init_scale_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match="model.head_init_scale"):
        load_config(ClassificationConfig, None, [f"model.head_init_scale={value}"])


def test_the_h_224_preset_scales_its_fresh_head_as_released():
    """internimage_h_jointto1k_224.yaml: ``RAND_INIT_FT_HEAD: true`` (0.001, above)."""
    from pathlib import Path

    presets = Path(__file__).resolve().parents[1] / "configs" / "finetune"
    path = presets / "cls_internimage_h_jointto1k_224.yaml"
    cfg = load_config(ClassificationConfig, str(path), [])
    assert cfg.model.head_init_scale == 0.001
