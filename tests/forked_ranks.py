"""Run a function of a test file on N real ranks, each forked from tests/rank_launcher.py's
forkserver instead of started as a fresh interpreter.

Several test files are also rank scripts (``python tests/test_x.py OUT_DIR``): the fixture
started one interpreter per rank, and each paid torch's, DeepSpeed's and timm's imports
(~7.5 s of CPU per rank on these cores) before any work. Here each rank is still its own
OS process joined through torch.distributed's ``env://`` rendezvous, with the environment
torchrun gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and one
thread, but forked from the server that imported those libraries once per pytest process.
The test file itself is loaded afresh in the rank (``runpy.run_path``, not pytest's copy),
as the script run would load it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.pretrain_utils import free_port
from tests.rank_launcher import _CTX

# a parent's rank variables must not leak into the ranks (tests/pretrain_utils.env)
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rank(path: str, function: str, args: tuple, environ: dict[str, str], logs: str) -> None:
    # the launcher's environment at launch time, not the server's (tests/rank_launcher.py)
    os.environ.clear()
    os.environ.update(environ)
    rank = os.environ["RANK"]
    # at the descriptors, as a launched rank's: logging, tracebacks and native libraries
    for fd, kind in ((1, "out"), (2, "err")):
        target = os.open(os.path.join(logs, f"rank{rank}.{kind}"),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    import multiprocessing

    # any worker process a rank starts is forked from it, as from a launched rank
    multiprocessing.set_start_method("fork", force=True)
    import runpy

    import torch

    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, which torch read at its import
    sys.path.insert(0, os.path.dirname(path))  # as `python <path>` puts the script's folder
    sys.argv = [path, *map(str, args)]
    module = runpy.run_path(path, run_name="__forked_rank__")
    module[function](*args)
    sys.stdout.flush()
    sys.stderr.flush()


def run_ranks(path: str | Path, function: str, world: int, *args,
              env: dict[str, str] | None = None, timeout: float = 300) -> list[str]:
    """Call ``function(*args)`` of the file ``path`` on ``world`` ranks; their standard
    outputs and errors (together, in rank order). Fails the test, with the failing
    ranks' output, if a rank exits nonzero or any is still running after ``timeout``."""
    environ = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    environ |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {}),
                "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
    logs = tempfile.mkdtemp(prefix="forked_ranks_")
    procs = [_CTX.Process(target=_rank, name=f"rank{r}", args=(
        str(path), function, args, environ | {"RANK": str(r), "LOCAL_RANK": str(r)}, logs))
        for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.time() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        running = [p.name for p in procs if p.is_alive()]
        output = [Path(logs, f"rank{r}.out").read_text(errors="replace")
                  + Path(logs, f"rank{r}.err").read_text(errors="replace")
                  for r in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        shutil.rmtree(logs, ignore_errors=True)
    failed = [f"rank{r} exited {p.exitcode}:\n{output[r][-3000:]}"
              for r, p in enumerate(procs) if p.exitcode != 0 and p.name not in running]
    assert not running, f"{function} of {path}: {running} still running after {timeout}s"
    assert not failed, "\n".join(failed)
    return output
