"""`internimage submit` refuses before sbatch the resumes the job would refuse for its world
size (tasks x nodes), with the job's own one-line message; `submit --wait` shows a job's
one-line refusal first.

- Pre-training resumes on any world size, the M3I image branch too (its EMA teacher's
  slices are re-dealt): such a submission goes through.
- Fine-tuning resumes on the saved world size only.
- A job that refused to start (exit 2, one line on stderr) is reported by `--wait` with
  that line first, before the tracebacks and the log tail.

No SLURM needed: a fake `sbatch` on PATH tells whether anything was submitted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from tests.pretrain_utils import TINY

# The image branch on, at the least image size that can mix two views (tests/test_m3i_*)
IMAGE_BRANCH = ["data.image_size=64", "data.batch_size=8", "objective.image.weight=1.0",
                "objective.image.decoder_width=32", "objective.image.decoder_heads=2",
                "objective.image.decoder_depth=1"]
# a refusal line as a job prints it (runtime.checkpoint.check_compatible's wording)
REFUSAL = "was saved by 2 ranks, this run has 1: resume with 2 ranks"


def _saved_run(run_dir: Path, world_size: int, model_hash: str,
               task: str | None = None, **more) -> Path:
    """``run_dir`` holding a checkpoint saved by ``world_size`` ranks, as far as a start's
    resume checks read it (its trainer state: step, world size, model hash; ``task``: a
    fine-tuning run's, with ``more`` of its keys, else pre-training's)."""
    step = run_dir / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    own = {"task": task, **more} if task else {"samples_seen": {}}  # pre-training: no task
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "world_size": world_size, "model_hash": model_hash, **own}))
    (run_dir / "checkpoints" / "latest").write_text(step.name)
    return step


def _classification_hash(*overrides: str) -> str:
    """The model hash ``finetune classification`` with ``overrides`` gives its checkpoints."""
    from finetune.classification import ClassificationConfig
    from finetune.zero import model_hash
    from launch.config import load_config

    return model_hash(load_config(ClassificationConfig, None, list(overrides)))


def _files(run_dir: Path) -> dict[str, int]:
    """Every file under ``run_dir`` -> its modification time (ns)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns
            for p in run_dir.rglob("*") if p.is_file()}


def _submit(tmp_path: Path, tasks: int, *job: str) -> int:
    return main(["submit", "--tasks-per-node", str(tasks), "--folder",
                 str(tmp_path / "logs"), *job])


@pytest.mark.parametrize("branch", [[], IMAGE_BRANCH], ids=["plain", "image_branch"])
def test_a_resize_the_job_makes_is_submitted(no_sbatch, tmp_path, capsys, branch):
    """Pre-training resumes on another world size (re-dealt), the image branch's EMA
    teacher too (it was refused before its slices were re-dealt): a 2-rank run submitted
    on 1 task is submitted, nothing refused."""
    run_dir = tmp_path / "run"
    job = ["pretrain", "--output-dir", str(run_dir), *TINY, *branch]
    step = _saved_run(run_dir, 2, "any")  # the job checks the hash; submit leaves it
    assert _submit(tmp_path, 1, *job) == 0
    assert f"the job continues it from {step.name}" in capsys.readouterr().err
    assert no_sbatch.exists()


def test_a_finetune_resume_on_another_world_size_is_refused_before_sbatch(
        no_sbatch, tmp_path, capsys):
    """Fine-tuning resumes on the saved number of ranks only: refused with the message of
    the check its start runs (runtime.checkpoint.check_compatible); the saved number is
    submitted."""
    from runtime.checkpoint import ResumeError, check_compatible

    run_dir = tmp_path / "ft"
    job = ["finetune", "classification", "--output-dir", str(run_dir)]
    mhash = _classification_hash()
    step = _saved_run(run_dir, 2, mhash, task="classification")
    before = _files(run_dir)
    with pytest.raises(ResumeError) as expected:
        check_compatible(json.loads((step / "trainer_state.json").read_text()), mhash, 1, step)

    assert _submit(tmp_path, 1, *job) == 2
    err = capsys.readouterr().err
    assert err == f"internimage submit: config error: {expected.value}\n"
    assert "was saved by 2 ranks, this run has 1" in err
    assert not no_sbatch.exists() and _files(run_dir) == before

    assert _submit(tmp_path, 2, *job) == 0
    assert no_sbatch.exists()


