"""A fine-tuning resume whose rank file is missing or damaged on one rank only is refused
by every rank together, in one line naming the file, on 2 real gloo ranks.

Each rank reads its own ``rank_states/NNNNN.json`` (random state, stream position). It
used to read it late, after the engine was built: the rank whose file was damaged ended
alone while the other went on into a collective, where it died with a traceback (gloo: the
peer's connection closed; exit codes [1, 2], or [1, 1] for a KeyError) or, under NCCL,
waited until the process group timed out (30 minutes; the launcher's timeout fails the
test instead of such a hang). The run is resumed with steps left to train (a finished
run's resume trains nothing, so no rank would go on).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

import runtime.checkpoint as ck
from runtime.preemption import KILL_AFTER_STEP_ENV
from tests.rank_launcher import run_cli

pytestmark = [pytest.mark.distributed]

TIMEOUT_S = 90  # the refused resume takes seconds; a stranded rank waits 30 minutes
TINY = ["run.batch_size=16", "run.max_steps=4", "run.eval_every=4", "run.checkpoint_every=2",
        "run.log_every=1", "run.num_workers=0", "run.progress=false", "optim.warmup_steps=0",
        "ema.enabled=false"]
DAMAGE = {
    # cut short (a disk that filled, a bad copy): not JSON
    "truncated": (lambda text: text[:40], r"rank_states/00001.json is damaged, not JSON"),
    # parses, but holds no random state (the entry restore_rng needs)
    "no-rng": (lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                        if k != "rng"}),
               r"rank_states/00001.json holds no random state"),
    "missing": (None, r"rank_states/00001.json missing"),
}


def _argv(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["finetune", "classification", "--output-dir", str(out), *TINY,
            f"data.cache_dir={cache}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    """A 2-rank run of 4 steps killed after its checkpoint of step 2 (copied by each
    test): a resume has steps left to train."""
    out = tmp_path_factory.mktemp("trained") / "run"
    codes = run_cli(_argv(out, cache), env={KILL_AFTER_STEP_ENV: "2"}, timeout=TIMEOUT_S * 2)
    assert codes == [-9, -9]  # multiprocessing: -N for a process ended by signal N
    return out


def _contents(out: Path) -> dict[str, str]:
    """Every file of the run directory and its content's hash, but the lock the killed
    job left (runtime/run_lock.py: the resume takes it over, then releases it)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".run.lock"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_one_ranks_damaged_rank_file_refuses_the_resume_on_every_rank(damage, trained, cache,
                                                                       tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    path = ck.rank_state_path(ckpt, 1)
    edit, message = DAMAGE[damage]
    if edit is None:
        path.unlink()
    else:
        path.write_text(edit(path.read_text()))
    before = _contents(out)
    logs = tmp_path / "logs"
    logs.mkdir()

    codes = run_cli(_argv(out, cache, "--resume", "auto"), timeout=TIMEOUT_S,
                    stderr_dir=str(logs))

    errs = [(logs / f"rank{r}.err").read_text() for r in (0, 1)]
    assert codes == [2, 2], errs
    for rank, err in enumerate(errs):
        lines = [x for x in err.splitlines() if x.startswith("internimage finetune:")]
        assert len(lines) == 1, err[-3000:]
        assert re.search(message, lines[0]), lines
        assert str(ckpt) in lines[0]
        assert "Traceback" not in err, (rank, err[-3000:])
    assert "rank 1 of 2 refused the resume" in errs[0]  # rank 0: names the refusing rank
    assert _contents(out) == before  # nothing lost, nothing written
