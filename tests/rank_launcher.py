"""Start ranks as real processes, fast: the one place the tests fork them.

Each rank is a separate OS process joined through torch.distributed's ``env://``
rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as under torchrun or SLURM. The
processes are forked from a multiprocessing *forkserver* that has imported torch, timm and
the fine-tuning tasks once, instead of N fresh interpreters per launch (~8 s of imports
each on these CPUs, most of a tiny run). The server is a clean process (never the pytest
process itself), so no thread pool or open file is inherited by the ranks.

What a rank runs is one of three kinds of work: ``Cli`` (``internimage ARGV``), ``Code``
(``python -c CODE ARGS``) or ``FileFunction`` (a function of a file, e.g. a test file that
is also a rank script). ``start_ranks`` starts any of them; ``run_cli`` and
``run_file_function`` run one to its end, and tests/pretrain_utils.py's ``run_forked``
runs the commands its ``pretrain_cmd`` builds.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

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

_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Cli:
    """``internimage ARGV`` (``launch.cli.main``); the rank exits with its return code."""

    argv: Sequence[str]

    def run(self) -> None:
        """Run the command in this (rank) process and exit with its code."""
        from launch.cli import main

        sys.exit(main(list(self.argv)))


@dataclass(frozen=True)
class Code:
    """``python -c SOURCE ARGS``: ``SOURCE`` run as ``__main__``, ``sys.argv[1:]`` =
    ``ARGS``; the rank exits 0 unless the code exits or raises."""

    source: str
    args: Sequence[str] = ()

    def run(self) -> None:
        """Execute the code in this (rank) process."""
        sys.argv = ["-c", *self.args]
        exec(compile(self.source, "<string>", "exec"), {"__name__": "__main__"})


@dataclass(frozen=True)
class FileFunction:
    """``function(*args)`` of the Python file ``path``, loaded afresh in the rank (with
    ``runpy``, not pytest's copy of a test module) as ``python PATH ARGS`` would load it,
    under the name ``__forked_rank__`` (its ``__main__`` block does not run)."""

    path: str
    function: str
    args: tuple = ()

    def run(self) -> None:
        """Load the file and call the function in this (rank) process."""
        import runpy

        sys.path.insert(0, os.path.dirname(self.path))  # as `python <path>` puts its folder
        sys.argv = [self.path, *map(str, self.args)]
        module = runpy.run_path(self.path, run_name="__forked_rank__")
        module[self.function](*self.args)


RankWork = Cli | Code | FileFunction


def _rank_entry(work: RankWork, rank: int, world: int, port: int, environ: dict[str, str],
                stdout_dir: str | None, stderr_dir: str | None, torchrun_env: bool) -> None:
    # at the descriptors, as a launched rank's: logging, tracebacks, native libraries
    for fd, folder, kind in ((1, stdout_dir, "out"), (2, stderr_dir, "err")):
        if folder is not None:
            target = os.open(os.path.join(folder, f"rank{rank}.{kind}"),
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
    if stdout_dir is not None and sys.stdout is not None:
        # line by line (stderr already is): what a rank printed survives a SIGKILL of it
        sys.stdout.reconfigure(line_buffering=True)
    # the environment a launched process inherits is its launcher's at launch time: the
    # forkserver's own is the pytest process's when the server started, which may hold a
    # variable a test had set then (e.g. INTERNIMAGE_KILL_AFTER_STEP: every later rank
    # SIGKILLed itself at that step)
    os.environ.clear()
    os.environ.update(environ)
    if torchrun_env:
        os.environ.update(zip(_RANK_VARS, (str(rank), str(rank), str(world), "127.0.0.1",
                                           str(port))))
    # data-loader workers forked from the rank, as in a torchrun rank (python 3.11's Linux
    # default), not from a forkserver of the rank's own: such workers outlive a SIGKILLed
    # rank, since their parent (that server) stays alive
    multiprocessing.set_start_method("fork", force=True)
    import torch

    torch.set_num_threads(1)  # one core per rank, as OMP_NUM_THREADS=1 would give
    work.run()


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a launcher started now passes its ranks: this process's, with CPU
    DeepSpeed and one OpenMP thread, then ``env``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}


def start_ranks(work: RankWork, world: int, environ: dict[str, str], *,
                stdout_dir: str | Path | None = None, stderr_dir: str | Path | None = None,
                torchrun_env: bool = True) -> list[BaseProcess]:
    """Start ``work`` on ``world`` ranks, each forked from the forkserver; the processes
    (named ``rank<r>``), in rank order: the caller waits for (``wait_ranks``) or ends
    (``stop_ranks``) them.

    Each rank's environment is ``environ`` (wholly: nothing of the server's), plus, if
    ``torchrun_env``, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun
    sets them (without: a plain one-process command, which has none). Its standard output
    goes to ``stdout_dir/rank<r>.out`` (line-buffered) and its standard error to
    ``stderr_dir/rank<r>.err``, at the file descriptors; a ``None`` folder leaves that
    stream the server's. The rank forks any process of its own (``fork`` start method)
    and runs torch on one thread."""
    port = free_port()
    dirs = [None if d is None else str(d) for d in (stdout_dir, stderr_dir)]
    procs = [_CTX.Process(target=_rank_entry, name=f"rank{r}",
                          args=(work, r, world, port, dict(environ), *dirs, torchrun_env))
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def stop_ranks(procs: list[BaseProcess]) -> None:
    """SIGKILL the ranks still running (a stopped one too) and reap them all."""
    for p in procs:
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()


def wait_ranks(procs: list[BaseProcess], timeout: float) -> list[str]:
    """Wait up to ``timeout`` seconds for the ranks to exit; the names of those still
    running then, which are SIGKILLed (as any is if the wait itself is interrupted)."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        return [p.name for p in procs if p.is_alive()]
    finally:
        stop_ranks(procs)