@pytest.mark.parametrize("change, refusal", [
    (["data.num_classes=100"], "was saved for a different model"),
    (["run.zero_stage=3"], "was saved with ZeRO stage 0, this run has stage 3"),
    (["run.batch_size=7"], "images per rank and step"),
], ids=["classes", "zero_stage", "batch"])
def test_a_finetune_resume_its_start_would_refuse_is_refused_before_sbatch(
        no_sbatch, tmp_path, capsys, change, refusal):
    """The job's start checks of a fine-tuning resume (finetune.engine.open_run: task,
    engine layout, model hash, images per step), run at submit: before, only the world
    size was, and a changed class count was queued, refused at its start and requeued as
    a failure. The run's own settings are submitted."""
    run_dir = tmp_path / "ft"
    job = ["finetune", "classification", "--output-dir", str(run_dir)]
    _saved_run(run_dir, 1, _classification_hash(), task="classification",
               engine={"zero_stage": 0, "precision": "fp32"},
               batch={"batch_size": 64, "grad_accum": 1})  # the defaults
    before = _files(run_dir)
    assert _submit(tmp_path, 1, *job, *change) == 2
    err = capsys.readouterr().err
    assert err.startswith("internimage submit: config error: ") and refusal in err, err
    assert not no_sbatch.exists() and _files(run_dir) == before
    assert _submit(tmp_path, 1, *job) == 0
    assert no_sbatch.exists()


def test_a_segmentation_resume_with_other_head_sizes_is_refused_before_sbatch(
        no_sbatch, tmp_path, capsys):
    """Segmentation's hash (Mask2Former's head sizes included) is checked at submit too;
    detection's class count comes from its annotation file, which submit does not parse:
    the job's start checks it."""
    from finetune.segmentation import SegmentationConfig, segmentation_model_hash
    from launch.config import load_config

    head = ["head.kind=mask2former", "head.num_queries=8"]
    saved = segmentation_model_hash(load_config(SegmentationConfig, None, head))
    run_dir = tmp_path / "seg"
    _saved_run(run_dir, 1, saved, task="segmentation")
    job = ["finetune", "segmentation", "--output-dir", str(run_dir), "head.kind=mask2former"]
    assert _submit(tmp_path, 1, *job, "head.num_queries=16") == 2
    assert "was saved for a different model" in capsys.readouterr().err
    assert not no_sbatch.exists()
    assert _submit(tmp_path, 1, *job, "head.num_queries=8") == 0


def test_a_checkpoint_whose_state_cannot_be_read_is_left_to_the_job(no_sbatch, tmp_path):
    """No trainer state (or one without a world size): nothing to judge the world size
    by; the job's start names what is wrong, as before."""
    run_dir = tmp_path / "run"
    step = _saved_run(run_dir, 2, "h")
    (step / "trainer_state.json").unlink()
    assert _submit(tmp_path, 1, "pretrain", "--output-dir", str(run_dir), *TINY,
                   *IMAGE_BRANCH) == 0


# ------------------------------------------------------------------ the --wait report
def _failed_job(tmp_path: Path, status: int, stderr: str):
    """A 2-task SLURM job whose tasks both raised TrainingJob's error for ``status``, each
    with ``stderr`` in its log (what submitit's task leaves; SLURM is not asked)."""
    import submitit
    from submitit.core.utils import cloudpickle_dump

    job = submitit.SlurmJob(folder=tmp_path, job_id="4242", tasks=(0, 1))
    for task in (0, 1):
        trace = ("Traceback (most recent call last):\n" + "  File \"x.py\", line 1\n" * 30
                 + f"RuntimeError: `internimage pretrain --output-dir /r` exited with status "
                 f"{status} (job 4242, task {task})\n")
        cloudpickle_dump(("error", trace), job.task(task).paths.result_pickle)
        Path(job.task(task).paths.stderr).write_text(stderr + trace)
    return job


def test_wait_reports_a_refusal_line_first(tmp_path):
    from launch.slurm.wait import failure

    line = f"internimage pretrain: /r/checkpoints/step_0000004: {REFUSAL}"
    log = "2024-01-01 00:00:00 INFO launch.slurm.job: job 4242 task 0/2\n" + line + "\n"
    why = failure(_failed_job(tmp_path, 2, log), "FAILED")
    first, rest = why.split("\n", 1)
    assert first == f"job 4242 ended in state FAILED: {line}"
    assert rest.startswith("job 4242 ended in state FAILED; 2 of 2 task(s) did not succeed:")
    assert "task 0: raised an exception:" in rest  # the details stay


def test_wait_reports_a_crash_as_before(tmp_path):
    """Another exit status is no refusal: no line is singled out (even one that looks
    like a refusal, left in the log by an earlier run)."""
    from launch.slurm.wait import failure

    log = f"internimage pretrain: /r: {REFUSAL}\n"
    why = failure(_failed_job(tmp_path, 1, log), "FAILED")
    assert why.startswith("job 4242 ended in state FAILED; 2 of 2 task(s) did not succeed:")
