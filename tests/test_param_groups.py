"""Layer-wise lr decay against the released recipes' own rules (tests/released_lr.py,
restated from OpenGVLab/InternImage), for every parameter of InternImage-T and -H (the H
trunk has the post norms and the CLIP-projector head the rules treat specially)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.released_lr import (
    classification_dcn,
    classification_ratio,
    dense_scale,
)

VARIANTS = ["internimage_t", "internimage_h"]


def _mismatches(scales: dict[str, float], expected: dict[str, float]) -> list[str]:
    assert scales.keys() == expected.keys()
    return [f"{n}: ours {scales[n]:.4g}, released {expected[n]:.4g}" for n in expected
            if scales[n] != pytest.approx(expected[n], rel=1e-9)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_classifier_groups_are_the_released_classification_optimizers(variant):
    # the H 1K recipe's layer decay 0.8 (internimage_h_jointto1k_224.yaml) and a DCN
    # multiplier, both as the released classification optimizer applies them
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier, classifier_groups
    from launch.config import load_config

    decay, dcn = 0.8, 0.1
    cfg = load_config(ClassificationConfig, None, [f"model.name={variant}",
                                                   f"optim.layer_decay={decay}",
                                                   f"optim.dcn_lr_mult={dcn}"])
    with torch.device("meta"):
        model = build_classifier(cfg)
    depths = model.depths
    scales = {n: g["lr_scale"] for g in classifier_groups(model, cfg) for n in g["names"]}
    expected = {n: classification_ratio(n, depths, decay) * (dcn if classification_dcn(n)
                                                             else 1.0)
                for n, _ in model.named_parameters()}
    assert not _mismatches(scales, expected)
    # the facts that matter most, spelled out: the last block and the head at the full
    # rate, the stem at decay ** (blocks - 1), the DCN mask projection not multiplied
    last = f"levels.3.blocks.{depths[3] - 1}.mlp.fc1.weight"
    assert scales[last] == scales["head.weight"] == 1.0
    assert scales["patch_embed.conv1.weight"] == pytest.approx(decay ** (sum(depths) - 1))
    assert scales["levels.0.blocks.0.dcn.mask.weight"] == \
        scales["levels.0.blocks.0.mlp.fc1.weight"]


class _Dense(nn.Module):
    """A trunk under ``backbone.`` (the released dense models' prefix) and a head."""

    def __init__(self, variant: str):
        super().__init__()
        from models import build_model

        self.backbone = build_model(variant, num_classes=0)
        self.decode_head = nn.Linear(4, 4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dense_groups_are_the_released_layer_decay_constructors(variant):
    from runtime.param_groups import param_groups

    decay = 0.9
    with torch.device("meta"):
        model = _Dense(variant)
    depths = model.backbone.depths
    groups = param_groups(model, 0.05, depths=depths, backbone_prefix="backbone.",
                          layer_decay=decay)
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    expected = {n: dense_scale(n, depths, decay) for n, _ in model.named_parameters()}
    assert not _mismatches(scales, expected)


def test_an_unknown_rule_is_refused():
    from runtime.param_groups import param_groups

    with pytest.raises(ValueError, match="rule"):
        param_groups(nn.Linear(2, 2), 0.05, rule="vit")
