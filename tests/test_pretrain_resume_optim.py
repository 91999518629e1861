"""A pre-training resume trains with its own config's optimizer settings.

DeepSpeed's ``load_checkpoint`` restores the optimizer's param groups whole (lr,
initial_lr, lr_scale, weight_decay, betas) and the ``WarmupCosine`` scheduler's state
(base_lrs, warmup_steps, min_ratio): before the fix a resume with another ``optim.lr``,
``weight_decay``, ``betas``, ``min_lr`` or ``warmup_steps`` trained on with the
checkpoint's values while its config.yaml recorded the new ones. Now the resumed steps
train at a fresh new-config run's lr and settings, with the checkpoint's AdamW moments."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.pretrain_utils import pretrain_cmd, run_forked

pytestmark = [pytest.mark.distributed]

# Writes OUT/groups.json once the trainer is built (a resume: after the load): the
# settings of the groups the optimizer steps, the scheduler's, and the AdamW step counts.
DUMP_GROUPS = """
import json, sys
import pretrain.trainer as tr
original = tr.Trainer.fit
def fit(self):
    sched = self.engine.lr_scheduler
    opt = sched.optimizer
    keys = ("lr", "initial_lr", "lr_scale", "weight_decay", "betas")
    dump = {"groups": [{k: g.get(k) for k in keys} for g in opt.param_groups],
            "base_lrs": list(sched.base_lrs), "warmup_steps": sched.warmup_steps,
            "min_ratio": sched.min_ratio, "last_epoch": sched.last_epoch,
            "steps": sorted({float(s["step"]) for s in opt.state.values() if "step" in s})}
    (self.run_dir / "groups.json").write_text(json.dumps(dump))
    return original(self)
tr.Trainer.fit = fit
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""

NEW = ["optim.lr=1e-3", "optim.weight_decay=0.2", "optim.betas=[0.8,0.95]",
       "optim.min_lr=2e-4", "optim.warmup_steps=1"]


def _run(out, cache, *args):
    cmd = pretrain_cmd(1, out, "--max-steps", "4", "--checkpoint-every", "2", *args)
    run_forked([sys.executable, "-c", DUMP_GROUPS, *cmd[3:]], cache)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["lr"] for r in rows if "lr" in r},
            json.loads((out / "groups.json").read_text()))


def test_a_resume_with_a_changed_optim_config_trains_with_the_new_settings(tmp_path,
                                                                            cache):
    old_lr, _ = _run(tmp_path / "old", cache)  # TINY: lr 3e-3, warm-up 2, default rest
    ckpt = tmp_path / "old" / "checkpoints" / "step_0000002"
    resumed_lr, resumed = _run(tmp_path / "resumed", cache, "--resume", str(ckpt), *NEW)
    fresh_lr, fresh = _run(tmp_path / "fresh", cache, *NEW)

    assert sorted(resumed_lr) == [3, 4]
    assert fresh_lr[3] != pytest.approx(old_lr[3])  # the change moves the lr at step 3
    for step in (3, 4):
        assert math.isclose(resumed_lr[step], fresh_lr[step], rel_tol=1e-12, abs_tol=0), (
            step, resumed_lr, fresh_lr, old_lr)
    # the optimizer's groups: this config's settings, as a fresh build's
    for got, want in zip(resumed["groups"], fresh["groups"], strict=True):
        for key in ("initial_lr", "lr_scale", "weight_decay", "betas"):
            assert got[key] == want[key], (key, got, want)
    assert resumed["base_lrs"] == fresh["base_lrs"]
    assert (resumed["warmup_steps"], resumed["min_ratio"]) == (
        fresh["warmup_steps"], fresh["min_ratio"])
    # the schedule's position and the AdamW moments are the checkpoint's (step 2)
    assert resumed["last_epoch"] == 2
    assert resumed["steps"] == [2.0] and fresh["steps"] == []
