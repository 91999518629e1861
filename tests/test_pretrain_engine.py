"""Pre-training engine with real processes: ZeRO-3 on 2 gloo ranks, exact resume after a
kill, checkpoints that survive a crash mid-save, non-finite losses, bad configs.

The runs fork their ranks from tests/rank_launcher.py's forkserver (``run_forked``: the
same command, argv and environment, without paying torch's imports in a fresh interpreter
per rank); torchrun's own launch of 2 ranks is run by tests/test_pretrain_precision.py and
tests/test_pretrain_resize.py."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from runtime.schedules import warmup_cosine
from tests.pretrain_utils import (
    REPO,
    kill_forked_once_saved,
    latest,
    losses,
    pretrain_cmd,
    run_forked,
)

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache):
    """8 uninterrupted steps on 2 ranks with ZeRO-3, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_forked(pretrain_cmd(2, out, "--max-steps", "8", "--checkpoint-every", "2"), cache)
    return out


def test_two_ranks_zero3_loss_decreases_and_outputs_are_complete(reference_run):
    loss = losses(reference_run)
    assert sorted(loss) == list(range(1, 9))
    assert sum(list(loss.values())[-2:]) < sum(list(loss.values())[:2])
    rows = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r][-1]
    for key in ("loss_image_text", "loss_tag", "lr", "temperature", "images_per_s",
                "data_wait", "skipped", "source_mix"):
        assert key in train, key
    assert train["source_mix"] == {"digits": 1.0}
    assert any("zero_shot_top1" in r for r in rows)
    assert latest(reference_run) == "step_0000008"
    ckpt = reference_run / "checkpoints" / "step_0000008"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # the shared state; each rank's RNG and data position in its own file
    assert state["step"] == 8 and state["world_size"] == 2 and state["rank_states"] == 2
    assert "ranks" not in state
    assert sorted(p.name for p in (ckpt / "rank_states").iterdir()) == [
        "00000.json", "00001.json"]
    assert state["samples_seen"]["digits"] == 8 * 16 * 2
    # ZeRO-3 on 2 ranks: each rank wrote its own optimizer partition.
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    # keep_last=2 (demo default): older complete checkpoints were pruned.
    assert sorted(p.name for p in (reference_run / "checkpoints").glob("step_*")) == [
        "step_0000006", "step_0000008"]
    assert (reference_run / "config.yaml").is_file()


