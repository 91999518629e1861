"""M3I's image branch on the Triton DCNv3 backend (issue #16): one rank under ZeRO-3, the
fused op in the online tower, the EMA target encoder and the decoder's backward (Triton's
interpreter on CPU, TRITON_INTERPRET=1 from tests/conftest.py).

What a user relies on: the branch trains with ``model.dcn_backend=triton`` (every term
finite) and the teacher follows the EMA rule on the online weights the fused op trained.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.pretrain_utils import pretrain_cmd, run_forked

pytestmark = [pytest.mark.distributed, pytest.mark.triton]

MOMENTUM = 0.5
# 64 px is the least the branch accepts: a 2x2 grid at the tiny InternImage's stride 32
# Triton's interpreter runs every program of a launch in Python (seconds per launch), so
# the tower is cut to one block per stage and one group per layer: the same kernels, far
# fewer programs (the op's agreement with the reference is tests/test_dcnv3_*'s business)
BRANCH = ["data.image_size=64", "data.batch_size=2", "model.depths=[1,1,1,1]",
          "model.groups=[1,1,1,1]", "objective.image.weight=1.0",
          "objective.image.decoder_width=32", "objective.image.decoder_heads=2",
          "objective.image.decoder_depth=1", "model.dcn_backend=triton",
          "zero_shot.urls=[]",  # nothing here reads zero-shot: no interpreted eval pass
          # a constant momentum far from 1, so that one EMA step moves the teacher visibly
          # and its value does not depend on the cosine's position in a 2-step run
          f"objective.image.momentum={MOMENTUM}", f"objective.image.momentum_final={MOMENTUM}",
          "--max-steps", "2", "--checkpoint-every", "1"]


def _teacher(ckpt) -> dict[str, torch.Tensor]:
    from pretrain.engine import TEACHER_KEY

    (states,) = ckpt.glob("*model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)[TEACHER_KEY]


def _online(root, tag: str) -> dict[str, torch.Tensor]:
    """The online model's fp32 weights gathered from the ZeRO-3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def test_triton_backend_trains_the_image_branch_and_the_teacher_follows_ema(tmp_path, cache):
    out = tmp_path / "triton"
    # the run's demo shards from the suite's shared cache (not written again for this test);
    # its rank forked from tests/rank_launcher.py's forkserver (no fresh interpreter)
    run_forked(pretrain_cmd(1, out, *BRANCH), cache)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "loss_image_text", "loss_tag", "loss_image",
                    "loss_image_regression", "loss_image_decorrelation"):
            assert math.isfinite(row[key]), (row["step"], key)
    root = out / "checkpoints"
    before, after = _teacher(root / "step_0000001"), _teacher(root / "step_0000002")
    online = _online(root, "step_0000002")
    # BYOL (Grill et al. 2020, eq. 1) / Siamese Image Modeling's target encoder: after the
    # step, teacher <- m * teacher + (1 - m) * online, parameter by parameter
    assert before and before.keys() == after.keys()
    moved = 0
    for name, old in before.items():
        source = online[name].float().reshape(-1)[:old.numel()].view_as(old)
        expected = MOMENTUM * old.float() + (1 - MOMENTUM) * source
        torch.testing.assert_close(after[name].float(), expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
        moved += int(not torch.equal(after[name], old))
    assert moved > 0.5 * len(before), (moved, len(before))  # it learnt, the teacher followed
