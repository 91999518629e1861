"""A fine-tuning run directory is never lost and always resumable: a start without
``--resume`` over an existing run is refused (before, it emptied metrics.jsonl and went on
to overwrite the checkpoints), a refused start leaves the run's own config.yaml, and a
resume needs no ``--init`` source (the checkpoint holds every weight; pre-training may
have pruned the step it came from).

The runs are `internimage finetune` commands forked from tests/rank_launcher.py's forkserver
(``run_forked``: same argv and environment, no fresh interpreter's imports)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain_utils import run_forked

CLS = ["run.batch_size=16", "run.log_every=1", "run.num_workers=0", "run.progress=false",
       "run.threads=1", "optim.warmup_steps=0", "ema.enabled=false", "run.eval_every=100",
       "run.checkpoint_every=2", "run.tensorboard=false"]
CONFIG = "# the run's own config\nrun: {}\n"


def _existing_run(out: Path, model_hash: str = "h") -> Path:
    """A run directory as a fine-tuning run leaves it: config.yaml, 2000 metrics records,
    a complete checkpoint of step 2000 that ``latest`` names."""
    from runtime.rng import rng_state

    step = out / "checkpoints" / "step_0002000"
    step.mkdir(parents=True)
    torch.save({"module": {}}, step / "mp_rank_00_model_states.pt")  # opened at the resume
    # the rank's random state, as a save writes it (a resume checks it when it opens)
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 2000, "model_hash": model_hash, "world_size": 1, "task": "classification",
         "ranks": [{"rng": rng_state()}]}))
    (out / "checkpoints" / "latest").write_text("step_0002000")
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 2001)))
    (out / "config.yaml").write_text(CONFIG)
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_a_fresh_start_over_an_existing_run_is_refused_and_touches_nothing(tmp_path):
    """What every task calls first (finetune/engine.py ``open_run``), then the metrics."""
    from finetune.engine import open_run
    from runtime.checkpoint import ResumeError, engine_layout

    out = _existing_run(tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(ResumeError) as err:
        open_run(None, out, "h", 1, engine_layout(0, "fp32"))
    message = str(err.value)
    assert "\n" not in message and str(out) in message
    assert "--resume auto" in message and "--output-dir" in message
    assert _snapshot(out) == before  # before: metrics.jsonl emptied by the metrics logger
    run_ = open_run("auto", out, "h", 1, engine_layout(0, "fp32"))  # the way out it names
    assert run_.start_step == 2000


@pytest.mark.slow
def test_a_resume_needs_no_init_source(cache, tmp_path):
    """A fine-tune started with --init from a pre-training run whose checkpoint has since
    been pruned: its requeued job (same argv plus --resume auto) resumes."""
    def finetune(out: Path, *args: str) -> list[str]:
        return [sys.executable, "-m", "launch.cli", "finetune", "classification",
                "--output-dir", str(out), *CLS, f"data.cache_dir={cache}", *args]

    source, out = tmp_path / "source", tmp_path / "ft"
    run_forked(finetune(source, "run.max_steps=2"), cache)
    run_forked(finetune(out, "--init", str(source), "run.max_steps=2"), cache)
    for p in sorted(source.rglob("*"), reverse=True):  # pruned: the init source is gone
        p.unlink() if p.is_file() else p.rmdir()
    source.rmdir()
    proc = run_forked(finetune(out, "--init", str(source), "run.max_steps=4",
                               "--resume", "auto"), cache, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]  # before: "init: ... not found"
    assert "not needed" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"
    # a fresh start still needs its init source
    proc = run_forked(finetune(tmp_path / "other", "--init", str(source), "run.max_steps=2"),
                      cache, check=False)
    assert proc.returncode == 2 and "init:" in proc.stderr


def test_a_refused_start_keeps_the_runs_config(tmp_path, capsys):
    """Refused before any compute: a fresh start over the run (in this process: nothing
    distributed is set up before the refusal)."""
    from launch.cli import main

    out = _existing_run(tmp_path / "run")
    before = _snapshot(out)
    assert main(["finetune", "classification", "--output-dir", str(out), *CLS]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already holds a run" in err and "Traceback" not in err
    assert _snapshot(out) == before  # before: config.yaml replaced by the refused config


@pytest.mark.slow
def test_a_resume_refused_for_another_model_keeps_the_runs_config(cache, tmp_path):
    """Refused once the task knows its model: the run's config.yaml is the one the
    message tells the user to resume with, so it must still be there."""
    out = _existing_run(tmp_path / "run", model_hash="another model")
    before = _snapshot(out)
    proc = run_forked([sys.executable, "-m", "launch.cli", "finetune", "classification",
                       "--output-dir", str(out), *CLS, f"data.cache_dir={cache}",
                       "--resume", "auto"], cache, check=False)
    assert proc.returncode == 2 and "different model" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_resume_refused_for_an_unreadable_best_pointer_keeps_the_runs_files(cache, tmp_path):
    """The best checkpoint's pointer is read once the model is built (FinetuneRun.bests):
    a pointer that cannot be read refuses the resume before the run's config.yaml is
    replaced and its metrics are opened (before, the config of the refused start was
    published and the metrics writer left open)."""
    out = tmp_path / "run"

    def finetune(*args: str) -> list[str]:
        return [sys.executable, "-m", "launch.cli", "finetune", "classification",
                "--output-dir", str(out), *CLS, f"data.cache_dir={cache}",
                "run.keep_best=true", "run.eval_every=2", *args]

    run_forked(finetune("run.max_steps=2"), cache)
    pointer = out / "checkpoints" / "best.json"
    assert json.loads(pointer.read_text())["step"] == 2
    pointer.unlink()
    pointer.mkdir()  # a read fails as an EIO would: IsADirectoryError, an OSError
    before = _snapshot(out)
    proc = run_forked(finetune("run.max_steps=4", "--resume", "auto"), cache, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "could not read the best checkpoint's pointer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before  # config.yaml still says max_steps 2