def test_kill_then_resume_gives_identical_losses(reference_run, tmp_path, cache):
    out = tmp_path / "killed"
    cmd = pretrain_cmd(2, out, "--max-steps", "8", "--checkpoint-every", "2")
    kill_forked_once_saved(cmd, cache, out, "step_0000004")  # mid-run, no chance to clean up
    assert latest(out) in ("step_0000004", "step_0000006"), latest(out)
    run_forked(cmd + ["--resume", "auto"], cache)
    resumed, reference = losses(out), losses(reference_run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def test_a_checkpoint_holding_every_rank_in_its_trainer_state_resumes_exactly(
        reference_run, tmp_path, cache):
    """A checkpoint written before rank files (every rank's state inside
    trainer_state.json, under ``ranks``): a run in progress upgrades mid-run and resumes
    exactly, its next checkpoint in rank files."""
    out = tmp_path / "old_layout"
    shutil.copytree(reference_run, out)
    ckpt = out / "checkpoints" / "step_0000006"
    path = ckpt / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["rank_states"]
    state["ranks"] = [json.loads((ckpt / "rank_states" / f"{r:05d}.json").read_text())
                      for r in range(2)]
    path.write_text(json.dumps(state))
    shutil.rmtree(ckpt / "rank_states")
    shutil.rmtree(out / "checkpoints" / "step_0000008")
    (out / "checkpoints" / "latest").write_text("step_0000006")
    run_forked(pretrain_cmd(2, out, "--max-steps", "8", "--checkpoint-every", "2",
                            "--resume", "auto"), cache)
    resumed, reference = losses(out), losses(reference_run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert (out / "checkpoints" / "step_0000008" / "rank_states" / "00001.json").is_file()


def test_incompatible_resume_fails_before_compute(reference_run, tmp_path, cache):
    # (another world size is supported: tests/test_pretrain_resize.py)
    ckpt = str(reference_run / "checkpoints")
    other_model = run_forked(pretrain_cmd(1, tmp_path / "b", "--resume", ckpt,
                                          "model.channels=8", "model.groups=[1,1,2,4]"),
                             cache, check=False)
    assert other_model.returncode != 0
    assert "different model" in other_model.stderr
    # DeepSpeed loads a checkpoint only in the ZeRO layout and precision that wrote it
    # (runtime/checkpoint.py engine_layout); refused in one line before any compute
    # (the advice names pre-training's own keys, and no --init: pre-training has none)
    for change, reason in (("engine.zero_stage=0", "saved with ZeRO stage 3, this run has "
                            "stage 0: DeepSpeed resumes a checkpoint only in the ZeRO layout "
                            "that wrote it (stages 1 and 2 share one); resume with "
                            "engine.zero_stage=3 as in the run's config.yaml\n"),
                           ("engine.precision=bf16", "saved by a fp32 engine, this run's is "
                            "bf16: DeepSpeed's optimizer state differs between them; resume "
                            "with engine.precision=fp32 as in the run's config.yaml\n")):
        proc = run_forked(pretrain_cmd(2, tmp_path / "c", "--resume", ckpt, change), cache,
                          check=False)
        assert proc.returncode != 0 and reason in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    # the common mix-up: a pre-training run given to fine-tuning as --resume (its ZeRO stage
    # and then its model hash were refused, advising another stage and the run's config)
    proc = run_forked([sys.executable, "-m", "launch.cli", "finetune", "classification",
                       "--resume", ckpt, "--output-dir", str(tmp_path / "f")], cache,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"is a checkpoint of a pre-training run, this is a classification run: to "
            f"fine-tune from its weights give it as --init (internimage finetune "
            f"classification --init {reference_run / 'checkpoints'}") in proc.stderr, (
        proc.stderr[-2000:])


def test_a_resume_over_a_changed_shard_list_is_refused_in_one_line(reference_run, tmp_path,
                                                                    cache):
    # A regenerated shard list (another length or order) would make the saved positions
    # go on in other permutations: refused before any compute like every resume check,
    # one line, the run's config.yaml kept (it came as a traceback after config.yaml had
    # been replaced)
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    for saved in (out / "checkpoints" / latest(out) / "rank_states").iterdir():
        rank = json.loads(saved.read_text())
        rank["data"]["shard_lists"][0][1] = "0" * 16  # the list's hash as if regenerated
        saved.write_text(json.dumps(rank))
    (out / "config.yaml").write_text("# the run's own config\n")
    # 10 > the reference's 8 steps: a resume of a finished run is told it is complete
    # without any data check (f380c9e)
    proc = run_forked(pretrain_cmd(2, out, "--max-steps", "10", "--checkpoint-every", "2",
                                   "--resume", "auto"), cache, check=False)
    assert proc.returncode != 0
    assert "on_shard_list_change=restart" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (out / "config.yaml").read_text() == "# the run's own config\n"


CRASH_ON_SECOND_SAVE = """
import os, sys
import runtime.checkpoint as ck
calls = []
original = ck.write_trainer_state
def crashing(ckpt_dir, state):
    calls.append(ckpt_dir)
    if len(calls) == 2:  # DeepSpeed's shards of the 2nd checkpoint are written: die now
        os._exit(17)
    original(ckpt_dir, state)
ck.write_trainer_state = crashing
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_mid_save_keeps_latest_on_the_last_complete_checkpoint(tmp_path, cache):
    out = tmp_path / "crash"
    args = pretrain_cmd(1, out, "--max-steps", "6", "--checkpoint-every", "2")[3:]
    proc = run_forked([sys.executable, "-c", CRASH_ON_SECOND_SAVE, *args], cache, check=False)
    assert proc.returncode == 17
    assert latest(out) == "step_0000002"
    # the dead save's shards are in its staging folder, never under the checkpoint's name
    assert not (out / "checkpoints" / "step_0000004").exists()
    [incomplete] = (out / "checkpoints").glob("step_0000004.tmp-*")
    assert not (incomplete / "trainer_state.json").exists()
    run_forked(pretrain_cmd(1, out, "--max-steps", "6", "--checkpoint-every", "2",
                            "--resume", "auto"), cache)
    assert latest(out) == "step_0000006"
    assert not list((out / "checkpoints").glob("*.tmp-*"))  # pruned with the next save
    assert sorted(losses(out)) == list(range(1, 7))


NAN_AT_STEP_3 = """
import sys, torch
import pretrain.objectives as ob
calls = [0]
original = ob.M3ILoss.__call__
def poisoned(self, *args):
    total, terms = original(self, *args)
    calls[0] += 1
    if calls[0] == 3:
        total = total * float("nan")
    return total, terms
ob.M3ILoss.__call__ = poisoned
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_nonfinite_loss_stops_with_step_or_is_skipped(tmp_path, cache):
    out = tmp_path / "nan"
    args = pretrain_cmd(1, out, "--max-steps", "5", "--checkpoint-every", "2")[3:]
    proc = run_forked([sys.executable, "-c", NAN_AT_STEP_3, *args], cache, check=False)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "at step 3" in proc.stderr
    assert latest(out) == "step_0000002"  # nothing saved over the last good checkpoint
    out2 = tmp_path / "skip"
    args = pretrain_cmd(1, out2, "--max-steps", "5", "run.on_nonfinite=skip")[3:]
    run_forked([sys.executable, "-c", NAN_AT_STEP_3, *args], cache)
    rows = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert 3 not in losses(out2) and train_rows[-1]["nonfinite_skipped"] == 1
    assert sorted(losses(out2)) == [1, 2, 4, 5]
    # The lr follows the step counter through the skipped step: after step k it is the
    # schedule's value at k (TINY: lr 3e-3, 2 warm-up steps; demo min_lr 1e-4; 5 steps),
    # and the cosine ends at min_lr on the last step as in an unskipped run.
    schedule = warmup_cosine(2, 5, 1e-4 / 3e-3)
    for row in train_rows:
        assert row["lr"] == pytest.approx(3e-3 * schedule(row["step"]), rel=1e-9), row["step"]
    assert train_rows[-1]["step"] == 5 and train_rows[-1]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("engine.zero_stage=4", "engine.zero_stage"),
    ("model.name=internimage_q", "model.name"),
    ("data.batch_size=0", "data.batch_size"),
    ("run.on_nonfinite=ignore", "run.on_nonfinite"),
    # without gradients through the gather the image-text gradient is wrong (1/world_size
    # of the true one at best, against the tag and image terms' full scale)
    ("objective.gather_with_grad=false", "objective.gather_with_grad: false is not supported"),
    # the logit scale is clamped to [1, max_logit_scale] after every step: it starts inside
    ("objective.init_temperature=0.005", "objective.init_temperature: 1 / init_temperature"),
    ("objective.max_logit_scale=1", "objective.max_logit_scale"),
])
def test_bad_config_fails_before_compute(override, message, capsys):
    from launch.cli import main

    assert main(["pretrain", override]) == 2
    assert message in capsys.readouterr().err


