"""A resize's conversion refused on rank 0 (pretrain/resize.py: ds_to_universal failed, or
its folder was taken over by another job) is raised on every rank, with real ranks
(gloo): the other ranks waited for rank 0 in a bare barrier, to end only when the launcher
killed them (torchrun, srun --kill-on-bad-exit) or, under a plain srun, at the collective
timeout; each now raises a one-line refusal naming rank 0's at once. They wait for the
conversion through the store, so one longer than the collective timeout does not fail
them, and a rank 0 killed mid-conversion ends them at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.rank_launcher import FileFunction, launcher_env, start_ranks, wait_ranks

pytestmark = [pytest.mark.distributed]

WORLD = 2
TIMEOUT_S = 40  # the process group's: a rank left in the barrier fails only then


def _resize_on_rank(ckpt: str, out: str, timeout_s: float, converts_s: float,
                    rank0_dies: bool) -> None:
    """One rank (a process forked by tests/rank_launcher.py, torchrun's variables set)."""
    rank = int(os.environ["RANK"])
    from runtime.dist import init_distributed

    # both interpreters up before the rendezvous, which the short timeouts also bound
    Path(out, f"ready{rank}").touch()
    deadline = time.monotonic() + 120
    while not all(Path(out, f"ready{r}").exists() for r in range(WORLD)):
        assert time.monotonic() < deadline, "the other rank never started"
        time.sleep(0.05)
    init_distributed(timeout_s / 60)  # as the trainer: run.collective_timeout_min
    import pretrain.resize as resize

    def failed(cmd, **kw):  # ds_to_universal, on rank 0 only, after ``converts_s``
        time.sleep(converts_s)
        Path(out, "converted_at").write_text(repr(time.time()))
        if rank0_dies:  # killed mid-conversion (OOM killer, a failed node)
            os._exit(9)
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: broken\n")

    resize.run_tool = failed
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    start = time.monotonic()
    try:
        resize.resize_load(engine, Path(ckpt), Path(ckpt).parent, rank == 0)
        outcome = {"raised": None}
    except Exception as err:  # what the command line would report
        outcome = {"raised": type(err).__name__, "message": str(err)}
    outcome |= {"seconds": time.monotonic() - start, "returned_at": time.time(),
                "universal": engine._config.load_universal_checkpoint}
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
    if rank == 0 and not rank0_dies:  # rank 0 stays up (as a rank that has not exited
        # yet, or NCCL's peers): the others are not ended by its connection closing
        deadline = time.monotonic() + timeout_s + 30
        while not Path(out, "rank1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    # Skip interpreter teardown: gloo's destructors occasionally abort when peers exit at
    # the same moment (as in tests/test_checkpoint_ranks.py).
    os._exit(0)


def _run_ranks(tmp_path: Path, **kwargs) -> tuple[Path, list[int | None], list[Path]]:
    """Both ranks through resize_load of a per-rank checkpoint; (checkpoint, exit codes,
    each rank's outcome file)."""
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")  # per rank
    out = tmp_path / "out"
    out.mkdir()
    work = FileFunction(__file__, "_resize_on_rank", (
        str(ckpt), str(out), kwargs.get("timeout_s", TIMEOUT_S), kwargs.get("converts_s", 0.0),
        kwargs.get("rank0_dies", False)))
    procs = start_ranks(work, WORLD, launcher_env(), stderr_dir=out)
    wait_ranks(procs, TIMEOUT_S + 120)
    return ckpt, [p.exitcode for p in procs], [out / f"rank{r}.json" for r in range(WORLD)]


def test_a_conversion_refused_on_rank_0_is_raised_on_every_rank(tmp_path):
    ckpt, codes, files = _run_ranks(tmp_path)
    assert codes == [0] * WORLD
    rank0, rank1 = (json.loads(f.read_text()) for f in files)
    own = f"{ckpt}: DeepSpeed's ds_to_universal failed (1): ValueError: broken"
    assert rank0["raised"] == "ResumeError" and rank0["message"] == own
    # rank 1: the same refusal, in one line, at once (not at the collective timeout)
    assert rank1["raised"] == "ResumeError"
    assert rank1["message"] == f"rank 0 of 2 refused the resume: {own}"
    assert rank1["seconds"] < TIMEOUT_S / 2
    assert not rank0["universal"] and not rank1["universal"]


def test_the_other_ranks_wait_for_a_conversion_longer_than_the_collective_timeout(tmp_path):
    """An InternImage-H conversion may take longer than NCCL's 10-minute collective
    timeout: the other ranks, waiting for it in a collective, failed at the timeout. Here
    it takes 2.5 x the timeout, and rank 1 gets rank 0's outcome."""
    ckpt, codes, files = _run_ranks(tmp_path, timeout_s=4.0, converts_s=10.0)
    assert codes == [0] * WORLD
    rank1 = json.loads(files[1].read_text())
    assert rank1["raised"] == "ResumeError", rank1
    assert rank1["message"].startswith("rank 0 of 2 refused the resume"), rank1
    # it returned only once rank 0's conversion had ended (the same machine's clock)
    assert rank1["returned_at"] >= float((tmp_path / "out" / "converted_at").read_text())


def test_a_rank_0_killed_mid_conversion_ends_the_others_at_once(tmp_path):
    """Rank 0 dies converting (it hosts the rendezvous store): the others stop waiting as
    soon as the store stops answering, in one line, not at a timeout."""
    ckpt, codes, files = _run_ranks(tmp_path, timeout_s=TIMEOUT_S, converts_s=1.0,
                                    rank0_dies=True)
    assert codes == [9, 0]
    rank1 = json.loads(files[1].read_text())
    # a crash, not a refusal: the command line reports refusals in one line, exit 2 ("fix
    # the checkpoint"); a lost rank 0 goes up as a failure
    assert rank1["raised"] == "MainRankLostError", rank1
    from launch.commands.refusals import training_refusals
    from runtime.dist import MainRankLostError
    assert not issubclass(MainRankLostError, training_refusals())
    assert rank1["message"].startswith(f"rank 0 went away during the universal conversion "
                                       f"of {ckpt}"), rank1
    assert rank1["seconds"] < TIMEOUT_S / 2
