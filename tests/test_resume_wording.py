"""What a resume says, alike wherever pre-training and fine-tuning do the same thing.

A resume of a finished run says it is complete in one wording (runtime.checkpoint's
``complete_message``): pre-training and fine-tuning each wrote their own, which differed
("past this config's end" / "past this config's schedule end", what was left as it was).
A ``--resume`` of a weights file or of a path without a checkpoint suggests ``--init``
only where the command has it: fine-tuning; ``internimage pretrain`` has no ``--init``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import runtime.checkpoint as ck
from runtime.dist import DistInfo


def _finished_run(out: Path, step: int) -> Path:
    """A run directory whose ``metrics.jsonl`` records one evaluation at ``step``; the
    checkpoint folder it names (nothing in it is read here)."""
    out.mkdir()
    (out / "metrics.jsonl").write_text(
        json.dumps({"step": step - 1, "loss": 1.0, "time": 0.0}) + "\n"
        + json.dumps({"step": step, "acc1": 50.0, "time": 1.0}) + "\n")
    return out / "checkpoints" / ck.tag_for(step)


def _logged(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if "already complete" in r.getMessage()]
    caplog.clear()
    return line


@pytest.mark.parametrize("total", [3, 2])  # at the run's end, and past a shorter config's
def test_pretraining_and_finetuning_say_a_run_is_complete_alike(total, tmp_path, caplog):
    from finetune.engine import FinetuneRun
    from pretrain.trainer import Trainer

    caplog.set_level(logging.INFO)
    pre_dir, fine_dir = tmp_path / "pre", tmp_path / "fine"
    pre_ckpt, fine_ckpt = _finished_run(pre_dir, 3), _finished_run(fine_dir, 3)

    trainer = Trainer.__new__(Trainer)
    trainer.state, trainer.total_steps, trainer.info = {"step": 3}, total, DistInfo()
    trainer.run_dir, trainer.resume_dir = pre_dir, pre_ckpt
    assert trainer._completed() == {"acc1": 50.0, "step": 3, "already_complete": True}
    pre = _logged(caplog)

    run = FinetuneRun(fine_dir, fine_ckpt, {"step": 3})
    assert run.completed(total, DistInfo()) == {"acc1": 50.0, "step": 3,
                                               "already_complete": True}
    fine = _logged(caplog)

    end = "step 3 of 3" if total == 3 else "step 3, past this config's end at step 2"
    assert pre == (f"the run is already complete: its checkpoint {pre_ckpt} is at {end}; "
                   "nothing to train or evaluate, nothing saved: the run's checkpoints and "
                   "config.yaml are left as they were; its last values (metrics.jsonl, step "
                   "3): {'acc1': 50.0}")
    # one wording: only the run, and what its records are called, differ
    assert fine == pre.replace(str(pre_ckpt), str(fine_ckpt)).replace("values", "evaluation")


def test_a_complete_run_owing_an_evaluation_warns_that_it_is_not_made(tmp_path, caplog):
    """A checkpoint a stop saved at an evaluation step owes that evaluation (the loop makes
    it first on resuming); resumed with a config that ends at or before that step, the run
    is complete and makes none: said as a warning, with how to have it made, by both."""
    from finetune.engine import FinetuneRun
    from pretrain.trainer import Trainer

    caplog.set_level(logging.INFO)
    pre_dir, fine_dir = tmp_path / "pre", tmp_path / "fine"
    pre_ckpt, fine_ckpt = _finished_run(pre_dir, 3), _finished_run(fine_dir, 3)
    owing = {"step": 3, "eval_owed": True}
    trainer = Trainer.__new__(Trainer)
    trainer.state, trainer.total_steps, trainer.info = owing, 2, DistInfo()
    trainer.run_dir, trainer.resume_dir = pre_dir, pre_ckpt
    assert trainer._completed()["already_complete"]
    assert FinetuneRun(fine_dir, fine_ckpt, owing).completed(3, DistInfo())["already_complete"]
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "already complete" in r.getMessage()]
    assert len(warned) == 2, [r.getMessage() for r in caplog.records]
    pre, fine = warned
    assert pre.endswith("NOTE: the zero-shot evaluation due at step 3 was skipped by the "
                        "stop that saved this checkpoint and is not made now: a resume of "
                        "a run ending after step 3 makes it first")
    assert "NOTE: the evaluation due at step 3 was skipped" in fine
    # made already, by a resume that a stop then ended before its next save: its marked
    # record is the run's result, no NOTE beside it
    caplog.clear()
    for out in (pre_dir, fine_dir):
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 3, "acc1": 51.0, "owed_evaluation": True,
                                "time": 2.0}) + "\n")
    results = [trainer._completed(), FinetuneRun(fine_dir, fine_ckpt, owing).completed(
        3, DistInfo())]
    for result in results:  # the record's mark is not one of the run's values
        assert result["acc1"] == 51.0 and "owed_evaluation" not in result, result
    said = [r for r in caplog.records if "already complete" in r.getMessage()]
    assert len(said) == 2 and all(r.levelno == logging.INFO for r in said)
    assert not any("NOTE" in r.getMessage() for r in said)


def test_a_run_without_records_at_its_last_step_says_so_alike(tmp_path):
    message = ck.complete_message(tmp_path / "step_0000002", 2, 2, None, "evaluation")
    assert message.endswith("; metrics.jsonl records no evaluation at step 2")
    assert ck.complete_message(tmp_path, 2, 2, {}, "values").endswith(
        "; metrics.jsonl records no values at step 2")


@pytest.mark.parametrize("given", ["weights", "empty dir", "missing"])
def test_a_resume_refusal_suggests_init_only_where_the_command_has_it(given, tmp_path):
    from finetune.engine import resume_checkpoint

    path = {"weights": tmp_path / "backbone.pth", "empty dir": tmp_path / "empty",
            "missing": tmp_path / "nothing.pth"}[given]
    if given == "weights":
        path.write_bytes(b"x")
    elif given == "empty dir":
        path.mkdir()
    # pre-training's resolution (pretrain.trainer.Trainer and `submit pretrain`)
    with pytest.raises(ck.ResumeError) as pre:
        ck.resolve_resume(str(path), tmp_path / "run" / "checkpoints")
    assert str(pre.value).startswith(f"--resume {path}")
    assert "--init" not in str(pre.value) and "step_* directory" in str(pre.value)
    # fine-tuning's (training, `submit finetune`), and --eval-only's
    with pytest.raises(ck.ResumeError) as fine:
        resume_checkpoint(str(path), tmp_path / "run")
    assert "fine-tuning starts from" in str(fine.value) and "--init" in str(fine.value)
    with pytest.raises(ck.ResumeError) as fine:
        ck.resolve_resume(str(path), tmp_path / "run" / "checkpoints", init=True)
    assert "--init" in str(fine.value)


def test_eval_only_resume_of_weights_suggests_init(tmp_path):
    from types import SimpleNamespace

    from finetune.eval_only import resumed_step_dir

    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"x")
    cfg = SimpleNamespace(run=SimpleNamespace(output_dir=str(tmp_path / "run")))
    with pytest.raises(ck.ResumeError, match="fine-tuning starts from weights with --init"):
        resumed_step_dir(cfg, str(weights))


def test_pretrain_cli_resume_of_a_weights_file_names_no_init(tmp_path, cache):
    """`internimage pretrain --resume x.pth`: one refusal line, exit 2, naming what
    --resume takes; it suggested --init, which pretrain does not have."""
    from tests.pretrain_utils import pretrain_cmd, run_forked

    weights = tmp_path / "x.pth"
    weights.write_bytes(b"x")
    proc = run_forked(pretrain_cmd(1, tmp_path / "run", "--resume", str(weights)), cache,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("internimage pretrain:")]
    assert f"--resume {weights}: a weights file holds no optimizer" in line
    assert "--init" not in line
