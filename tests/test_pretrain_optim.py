"""Optimizer groups and schedule of pre-training: the lr each group actually trains at.

Outside facts:
- OpenGVLab/InternImage classification/optimizer.py (``set_weight_decay_and_lr``, config
  key ``TRAIN.OPTIMIZER.DCN_LR_MUL``): the DCNv3 sampling-offset projections (names with
  ``offset`` or ``center_feature_scale_proj``; tests/released_lr.py) train at
  ``DCN_LR_MUL`` x the lr of every other parameter, the mask projection among the others;
  norms, biases and the layer-scale gammas are not weight-decayed (the model's
  ``no_weight_decay`` keywords).
- CLIP (Radford et al. 2021, section 2.5): the learnable temperature is not decayed.
- The schedule: linear warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD",
  section 2.2), then cosine annealing ``min + (max - min) / 2 * (1 + cos(pi * t / T))``
  (Loshchilov & Hutter, SGDR, eq. 5) over the steps after the warm-up.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from launch.config import load_config
from pretrain.config import PretrainConfig
from tests.pretrain_utils import TINY

LR, MIN_LR, WARMUP, STEPS, DCN_MULT = 3e-3, 1e-4, 2, 10, 0.1


def _released_schedule(step: int) -> float:
    """Warm-up then SGDR cosine (module docstring), as a multiplier of the base lr; step 0
    is the first update (warm-up reaches the base lr at its last step)."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    t = min(step - WARMUP, STEPS - WARMUP)
    lo = MIN_LR / LR
    return lo + (1 - lo) / 2 * (1 + math.cos(math.pi * t / (STEPS - WARMUP)))


def _is_dcn_sampling(name: str) -> bool:
    from tests.released_lr import classification_dcn

    return classification_dcn(name)


@pytest.fixture(scope="module")
def engine_parts(monkeypatch_module):
    """(model, optimizer, lr scheduler) exactly as pre-training hands them to DeepSpeed
    (``pretrain.engine.build_engine``, ZeRO stage 0 so that no process group is needed);
    DeepSpeed steps that optimizer's groups with that scheduler."""
    import deepspeed

    from launch.commands.pretrain import DEMO_CONFIG
    from pretrain.engine import build_engine, build_model

    cfg = load_config(PretrainConfig, DEMO_CONFIG, [
        *TINY, "model.name=internimage_s", "engine.zero_stage=0", "engine.precision=fp32",
        f"optim.lr={LR}", f"optim.min_lr={MIN_LR}", f"optim.warmup_steps={WARMUP}",
        f"optim.dcn_lr_mult={DCN_MULT}"])
    handed = {}

    def initialize(*, model, optimizer, lr_scheduler, **_):
        handed.update(optimizer=optimizer, scheduler=lr_scheduler(optimizer))
        return model, optimizer, None, handed["scheduler"]

    monkeypatch_module.setattr(deepspeed, "initialize", initialize)
    model = build_model(cfg, num_tags=8)
    build_engine(cfg, model, STEPS)
    return model, handed["optimizer"], handed["scheduler"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _lr_by_name(model, opt) -> dict[str, float]:
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: by_param[id(p)] for n, p in model.named_parameters()}


def test_groups_exclude_norms_biases_gammas_and_temperature_from_weight_decay(engine_parts):
    model, opt, _ = engine_parts
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    for name, p in named.items():
        decayed = by_param[id(p)]["weight_decay"] > 0
        assert decayed == (p.ndim > 1 and not name.endswith(("gamma1", "gamma2"))), name
    assert by_param[id(named["visual.levels.0.blocks.0.gamma1"])]["weight_decay"] == 0
    assert by_param[id(named["logit_scale"])]["weight_decay"] == 0


def test_dcn_offsets_train_at_dcn_lr_mult_of_the_scheduled_lr_at_every_step(engine_parts):
    """The released DCN_LR_MUL rule under the real scheduler: offset params train at
    ``lr * schedule(t) * dcn_lr_mult``, every other parameter (image and text towers,
    projections, tags, temperature) at ``lr * schedule(t)``."""
    model, opt, sched = engine_parts
    names = [n for n, _ in model.named_parameters()]
    assert any(_is_dcn_sampling(n) for n in names) and any(n.startswith("text") for n in names)
    for step in range(STEPS + 2):  # past the end: the cosine stays at min_lr
        lrs = _lr_by_name(model, opt)
        want = LR * _released_schedule(step)
        for name in names:
            mult = DCN_MULT if _is_dcn_sampling(name) else 1.0
            assert lrs[name] == pytest.approx(want * mult, rel=1e-9), (step, name)
        opt.step()
        sched.step()


def test_scheduler_state_dict_round_trips_resumed_lr_equals_uninterrupted():
    """A scheduler restored from a checkpoint's ``state_dict`` (DeepSpeed saves the one it
    owns) sets every group to the lr the uninterrupted scheduler sets, at every later step."""
    from runtime.param_groups import adamw, param_groups
    from runtime.schedules import WarmupCosine

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        opt = adamw(param_groups(model, 0.05), LR, (0.9, 0.98))
        opt.param_groups[0]["lr_scale"] = DCN_MULT  # a scaled group must resume scaled
        return opt, WarmupCosine(opt, WARMUP, STEPS, MIN_LR / LR)

    opt, sched = fresh()
    for _ in range(4):
        opt.step()
        sched.step()
    saved_opt, saved = copy.deepcopy(opt.state_dict()), sched.state_dict()
    uninterrupted = []
    for _ in range(STEPS - 2):
        opt.step()
        sched.step()
        uninterrupted.append([g["lr"] for g in opt.param_groups])

    opt2, sched2 = fresh()
    opt2.load_state_dict(saved_opt)  # DeepSpeed restores the groups with the optimizer
    sched2.load_state_dict(saved)
    resumed = []
    for _ in range(STEPS - 2):
        opt2.step()
        sched2.step()
        resumed.append([g["lr"] for g in opt2.param_groups])
    assert resumed == uninterrupted
    assert resumed[-1][0] == pytest.approx(MIN_LR * DCN_MULT)


def test_old_key_dcn_offset_lr_mult_fails_naming_the_new_key(capsys):
    """One name for the knob in pre-training and fine-tuning (issue #13): the old
    pre-training key is a bad config, refused before any compute, naming the new key."""
    from launch.cli import main

    assert main(["pretrain", "optim.dcn_offset_lr_mult=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.dcn_offset_lr_mult" in err and "optim.dcn_lr_mult" in err
