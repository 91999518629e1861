"""The dry-run memory plan counts M3I's image branch (issue #16): the EMA target encoder,
its forward, the decoder's parameters and activations."""

from __future__ import annotations

import pytest
import torch

from tests.pretrain_utils import REPO

IMAGE_ON = ["objective.image.weight=1.0", "objective.image.decoder_width=32",
            "objective.image.decoder_heads=2", "data.image_size=64"]


def _plan(config, *overrides: str, gpus: int = 8):
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.plan import memory_bytes, meta_model

    cfg = load_config(PretrainConfig, config, ["engine.precision=bf16", *overrides])
    model = meta_model(cfg)
    visual = sum(p.numel() for p in model.visual.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters()) if model.decoder else 0
    return memory_bytes(cfg, model, gpus=gpus), visual, decoder, model


def test_plan_counts_the_teacher_and_the_decoder():
    from launch.commands.pretrain import DEMO_CONFIG

    off, _, _, model_off = _plan(DEMO_CONFIG, "data.image_size=64")
    on, visual, decoder, model_on = _plan(DEMO_CONFIG, *IMAGE_ON)
    assert decoder > 0
    assert "target_encoder_states" not in off["gpu"]  # branch off: the plan of before
    # the decoder is part of the online model (its states are ZeRO-3 partitioned too)
    assert (sum(p.numel() for p in model_on.parameters())
            == sum(p.numel() for p in model_off.parameters()) + decoder)
    gpu = on["gpu"]
    # fp32 EMA copy of the image tower, 1/8 per GPU under ZeRO-3 (REFERENCE.md section 6:
    # 4N/W bytes per rank), and the teacher engine's bf16 slices (2N/W) in this bf16 run
    assert gpu["target_encoder_states"] == (4 + 2) * -(-visual // 8)
    assert gpu["target_encoder_forward_upper_bound"] > 0 and gpu["decoder_activations"] > 0
    assert gpu["total"] == sum(v for k, v in gpu.items() if k != "total")
    assert gpu["total"] > off["gpu"]["total"]


def _image_branch(config, *overrides: str, gpus: int = 8) -> dict:
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.plan import image_branch_bytes, meta_model

    cfg = load_config(PretrainConfig, config, ["engine.precision=bf16", *overrides])
    return image_branch_bytes(cfg, meta_model(cfg), gpus, torch.bfloat16)


def test_teacher_is_whole_on_each_gpu_without_zero3():
    from launch.commands.pretrain import DEMO_CONFIG

    _, visual, _, _ = _plan(DEMO_CONFIG, *IMAGE_ON)
    terms = _image_branch(DEMO_CONFIG, *IMAGE_ON, "engine.zero_stage=2")
    assert terms["target_encoder_states"] == 4 * visual


def test_h_recipe_plans_all_branches():
    # REFERENCE.md section 6: the fp32 EMA teacher costs ~0.54 GB per rank for H on 8
    # ranks; the bf16 slices its forward gathers half as much again
    terms = _image_branch(REPO / "configs/pretrain/internimage_h_m3i.yaml", gpus=8)
    assert terms["target_encoder_states"] == pytest.approx(0.54e9 * 1.5, rel=0.03)
    assert terms["decoder_activations"] > 0
