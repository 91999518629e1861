"""Mixup/CutMix with an odd ``run.batch_size`` is refused when the config is read.

timm's ``Mixup.__call__`` (timm/data/mixup.py, what finetune/cls_build.py ``build_mixup``
returns) asserts ``len(x) % 2 == 0`` ("Batch size should be even when using this") before
anything else, in every mode and with any alpha, CutMix alone included: it mixes each
image with its mirror in the batch. An odd batch used to pass the config checks, write
the run's config.yaml, build everything and crash at step 1.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("aug", [["aug.mixup=0.8"], ["aug.cutmix=1.0"],
                                 ["aug.mixup=0.8", "aug.cutmix=1.0", "aug.mix_prob=0"]])
def test_odd_batch_with_mixup_or_cutmix_is_refused(aug):
    from finetune.classification import ClassificationConfig
    from launch.config import load_config

    with pytest.raises(ValueError, match=r"run\.batch_size: must be even with Mixup/CutMix"):
        load_config(ClassificationConfig, None, ["run.batch_size=3", *aug])
    load_config(ClassificationConfig, None, ["run.batch_size=4", *aug])  # even: fine


def test_odd_batch_without_mixing_is_accepted():
    from finetune.classification import ClassificationConfig
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, ["run.batch_size=3", "aug.mixup=0",
                                                   "aug.cutmix=0"])
    assert cfg.run.batch_size == 3


def test_dry_run_refuses_it_naming_the_key(capsys):
    from launch.cli import main

    assert main(["finetune", "classification", "run.batch_size=3", "aug.mixup=0.8",
                 "--dry-run"]) == 2
    assert "run.batch_size: must be even" in capsys.readouterr().err


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_timm_mixup_asserts_an_even_batch_whatever_the_alphas(mixup, cutmix):
    """The fact the refusal rests on, in the installed timm: CutMix alone too."""
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, num_classes=10)
    with pytest.raises(AssertionError, match="Batch size should be even"):
        mix(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    mix(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