def run_cli(argv: list[str], world: int = 2, env: dict[str, str] | None = None,
            timeout: float = 180, stdout_dir: str | None = None,
            stderr_dir: str | None = None) -> list[int]:
    """Run `internimage <argv>` on ``world`` ranks; their exit codes, in rank order
    (-9: killed by SIGKILL). Fails the test after ``timeout`` seconds. ``stdout_dir``: each
    rank's standard output goes to ``rank<r>.out`` there; ``stderr_dir``: its standard
    error to ``rank<r>.err``."""
    procs = start_ranks(Cli(list(argv)), world, launcher_env(env), stdout_dir=stdout_dir,
                        stderr_dir=stderr_dir)
    if wait_ranks(procs, timeout):
        raise AssertionError(f"`internimage {' '.join(argv)}` on {world} ranks still "
                             f"running after {timeout}s")
    return [p.exitcode for p in procs]


def run_file_function(path: str | Path, function: str, world: int, *args,
                      env: dict[str, str] | None = None, timeout: float = 300) -> list[str]:
    """Call ``function(*args)`` of the file ``path`` on ``world`` ranks (``FileFunction``);
    their standard outputs and errors (together, in rank order). Fails the test, with the
    failing ranks' output, if a rank exits nonzero or any is still running after
    ``timeout``."""
    logs = tempfile.mkdtemp(prefix="forked_ranks_")
    try:
        procs = start_ranks(FileFunction(str(path), function, args), world,
                            launcher_env(env), stdout_dir=logs, stderr_dir=logs)
        running = wait_ranks(procs, timeout)
        output = [Path(logs, f"rank{r}.out").read_text(errors="replace")
                  + Path(logs, f"rank{r}.err").read_text(errors="replace")
                  for r in range(world)]
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    failed = [f"rank{r} exited {p.exitcode}:\n{output[r][-3000:]}"
              for r, p in enumerate(procs) if p.exitcode != 0 and p.name not in running]
    assert not running, f"{function} of {path}: {running} still running after {timeout}s"
    assert not failed, "\n".join(failed)
    return output
