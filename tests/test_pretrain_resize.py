"""Pre-training resumed on another world size (issue #14: ``--resume`` on a different
number of ranks works, with DeepSpeed's universal checkpoint for model and optimizer and
the data re-dealt at shard granularity)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from runtime.schedules import warmup_cosine
from tests.pretrain_utils import losses, pretrain_cmd, run

pytestmark = [pytest.mark.distributed]

# Resume through the CLI, and right after the checkpoint is loaded write the model's
# parameters (gathered from the ZeRO-3 partitions) and buffers to the file named by argv[1].
DUMP_AFTER_RESTORE = """
import sys, torch, deepspeed
import pretrain.trainer as tr
out = sys.argv.pop(1)
original = tr.Trainer._restore
def restore(self):
    original(self)
    named = list(self.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        weights = {n: p.detach().float().clone() for n, p in named}
        buffers = {n: b.detach().clone() for n, b in self.engine.module.named_buffers()}
        torch.save(weights | buffers, out)
tr.Trainer._restore = restore
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_rank_zero3_checkpoint_resumes_on_one_rank(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    run(pretrain_cmd(2, out, "--max-steps", "2", "--checkpoint-every", "2"), cache)
    dump = tmp_path / "restored.pt"
    args = pretrain_cmd(1, out, "--max-steps", "3", "--resume", "auto")[3:]  # after the -m
    proc = run([sys.executable, "-c", DUMP_AFTER_RESTORE, str(dump), *args], cache)
    # Model: the weights after loading on 1 rank are the 2 ranks' saved fp32 weights, as
    # DeepSpeed's own consolidation of the ZeRO-3 files gives them (zero_to_fp32), and so
    # are the buffers (the image tower's BatchNorm statistics, rank 0's there), which
    # DeepSpeed's universal load leaves at their initial values.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"),
                                                     tag="step_0000002")
    restored = torch.load(dump)
    assert set(saved) <= set(restored)  # restored also has non-persistent buffers
    assert any("running_mean" in name for name in saved)
    for name, value in saved.items():
        assert torch.equal(restored[name].to(value.dtype), value), name
    # Training continues: step 3 ran on the new world size with a finite loss.
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3] and torch.isfinite(torch.tensor(steps[3]))
    # ... on the restored schedule: step 3's lr is the schedule's value at 3 (TINY: lr 3e-3,
    # 2 warm-up steps; demo min_lr 1e-4; 3 steps), not at 1 as a fresh scheduler gives.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lr = [r["lr"] for r in rows if r.get("step") == 3 and "lr" in r][-1]
    assert lr == pytest.approx(3e-3 * warmup_cosine(2, 3, 1e-4 / 3e-3)(3), rel=1e-9)
    # Data: re-dealt at shard granularity, and the log says what is repeated.
    assert "re-dealt over the new slots" in proc.stderr
    assert "samples repeated across the change" in proc.stderr