def test_configs_naming_gather_with_grad_true_still_load():
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    assert load_config(PretrainConfig, DEMO_CONFIG, ["objective.gather_with_grad=true"])


def test_h_recipe_dry_run_prints_the_plan(capsys):
    from launch.cli import main

    assert main(["pretrain", "--config", str(REPO / "configs/pretrain/internimage_h_m3i.yaml"),
                 "--dry-run", "--gpus", "128"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["backbone_parameters"] == 1_089_636_760 - 768 * 1000 - 1000  # no classifier
    assert plan["global_batch"] == 4096 and plan["epochs"] == 30
    assert plan["steps"] == 30 * 427_000_000 // 4096
    assert [s["name"] for s in plan["sources"]] == ["laion400m", "yfcc15m", "cc12m"]
    assert plan["activation_checkpointing"] and plan["zero_stage"] == 3
    assert 0 < plan["memory_per_gpu_gib"]["total"] < 80


@pytest.mark.triton
def test_triton_backend_trains_under_zero3_like_the_reference(tmp_path, cache):
    """The fused op inside DeepSpeed ZeRO-3 (Triton's interpreter on CPU): same losses."""
    found = {}
    for backend in ("reference", "triton"):
        out = tmp_path / backend
        # Triton's interpreter runs every program of a launch in Python: one block and one
        # group per stage keep the same kernels with far fewer programs; no zero-shot pass
        run_forked(pretrain_cmd(1, out, "--max-steps", "2", "data.batch_size=4",
                                "model.depths=[1,1,1,1]", "model.groups=[1,1,1,1]",
                                "zero_shot.urls=[]", f"model.dcn_backend={backend}"), cache)
        found[backend] = losses(out)
    for step in (1, 2):
        assert found["triton"][step] == pytest.approx(found["reference"][step], rel=1e-4)


STOP_AT_STEP_3 = """
import sys
import pretrain.objectives as ob
from runtime.preemption import STOP_REQUESTED
calls = [0]
original = ob.M3ILoss.__call__
def counting(self, *args):
    calls[0] += 1
    if calls[0] == 3:
        STOP_REQUESTED.set()  # what a launcher's preemption handler does
    return original(self, *args)
ob.M3ILoss.__call__ = counting
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_stop_request_saves_at_the_step_boundary_and_returns(tmp_path, cache):
    out = tmp_path / "stop"
    args = pretrain_cmd(1, out, "--max-steps", "50", "--checkpoint-every", "20")[3:]
    proc = run_forked([sys.executable, "-c", STOP_AT_STEP_3, *args], cache)
    assert latest(out) == "step_0000003"
    assert '"stopped_early": true' in proc.stdout
    run_forked(pretrain_cmd(1, out, "--max-steps", "5", "--resume", "auto"), cache)
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]


def test_a_zero_shot_evaluation_a_stop_skipped_runs_when_the_run_resumes(tmp_path, cache):
    """A stop at a zero-shot step saves without evaluating (to save within SLURM's grace
    period); the checkpoint records the evaluation owed and the resumed run evaluates
    step 3's weights before training on, so no evaluation step goes missing."""
    out = tmp_path / "owed"
    args = pretrain_cmd(1, out, "--max-steps", "6", "--checkpoint-every", "6",
                        "zero_shot.every=3")[3:]
    run_forked([sys.executable, "-c", STOP_AT_STEP_3, *args], cache)
    step3 = out / "checkpoints" / "step_0000003" / "trainer_state.json"
    assert json.loads(step3.read_text())["eval_owed"] is True
    run_forked(pretrain_cmd(1, out, "--max-steps", "6", "--checkpoint-every", "6",
                            "zero_shot.every=3", "--resume", "auto"), cache)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "zero_shot_top1" in r] == [3, 6]
    step6 = out / "checkpoints" / "step_0000006" / "trainer_state.json"
    assert json.loads(step6.read_text())["eval_owed"] is False


def test_one_pass_sources_train_pass_after_pass_on_ranks_with_uneven_shares(tmp_path, cache):
    """``resampled: false`` sources (one pass over the shards, then the next pass) on 2
    ranks x 2 workers: the demo's 6 shards over 4 slots give the ranks uneven shares, so
    they end their passes at different steps, each going on to its next pass alone. The
    run drew from one iterator and died with a bare StopIteration where the first pass
    ended; then each slot's short last batch of a pass made the ranks' feature gathers
    differ in size (gloo aborted: "Received data size doesn't match expected size").
    Every training batch is full now, the rest of a pass counted as ``pass_remainder``."""
    demo = (REPO / "configs" / "pretrain" / "demo.yaml").read_text()
    assert demo.count("tags_key: json:tags\n") == 1
    config = tmp_path / "one_pass.yaml"
    config.write_text(demo.replace("tags_key: json:tags\n",
                                   "tags_key: json:tags\n      resampled: false\n"))
    out = tmp_path / "run"
    steps = 20  # the demo's 1,500 samples at 2 x 64 per step: a pass is ~11.7 steps
    proc = run_forked(pretrain_cmd(2, out, "--config", str(config), "--max-steps",
                                   str(steps), "--checkpoint-every", str(steps),
                                   "data.batch_size=64", "data.workers=2"), cache)
    assert sorted(losses(out)) == list(range(1, steps + 1))
    logged = proc.stdout + proc.stderr
    assert logged.count("the next pass begins (data epoch 1)") == 2  # each rank's own
    step_dir = out / "checkpoints" / f"step_{steps:07d}"
    state = json.loads((step_dir / "trainer_state.json").read_text())
    assert state["samples_seen"] == {"digits": steps * 2 * 64}  # full batches only
    ranks = [json.loads(p.read_text())["data"] for p in sorted(
        (step_dir / "rank_states").iterdir())]
    assert [r["epoch"] for r in ranks] == [1, 1]
    assert sum(r["stats"]["events"].get("pass_remainder", 0) for r in ranks) > 0


def test_fresh_start_never_overwrites_an_existing_run(reference_run, cache):
    before = latest(reference_run)
    proc = run_forked(pretrain_cmd(1, reference_run, "--max-steps", "2"), cache, check=False)
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr and "--resume auto" in proc.stderr
    assert latest(reference_run) == before


def test_a_refused_start_keeps_the_runs_config_and_says_why_in_one_line(tmp_path, cache):
    """config.yaml is what `convert` reads and what a refusal tells the user to resume
    with: a start refused (a fresh start over the run, a resume with another model) leaves
    it as it was, and says why in one line, as finetune and convert do."""
    out = tmp_path / "run"
    step = out / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "model_hash": "another model", "world_size": 1, "ranks": [{}],
         "samples_seen": {}}))  # pre-training's own keys (no task)
    (out / "checkpoints" / "latest").write_text("step_0000002")
    (out / "config.yaml").write_text("# the run's own config\n")
    for args, why in ((["--max-steps", "2"], "already holds a run"),
                      (["--resume", "auto"], "different model")):
        proc = run_forked(pretrain_cmd(1, out, *args), cache, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]
        assert (out / "config.yaml").read_text() == "# the run's own config\n"
