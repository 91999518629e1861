"""A fine-tuning run directory is never lost: a start without ``--resume`` over an
existing run is refused (before, it emptied metrics.jsonl and went on to overwrite the
checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CLS = ["run.batch_size=16", "run.log_every=1", "run.num_workers=0", "run.progress=false",
       "run.threads=1", "optim.warmup_steps=0", "ema.enabled=false", "run.eval_every=100",
       "run.checkpoint_every=2", "run.tensorboard=false"]
CONFIG = "# the run's own config\nrun: {}\n"


def _existing_run(out: Path, model_hash: str = "h") -> Path:
    """A run directory as a fine-tuning run leaves it: config.yaml, 2000 metrics records,
    a complete checkpoint of step 2000 that ``latest`` names."""
    step = out / "checkpoints" / "step_0002000"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 2000, "model_hash": model_hash, "world_size": 1, "ranks": [{}]}))
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
    from runtime.checkpoint import ResumeError

    out = _existing_run(tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(ResumeError) as err:
        open_run(None, out, "h", 1)
    message = str(err.value)
    assert "\n" not in message and str(out) in message
    assert "--resume auto" in message and "--output-dir" in message
    assert _snapshot(out) == before  # before: metrics.jsonl emptied by the metrics logger
    run_ = open_run("auto", out, "h", 1)  # the way out it names
    assert run_.start_step == 2000
