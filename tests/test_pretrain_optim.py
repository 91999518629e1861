"""Optimizer groups and schedule of pre-training."""

from __future__ import annotations

import pytest
import torch

from pretrain.m3i_model import M3IModel
from pretrain.optim import build_optimizer, warmup_cosine


def test_groups_exclude_norms_biases_gammas_and_scale_dcn_lr():
    model = M3IModel("internimage_s", 16, 8, 32, 2, 1, 100, 3, channels=16,
                     depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6,
                          dcn_lr_mult=0.1)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name, p in named.items():
        group = by_param[id(p)]
        decayed = group["weight_decay"] > 0
        assert decayed == (p.ndim > 1 and not name.endswith(("gamma1", "gamma2"))), name
        dcn = ".dcn.offset." in name or ".dcn.mask." in name
        assert group["lr"] == pytest.approx(1e-4 if dcn else 1e-3), name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    assert by_param[id(named["visual.levels.0.blocks.0.gamma1"])]["weight_decay"] == 0
    assert by_param[id(named["logit_scale"])]["weight_decay"] == 0


def test_warmup_then_cosine_to_min_ratio():
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_keeps_group_ratios():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1.0},
                             {"params": [model.bias], "lr": 0.1}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 10, 0.0))
    for _ in range(5):
        opt.step()
        sched.step()
    lr_w, lr_b = (g["lr"] for g in opt.param_groups)
    assert lr_b == pytest.approx(0.1 * lr_w)
