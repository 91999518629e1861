"""A fine-tuning resume with another ``run.batch_size`` or ``run.grad_accum`` is refused
in one line, before any compute.

A fine-tuning schedule counts optimizer steps of the saved batch: the checkpoint's step,
epoch and position in the epoch are in steps of ``batch_size x grad_accum x ranks``
images. Resumed with another batch the run used to re-plan its total steps from the new
epoch length and go on from the old step number: resumed at step 30 of a 4-epoch run (3
epochs done) with half the batch it re-entered epoch 2, its lr jumped back up, it trained
2.5 more epochs and logged a fifth epoch; with grad_accum doubled it ended at once, its
last epoch never trained. (Pre-training re-plans in samples instead: README, "An epoch
run resumed with another global batch".)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SEG = ["data.demo_train=16", "data.demo_val=3", "data.demo_size=64", "data.scale_short=64",
       "data.crop_size=[48,48]", "data.test_short=64", "eval.crop=[48,48]",
       "eval.stride=[32,32]", "run.num_workers=0", "head_channels=32", "run.max_steps=2",
       "run.checkpoint_every=2", "run.eval_every=0", "run.progress=false",
       "run.tensorboard=false", "run.threads=1", "run.log_every=1"]


@pytest.mark.parametrize("changed", [["run.batch_size=2"], ["run.grad_accum=2"]])
def test_a_changed_batch_is_refused_on_resume(changed, cache, tmp_path, capsys):
    """Another number of images per rank and step: refused, naming the saved values."""
    from launch.cli import main

    out = tmp_path / "run"
    args = ["finetune", "segmentation", "--output-dir", str(out), *SEG,
            f"data.cache_dir={cache}"]
    assert main([*args, "run.batch_size=4"]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main([*args, "run.batch_size=4", *changed, "run.max_steps=4", "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("internimage finetune:")
    assert "run.batch_size=4 run.grad_accum=1 (4 images per rank and step)" in err[-1]
    assert "resume with run.batch_size=4 run.grad_accum=1" in err[-1], err[-1]
    assert (out / "metrics.jsonl").read_text() == before  # nothing trained
    # the same batch resumes
    assert main([*args, "run.batch_size=4", "run.max_steps=4", "--resume", "auto"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in x]
    assert steps == [1, 2, 3, 4]


def test_a_checkpoint_from_before_the_batch_was_recorded_still_resumes(cache, tmp_path):
    from launch.cli import main

    out = tmp_path / "run"
    args = ["finetune", "segmentation", "--output-dir", str(out), *SEG,
            f"data.cache_dir={cache}", "run.batch_size=4"]
    assert main(args) == 0
    state_file = next(Path(out, "checkpoints").glob("step_*/trainer_state.json"))
    state = json.loads(state_file.read_text())
    state.pop("batch")
    state_file.write_text(json.dumps(state))
    assert main([*args, "run.max_steps=3", "--resume", "auto"]) == 0


def test_classification_refuses_a_changed_batch_on_resume(cache, tmp_path, capsys):
    from launch.cli import main

    out = tmp_path / "run"
    args = ["finetune", "classification", "--output-dir", str(out), "run.num_workers=0",
            "run.max_steps=2", "run.checkpoint_every=2", "run.eval_every=0",
            "run.progress=false", "run.tensorboard=false", "ema.enabled=false",
            f"data.cache_dir={cache}", "run.batch_size=8"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "run.batch_size=4", "--resume", "auto"]) == 2
    assert "run.batch_size=8" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_same_images_per_step_split_otherwise_resumes_as_the_uninterrupted_run(
        cache, tmp_path):
    """batch_size=2 grad_accum=2 after 4/1 (the usual way round an out-of-memory): every
    step holds the same samples with the same augmentations, an epoch the same steps."""
    from launch.cli import main

    def run(out: Path, *extra: str) -> None:
        assert main(["finetune", "segmentation", "--output-dir", str(out), *SEG,
                     f"data.cache_dir={cache}", "run.batch_size=4", *extra]) == 0

    run(tmp_path / "whole", "run.max_steps=4")
    run(tmp_path / "split", "run.max_steps=2")
    run(tmp_path / "split", "run.max_steps=4", "run.batch_size=2", "run.grad_accum=2",
        "--resume", "auto")

    def epochs(out: Path) -> list[tuple[int, int]]:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["epoch"]) for r in rows if "loss" in r]

    assert epochs(tmp_path / "split") == epochs(tmp_path / "whole")
