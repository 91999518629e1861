"""`internimage finetune detection|segmentation --eval-only --resume PATH|auto`: one
evaluation of a dense run's own checkpoint (the released code's ``test.py CONFIG CKPT
--eval ...``), no training.

A short segmentation run on two ranks and a detection run on one (each evaluated and
checkpointed at its last step) are the checkpoints: evaluated again, each must print the
metrics its run logged for that step (the training loop's own evaluation function on the
same weights), on two ranks and on one, leaving the run untouched but for its
``eval-*.json``; an evaluation-only key (the paper's multi-scale + flip segmentation
protocol) is accepted; another task's or another model's checkpoint, and ``--init``, are
refused in one line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pretrain_utils import run_forked
from tests.test_finetune_eval_only import _tree

pytestmark = pytest.mark.slow  # whole DeepSpeed runs

COMMON = ["run.log_every=1", "run.num_workers=0", "run.progress=false",
          "run.tensorboard=false", "optim.warmup_steps=0"]
# steps to train, evaluated and checkpointed at the last: Mask R-CNN finds its first boxes
# after ~20 steps of the demo (bbox_AP 0.02, segm_AP 0.035: a compare of AP 0 proves little)
STEPS = {"segmentation": 2, "detection": 20}
TASK_ARGS = {  # tests/test_finetune_resume.py's tiny demo sets
    "segmentation": ["data.demo_train=16", "data.demo_val=3", "data.demo_size=64",
                     "data.scale_short=64", "data.crop_size=[48,48]", "data.test_short=64",
                     "eval.crop=[48,48]", "eval.stride=[32,32]", "run.batch_size=4",
                     "head_channels=32"],
    "detection": ["data.demo_train=8", "data.demo_val=3", "data.demo_size=64",
                  "run.batch_size=4", "detector.train_sizes=[64]", "detector.test_size=64",
                  "detector.max_size=64"],
}
RANKS = {"segmentation": 2, "detection": 1}


def _cmd(task: str, ranks: int, *args: str) -> list[str]:
    from tests.test_finetune_eval_only import _cmd as cls_cmd

    cmd = cls_cmd(ranks, *args)
    return [task if a == "classification" else a for a in cmd]


def _args(task: str, cache: Path) -> list[str]:
    return [*COMMON, *TASK_ARGS[task], f"data.cache_dir={cache}",
            f"run.max_steps={STEPS[task]}", f"run.eval_every={STEPS[task]}"]


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """task -> (run dir, its last evaluation record)."""
    out = {}
    for task, ranks in RANKS.items():
        run = tmp_path_factory.mktemp(f"eval_{task}") / "run"
        run_forked(_cmd(task, ranks, "--output-dir", str(run), *_args(task, cache)), cache)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "loss" not in r and r["step"] == STEPS[task]]
        assert evals, records
        out[task] = (run, evals[-1])
    return out


def _printed(stdout: str) -> dict:
    (line,) = [x for x in stdout.splitlines() if x.startswith("{")]  # rank 0's
    return json.loads(line)


def _metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("step", "time", "epoch")}


@pytest.mark.parametrize("task", list(RANKS))
def test_resume_prints_the_runs_own_evaluation_on_two_ranks_and_on_one(task, runs, cache,
                                                                        capsys):
    out, logged = runs[task]
    want = _metrics(logged)
    assert want and any(want.values()), logged  # nonzero: the weights decide them
    before = _tree(out)
    proc = run_forked(_cmd(task, 2, "--eval-only", "--resume", "auto", "--output-dir",
                           str(out), *_args(task, cache)), cache)
    printed = _printed(proc.stdout)
    assert {k: printed[k] for k in want} == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert _tree(out) == before  # the run untouched but for its eval record
    (record,) = out.glob("eval-*.json")
    assert json.loads(record.read_text())["step"] == STEPS[task]

    from launch.cli import main  # one rank, in this process, from the step directory

    step_dir = out / "checkpoints" / f"step_{STEPS[task]:07d}"
    assert main(["finetune", task, "--eval-only", "--resume", str(step_dir),
                 *_args(task, cache)]) == 0
    alone = _printed(capsys.readouterr().out)
    assert {k: alone[k] for k in want} == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_an_evaluation_only_key_is_accepted(runs, cache, capsys):
    """The paper's multi-scale + flip protocol on a checkpoint trained without it."""
    from launch.cli import main

    out, logged = runs["segmentation"]
    assert main(["finetune", "segmentation", "--eval-only", "--resume", "auto",
                 "--output-dir", str(out), *_args("segmentation", cache),
                 "head.test_scales=[0.75,1.0]", "head.test_flip=true"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert set(_metrics(logged)) <= set(printed)


@pytest.mark.parametrize("case", ["init", "other_task", "other_model", "no_run",
                                  "other_shape"])
def test_a_checkpoint_it_cannot_evaluate_is_one_line(case, runs, cache, tmp_path, capsys,
                                                     monkeypatch):
    import finetune.dense_eval_only as dense
    from launch.cli import main

    built = []
    monkeypatch.setattr(dense, "_build", lambda *a: built.append(a))
    seg_run, _ = runs["segmentation"]
    step_dir = seg_run / "checkpoints" / "step_0000002"
    task, args = {
        "init": ("detection", ["--init", str(step_dir)]),
        "other_task": ("detection", ["--resume", str(step_dir)]),
        "other_model": ("segmentation", ["--resume", str(step_dir), "head_channels=16"]),
        "no_run": ("segmentation", ["--resume", "auto", "--output-dir", str(tmp_path)]),
        # a width the model hash does not cover (as Mask2Former's num_queries): the model
        # built below has other head widths than the config the hash was taken from
        "other_shape": ("segmentation", ["--resume", str(step_dir)]),
    }[case]
    if case == "other_shape":
        import dataclasses

        monkeypatch.undo()
        real = dense._build
        monkeypatch.setattr(dense, "_build", lambda task, cfg: real(
            task, dataclasses.replace(cfg, head_channels=16)))
    code = main(["finetune", task, "--eval-only", *_args(task, cache), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and (not built or case == "other_shape")
    assert "Traceback" not in err and err.splitlines()[-1].startswith("internimage finetune")
    expected = {"init": "--eval-only of detection evaluates a detection run's own checkpoint",
                "other_task": "is a checkpoint of a segmentation run, not a detection run",
                "other_model": "was saved for another model than this config builds",
                "no_run": "holds no checkpoint",
                "other_shape": "tensors differ in shape"}[case]
    assert expected in err.splitlines()[-1], err


def test_submit_checks_a_dense_eval_only_before_queueing(runs, cache, capsys):
    """`submit` passes the flags through as given, and refuses before queueing what the
    job would refuse after its wait (here another task's checkpoint)."""
    from launch.cli import main

    out, _ = runs["segmentation"]
    args = ["--eval-only", "--resume", "auto", "--output-dir", str(out)]
    assert main(["submit", "--dry-run", "finetune", "segmentation", *args,
                 *_args("segmentation", cache)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "each task runs" in x]
    assert "--eval-only --resume auto" in line
    assert main(["submit", "--dry-run", "finetune", "detection", *args,
                 *_args("detection", cache)]) == 2
    assert "is a checkpoint of a segmentation run" in capsys.readouterr().err
