"""M3I image-branch configuration (issue #16): off by default (the CLIP + tags objective),
impossible settings refused before any compute with the key named."""

from __future__ import annotations

import pytest


def test_image_branch_is_off_by_default_and_the_demo_keeps_it_off():
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    assert not PretrainConfig().objective.image.enabled
    demo = load_config(PretrainConfig, DEMO_CONFIG, [])
    assert not demo.objective.image.enabled and demo.objective.image.decoder_spec() is None
    # Siamese Image Modeling's published defaults where M3I is silent
    image = demo.objective.image
    assert (image.momentum, image.momentum_final, image.decoder_depth) == (0.995, 1.0, 4)


@pytest.mark.parametrize("overrides, message", [
    # the demo's 32 px images are one patch at stride 32: nothing to mix
    (["objective.image.weight=1"], "data.image_size"),
    (["objective.image.weight=1", "data.image_size=80"], "data.image_size"),
    (["objective.image.weight=1", "data.image_size=64", "data.batch_size=1"],
     "data.batch_size"),
    (["objective.image.mix_share=1.0"], "objective.image.mix_share"),
    (["objective.image.momentum=0.999", "objective.image.momentum_final=0.99"],
     "objective.image.momentum"),
    (["objective.image.decoder_width=30", "objective.image.decoder_heads=3"],
     "objective.image.decoder_width"),
    (["objective.image.view_scale=[0.0,1.0]"], "objective.image.view_scale"),
    (["objective.image.loss=mse"], "objective.image.loss"),
])
def test_bad_image_branch_config_fails_before_compute(overrides, message, capsys):
    from launch.cli import main

    assert main(["pretrain", *overrides]) == 2
    assert message in capsys.readouterr().err
