"""Classification fine-tuning through DeepSpeed ZeRO (CPU, gloo): two ranks under ZeRO-3
(loss falls, top-1 logged, resume from the DeepSpeed checkpoint, the checkpoint works as
``--init``), one rank under ZeRO-2, and the per-group lr scaling the engine relies on.
The first ZeRO-3 run goes through torchrun; the other runs fork their ranks from
tests/rank_launcher.py's forkserver (``run_forked``: the same argv and environment, no
fresh interpreter's imports)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.pretrain_utils import free_port, run, run_forked

# whole DeepSpeed training runs (the suite's long files run first, tests/conftest.py)
pytestmark = pytest.mark.slow

TINY = ["run.batch_size=16", "run.log_every=1", "run.num_workers=0", "run.progress=false",
        "optim.warmup_steps=0", "optim.lr=3e-3", "ema.decay=0.9"]


def _cmd(ranks: int, out: Path, cache: Path, *args: str) -> list[str]:
    cli = ["-m", "launch.cli", "finetune", "classification", "--output-dir", str(out),
           *TINY, f"data.cache_dir={cache}", *args]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero3_two_ranks_train_eval_resume_init(cache, tmp_path):
    out = tmp_path / "z3"
    # threshold 0: every parameter is really partitioned across the two ranks
    zero3 = ["run.zero_stage=3", "run.zero_persistence_threshold=0", "run.eval_every=6"]
    run(_cmd(2, out, cache, *zero3, "run.max_steps=6"), cache)
    recs = _records(out)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]
    evals = [r for r in recs if "top1" in r]
    assert len(evals) == 1 and {"top1", "top5", "top1_ema"} <= set(evals[0])
    assert 0 <= evals[0]["top1"] <= evals[0]["top5"] <= 1
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000006"
    step_dir = ckpts / "step_0000006"
    assert {"trainer_state.json", "ema.pt"} <= {p.name for p in step_dir.iterdir()}
    assert len(list(step_dir.glob("*optim_states.pt"))) == 2  # one shard per rank
    _logged_evaluation_is_the_checkpoints(evals[0], step_dir, cache)

    # resumed without the EMA (not part of what a checkpoint's tensors depend on): the
    # raw weights' statistics are then synchronised by the training step alone. The ranks
    # of this second launch are forked (run_forked: torchrun's argv and environment, no
    # fresh interpreters); the first one above went through torchrun itself.
    proc = run_forked(_cmd(2, out, cache, *zero3, "run.max_steps=8", "ema.enabled=false",
                           "--resume", "auto"), cache)
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # continued after step 6, nothing repeated
    # and from the checkpoint: a restart from step 0 would log the same rows (the file is
    # cut back to the checkpoint's step, and the rerun is deterministic)
    assert "step_0000006 at step 6" in proc.stderr, proc.stderr[-3000:]  # "resumed from"
    assert (ckpts / "latest").read_text().strip() == "step_0000008"
    evals = [r for r in _records(out) if "top1" in r]
    assert [r["step"] for r in evals] == [6, 8] and "top1_ema" not in evals[1]
    _logged_evaluation_is_the_checkpoints(evals[1], ckpts / "step_0000008", cache)
    state = json.loads((ckpts / "step_0000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["world_size"] == 2

    # the checkpoint directory is a valid --init / convert source (consolidated ZeRO-3)
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier
    from finetune.init import load_init
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, [])
    report = load_init(build_classifier(cfg), ckpts, variant=cfg.model.name,
                       arch=cfg.model.arch())
    assert report.loaded > 0 and not report.dropped


def _logged_evaluation_is_the_checkpoints(logged: dict, step_dir: Path, cache: Path) -> None:
    """What a user reads in metrics.jsonl is what the checkpoint of that step scores: the
    consolidated ZeRO-3 weights with rank 0's BatchNorm statistics (DeepSpeed saves rank
    0's buffers only), evaluated alone on the whole validation set. The last training
    forward updates each rank's statistics with its own batch: rank 1 must not evaluate
    with those."""
    import torch

    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier
    from finetune.cls_data import build_datasets, build_loaders
    from finetune.init import load_init
    from finetune.zero import evaluate
    from launch.config import load_config
    from runtime.dist import DistInfo

    cfg = load_config(ClassificationConfig, None, [*TINY, f"data.cache_dir={cache}"])
    model = build_classifier(cfg)
    load_init(model, step_dir, variant=cfg.model.name, arch=cfg.model.arch())
    assert any(b.abs().sum() > 0 for n, b in model.named_buffers() if "running_mean" in n)
    train_set, val_set = build_datasets(cfg)
    _, val, _ = build_loaders(cfg, DistInfo(), train_set, val_set)
    alone = evaluate(model, val, DistInfo(), torch.float32, cfg.data.img_size)
    assert alone["top1"] == logged["top1"] and alone["top5"] == logged["top5"]
    assert alone["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    if "top1_ema" in logged:  # rank 0's EMA, the one saved (ema.pt)
        model.load_state_dict(torch.load(step_dir / "ema.pt", weights_only=True))
        ema = evaluate(model, val, DistInfo(), torch.float32, cfg.data.img_size)
        assert ema["top1"] == logged["top1_ema"]
        assert ema["val_loss"] == pytest.approx(logged["val_loss_ema"], rel=1e-5)


@pytest.fixture(scope="module")
def zero2_run(cache, tmp_path_factory) -> tuple[Path, str]:
    """4 steps of ZeRO-2 (fp32) on one rank, checkpointed at step 4; its stdout."""
    out = tmp_path_factory.mktemp("z2") / "z2"
    proc = run_forked(_cmd(1, out, cache, "run.zero_stage=2", "run.max_steps=4",
                           "run.eval_every=4"), cache)
    return out, proc.stdout


def test_zero2_single_rank(zero2_run, cache, tmp_path):
    out, stdout = zero2_run
    assert "top1" in stdout
    recs = _records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert sum("top1_ema" in r for r in recs) == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert json.loads((out / "deepspeed_config.json").read_text())[
        "zero_optimization"]["stage"] == 2

    # a directory holding only an earlier version's last.pt must refuse --resume auto,
    # not silently start afresh over it
    import torch

    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config
    from models import CheckpointError

    legacy = tmp_path / "legacy" / "checkpoints"
    legacy.mkdir(parents=True)
    torch.save({"model": {}, "step": 3}, legacy / "last.pt")
    cfg = load_config(ClassificationConfig, None, [f"data.cache_dir={cache}"])
    with pytest.raises(CheckpointError, match="last.pt"):
        train(cfg, legacy.parent, resume="auto")


def test_a_resume_in_another_zero_layout_or_precision_is_refused_before_compute(
        zero2_run, cache, tmp_path):
    """DeepSpeed 0.19 resumes a checkpoint only in the ZeRO layout (0, 1/2 or 3) and the
    weight precision that wrote it (measured over every pair of stages 0-3 x fp32/bf16: the
    others fail inside load_checkpoint). Before, a ZeRO-2 checkpoint resumed at stage 3
    died in DeepSpeed (``assert len(self.ckpt_list) > 0``) after the model was built."""
    import shutil

    out = tmp_path / "z2"
    shutil.copytree(zero2_run[0], out)  # the fixture's run stays as it was for the others
    config = (out / "config.yaml").read_text()
    for change, reason in (("run.zero_stage=3", "saved with ZeRO stage 2, this run has stage 3"),
                           ("run.precision=bf16", "saved by a fp32 engine, this run's is bf16")):
        proc = run_forked(_cmd(1, out, cache, "run.zero_stage=2", "run.max_steps=6",
                               change, "--resume", "auto"), cache, check=False)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if "internimage finetune" in line]
        assert len(errors) == 1 and reason in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert (out / "config.yaml").read_text() == config  # the run's own, untouched
    # stages 1 and 2 write the same files: the run goes on at stage 1
    run_forked(_cmd(1, out, cache, "run.zero_stage=1", "run.max_steps=5",
                    "run.eval_every=100", "--resume", "auto"), cache)
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4, 5]


def test_group_lr_is_schedule_times_scale():
    """timm multiplies ``lr_scale`` in: each group's lr is the scheduled lr times its scale
    (layer decay and the DCN multiplier applied exactly once). min_lr 0: with a min_lr the
    released cosine ends every group at that same unscaled min_lr (tests/test_finetune_lr.py)."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier, build_optimizer, build_scheduler
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, ["optim.layer_decay=0.8",
                                                   "optim.warmup_steps=0", "optim.min_lr=0"])
    opt = build_optimizer(build_classifier(cfg), cfg, world_size=1)
    sched = build_scheduler(opt, cfg, 100, world_size=1)
    sched.step_update(10)
    head = next(g["lr"] for g in opt.param_groups if "head.weight" in g["names"])
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(head * g["lr_scale"])
    from tests.released_lr import classification_ratio

    dcn = next(g for g in opt.param_groups if any(".dcn.offset." in n for n in g["names"]))
    name = next(n for n in dcn["names"] if ".dcn.offset." in n)
    depths = build_classifier(cfg).depths
    # the released classification rule (tests/released_lr.py) times DCN_LR_MUL
    assert dcn["lr_scale"] == pytest.approx(0.1 * classification_ratio(name, depths, 0.8))


