"""A resize's conversion refused on rank 0 (pretrain/resize.py: ds_to_universal failed, or
its folder was taken over by another job) is raised on every rank, with real ranks
(gloo): the other ranks waited for rank 0 in a bare barrier, to end only when the launcher
killed them (torchrun, srun --kill-on-bad-exit) or, under a plain srun, at the collective
timeout; each now raises a one-line refusal naming rank 0's at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.pretrain_utils import free_port

pytestmark = [pytest.mark.distributed]

WORLD = 2
TIMEOUT_S = 40  # the process group's: a rank left in the barrier fails only then


def _resize_on_rank(rank: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    import pretrain.resize as resize

    def failed(cmd, **kw):  # ds_to_universal, on rank 0 only
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: broken\n")

    resize.subprocess.run = failed
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    start = time.monotonic()
    try:
        resize.resize_load(engine, Path(ckpt), Path(ckpt).parent, rank == 0)
        outcome = {"raised": None}
    except Exception as err:  # what the command line would report
        outcome = {"raised": type(err).__name__, "message": str(err)}
    outcome |= {"seconds": time.monotonic() - start,
                "universal": engine._config.load_universal_checkpoint}
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
    if rank == 0:  # rank 0 stays up (as a rank that has not exited yet, or NCCL's peers):
        # the others are not ended by its connection closing
        deadline = time.monotonic() + TIMEOUT_S + 30
        while not Path(out, "rank1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    # Skip interpreter teardown: gloo's destructors occasionally abort when peers exit at
    # the same moment (as in tests/test_checkpoint_ranks.py).
    os._exit(0)


def test_a_conversion_refused_on_rank_0_is_raised_on_every_rank(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")  # per rank
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_resize_on_rank, args=(r, port, str(ckpt), str(out)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=TIMEOUT_S + 120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD))
    own = f"{ckpt}: DeepSpeed's ds_to_universal failed (1): ValueError: broken"
    assert rank0["raised"] == "ResumeError" and rank0["message"] == own
    # rank 1: the same refusal, in one line, at once (not at the collective timeout)
    assert rank1["raised"] == "ResumeError"
    assert rank1["message"] == f"rank 0 of 2 refused the resume: {own}"
    assert rank1["seconds"] < TIMEOUT_S / 2
    assert not rank0["universal"] and not rank1["universal"]
