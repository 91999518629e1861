"""M3I with every branch on (issue #16): 2 real gloo ranks under ZeRO-3 on the demo
shards, image-text + tags + the image branch (mixed views, EMA target encoder, decoder),
in bf16 with activation checkpointing (the H recipe's settings).

What a user relies on: every term is finite and the trained terms fall over a few steps,
the EMA teacher travels with the checkpoint (a killed run resumes to the same losses), and
the objective with the image branch off is still the plain CLIP + tags one.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.pretrain_utils import TINY, kill_forked_once_saved, latest, losses, pretrain_cmd
from tests.rank_launcher import run_cli

pytestmark = [pytest.mark.distributed]
# 64 px: a 2x2 grid at the tiny InternImage's stride 32, the least that can mix two images
IMAGE_BRANCH = ["data.image_size=64", "data.batch_size=8", "objective.image.weight=1.0",
                "objective.image.decoder_width=32", "objective.image.decoder_heads=2",
                "objective.image.decoder_depth=2", "--max-steps", "6",
                "--checkpoint-every", "2",
                # as the H recipe trains (configs/pretrain/internimage_h_m3i.yaml): bf16 with
                # activation checkpointing, both of which the branch must survive (issue #16)
                "model.with_cp=true", "engine.precision=bf16"]
TERMS = ("loss_image_text", "loss_tag", "loss_image_regression")


def _rows(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("m3i_all_branches")
    codes = run_cli(["pretrain", "--output-dir", str(out), *TINY, *IMAGE_BRANCH],
                    world=2, env={"INTERNIMAGE_CACHE": str(cache)}, timeout=240)
    assert codes == [0, 0], codes
    return out


def test_all_branches_finite_and_falling(reference_run):
    rows = _rows(reference_run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        for key in (*TERMS, "loss_image", "loss_image_decorrelation", "loss"):
            assert math.isfinite(row[key]), (row["step"], key)
    for key in TERMS:
        first, last = rows[0][key] + rows[1][key], rows[-2][key] + rows[-1][key]
        assert last < first, (key, [r[key] for r in rows])
    # the teacher's momentum as logged: BYOL's cosine from SiamIM's 0.995 to 1 over the
    # 6 steps, step k updating at (k - 1) / 6 (Grill et al. 2020, section 3.2)
    for row in rows:
        expected = 1 - 0.005 * (math.cos(math.pi * (row["step"] - 1) / 6) + 1) / 2
        assert row["ema_momentum"] == pytest.approx(expected, rel=1e-12), row["step"]
    # UniGrad's p^T C p with C = mean t t^T (positive semi-definite) is never negative
    assert all(r["loss_image_decorrelation"] >= 0 for r in rows)
    ckpt = reference_run / "checkpoints" / "step_0000006"
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-3: one partition per rank
    # the image loss it trained, recorded for a resume to compare (pretrain/m3i/loss.py)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["image_loss"] == {"form": "unigrad", "decorrelation_weight": 0.02}


def test_kill_then_resume_gives_identical_losses(reference_run, tmp_path, cache):
    # the EMA teacher's slices come back from the checkpoint (DeepSpeed client state), as
    # do the RNG states that draw views and masks: the resumed steps repeat exactly
    out = tmp_path / "killed"
    cmd = pretrain_cmd(2, out, *IMAGE_BRANCH)
    # mid-run, no chance to clean up (its ranks forked, as the resume's: no fresh imports)
    kill_forked_once_saved(cmd, cache, out, "step_0000002")
    assert latest(out) in ("step_0000002", "step_0000004"), latest(out)
    codes = run_cli(["pretrain", "--output-dir", str(out), *TINY, *IMAGE_BRANCH,
                     "--resume", "auto"], world=2, env={"INTERNIMAGE_CACHE": str(cache)},
                    timeout=240)
    assert codes == [0, 0], codes
    resumed, reference = losses(out), losses(reference_run)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    rows = {r["step"]: r for r in _rows(out)}
    for step, row in zip(range(1, 7), _rows(reference_run)):
        assert rows[step]["loss_image"] == pytest.approx(row["loss_image"], rel=1e-6), step


def test_a_zero2_run_resumes_its_teacher_from_rank_0s_copy(tmp_path, cache):
    """Under ZeRO 0-2 DeepSpeed writes client state with the model states on rank 0 alone
    (deepspeed/runtime/engine.py ``_configure_checkpointing``: every rank reads that one
    file back), so only rank 0 copies the whole teacher into it (the others' 4.3 GB host
    copy of H's teacher was thrown away at every save): a killed ZeRO-2 run still resumes
    to the losses of one never stopped."""
    zero2 = [*IMAGE_BRANCH, "engine.zero_stage=2"]
    reference = tmp_path / "reference"
    codes = run_cli(["pretrain", "--output-dir", str(reference), *TINY, *zero2], world=2,
                    env={"INTERNIMAGE_CACHE": str(cache)}, timeout=240)
    assert codes == [0, 0], codes
    out = tmp_path / "killed"
    kill_forked_once_saved(pretrain_cmd(2, out, *zero2), cache, out, "step_0000002")
    codes = run_cli(["pretrain", "--output-dir", str(out), *TINY, *zero2, "--resume", "auto"],
                    world=2, env={"INTERNIMAGE_CACHE": str(cache)}, timeout=240)
    assert codes == [0, 0], codes
    resumed, expected = losses(out), losses(reference)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