def test_a_resume_that_turns_ema_on_starts_it_from_the_resumed_weights(cache, tmp_path):
    """A checkpoint saved with ema.enabled=false holds no ema.pt; resumed with the EMA on,
    it started from the weights the model had before the checkpoint was loaded (the
    seeded initialisation), so top1_ema reported those for ~1/(1-decay) steps. The
    released main.py builds its ModelEma after loading the checkpoint: the EMA starts from
    the resumed weights. One update later (decay 0.9) it is 0.9 w4 + 0.1 w5."""
    import torch

    out = tmp_path / "run"
    run_forked(_cmd(1, out, cache, "run.zero_stage=2", "run.max_steps=4", "run.eval_every=4",
                    "ema.enabled=false"), cache)
    proc = run_forked(_cmd(1, out, cache, "run.zero_stage=2", "run.max_steps=5",
                           "run.eval_every=5", "ema.enabled=true", "ema.warmup=false",
                           "--resume", "auto"), cache)
    assert "holds no ema.pt" in proc.stdout + proc.stderr

    def weights(step: int) -> dict:
        state = torch.load(out / "checkpoints" / f"step_{step:07d}" /
                           "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["module"]
        return {k: v.float() for k, v in state.items()}

    w4, w5 = weights(4), weights(5)
    ema = torch.load(out / "checkpoints" / "step_0000005" / "ema.pt", weights_only=True)
    moved = 0
    for name, value in ema.items():
        if not value.is_floating_point() or name not in w4:
            continue
        torch.testing.assert_close(value, 0.9 * w4[name] + 0.1 * w5[name], rtol=1e-5,
                                   atol=1e-6, msg=name)
        moved += int(not torch.equal(w4[name], w5[name]))
    assert moved > 0  # the step changed weights, so the check above tells the two apart
