"""Start the ranks of an `internimage` command as real processes, fast.

Each rank is a separate OS process joined through torch.distributed's ``env://``
rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as under torchrun or SLURM. The
processes are forked from a multiprocessing *forkserver* that has imported torch, timm and
the fine-tuning tasks once, instead of N fresh interpreters per launch (~8 s of imports
each on these CPUs, most of a tiny run). The server is a clean process (never the pytest
process itself), so no thread pool or open file is inherited by the ranks.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time

from tests.pretrain_utils import free_port

PRELOAD = ["torch", "torchvision", "timm", "pycocotools.coco", "models", "launch.cli",
           "launch.commands.finetune", "finetune.classification", "finetune.cls_data",
           "finetune.cls_loop", "finetune.detection", "finetune.segmentation",
           "finetune.loop", "runtime.rng", "runtime.metrics", "runtime.preemption",
           "deepspeed", "pretrain.trainer",
           # imported by DeepSpeed's optimizer check at every engine start; its torch.compile
           # decorators pull in torch._dynamo: ~3.5 s a rank when not preloaded
           "deepspeed.runtime.zero.muon.muon_optimizer"]
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)  # takes effect when the server first starts


def _rank_main(rank: int, world: int, port: int, argv: list[str], env: dict[str, str],
               stdout_dir: str | None = None, parent_env: dict[str, str] | None = None,
               stderr_dir: str | None = None) -> None:
    if stderr_dir is not None:  # at the descriptor: logging, tracebacks, native libraries
        err = os.open(os.path.join(stderr_dir, f"rank{rank}.err"),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        os.close(err)
    # the environment a launched process inherits is its launcher's at launch time: the
    # forkserver's own is the pytest process's when the server started, which may hold a
    # variable a test had set then (e.g. INTERNIMAGE_KILL_AFTER_STEP: every later rank
    # SIGKILLed itself at that step)
    if parent_env is not None:
        os.environ.clear()
        os.environ.update(parent_env)
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    # data-loader workers forked from the rank, as in a torchrun rank (python 3.11's Linux
    # default), not from a forkserver of the rank's own: such workers outlive a SIGKILLed
    # rank, since their parent (that server) stays alive
    multiprocessing.set_start_method("fork", force=True)
    import torch

    torch.set_num_threads(1)  # one core per rank, as OMP_NUM_THREADS=1 would give
    from launch.cli import main

    if stdout_dir is None:
        sys.exit(main(argv))
    # what this rank prints (the CLI's result), line by line: a kill leaves what was printed
    with open(os.path.join(stdout_dir, f"rank{rank}.out"), "w", buffering=1) as out, \
            contextlib.redirect_stdout(out):
        code = main(argv)
    sys.exit(code)


def run_ranks(argv: list[str], world: int = 2, env: dict[str, str] | None = None,
              timeout: float = 180, stdout_dir: str | None = None,
              stderr_dir: str | None = None) -> list[int]:
    """Run `internimage <argv>` on ``world`` ranks; their exit codes, in rank order
    (-9: killed by SIGKILL). Fails the test after ``timeout`` seconds. ``stdout_dir``: each
    rank's standard output goes to ``rank<r>.out`` there; ``stderr_dir``: its standard
    error to ``rank<r>.err``."""
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    port = free_port()
    procs = [_CTX.Process(target=_rank_main, name=f"rank{r}",
                          args=(r, world, port, list(argv), env, stdout_dir, dict(os.environ),
                                stderr_dir))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        if any(p.is_alive() for p in procs):
            raise AssertionError(f"`internimage {' '.join(argv)}` on {world} ranks still "
                                 f"running after {timeout}s")
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join()
    return [p.exitcode for p in procs]
