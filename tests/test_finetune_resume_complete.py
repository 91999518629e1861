"""`internimage finetune ... --resume auto` of a run that already finished: nothing is
trained, evaluated or written; the log says the run is complete at step N of N (naming
its checkpoint), and the result printed is the run's last evaluation as metrics.jsonl
records it (it used to print ``{}``), with ``step`` and ``already_complete``."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

# whole DeepSpeed training runs (the suite's long files run first, tests/conftest.py)
pytestmark = pytest.mark.slow

COMMON = ["run.max_steps=2", "run.eval_every=2", "run.log_every=1", "run.num_workers=0",
          "run.progress=false", "optim.warmup_steps=0"]
TASKS = {
    "classification": ["run.batch_size=16", "ema.enabled=false"],
    # detection and segmentation share finetune/loop.py's run_loop
    "segmentation": ["data.demo_train=8", "data.demo_val=2", "data.demo_size=64",
                     "data.scale_short=64", "data.crop_size=[48,48]", "data.test_short=64",
                     "eval.crop=[48,48]", "eval.stride=[32,32]", "run.batch_size=4",
                     "head_channels=32"],
}


def _contents(out: Path) -> dict[str, str]:
    """Every file of the run directory and its content's hash."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _printed(text: str) -> dict:
    """The result the CLI printed: its last line, one JSON object."""
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("task", list(TASKS))
def test_resume_auto_of_a_finished_run_says_so_and_prints_its_last_evaluation(
        task, cache, tmp_path, capsys, caplog):
    from launch.cli import main

    out = tmp_path / "run"
    argv = ["finetune", task, "--output-dir", str(out), *COMMON, *TASKS[task],
            f"data.cache_dir={cache}"]
    assert main(argv) == 0
    trained = _printed(capsys.readouterr().out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["step"] == 2 and "loss" not in r][-1]
    assert trained == {k: v for k, v in logged.items() if k not in ("time", "step", "epoch")}
    before = _contents(out)
    # what a killed earlier job left: a deletion and a resize's conversion cut short
    # (runtime.checkpoint.clear_leftovers: the lock holder's start removes them, also here,
    # where nothing is saved and so no prune runs)
    leftovers = [out / "checkpoints" / "deleting.tmp-host-1-step_0000001",
                 out / "checkpoints" / ".step_0000002_universal.tmp"]
    for folder in leftovers:
        (folder / "part").mkdir(parents=True)
        (folder / "part" / "shard.pt").write_bytes(b"x" * 100)

    caplog.set_level(logging.INFO)
    assert main([*argv, "--resume", "auto"]) == 0
    from runtime.checkpoint import wait_for_deletions

    assert wait_for_deletions(timeout=60)
    assert not any(folder.exists() for folder in leftovers)
    assert _printed(capsys.readouterr().out) == {**trained, "step": 2, "already_complete": True}
    ckpt = out / "checkpoints" / "step_0000002"
    assert any("already complete" in r.getMessage() and f"{ckpt} is at step 2 of 2"
               in r.getMessage() for r in caplog.records), caplog.text[-3000:]
    assert _contents(out) == before  # checkpoints, metrics.jsonl, config.yaml, TensorBoard
