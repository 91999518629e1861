"""Helpers for the pre-training tests: tiny configs and launching real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tests/rank_launcher.py imports this module: no import cycle at run time
    from multiprocessing.process import BaseProcess

    from tests.rank_launcher import RankWork

REPO = Path(__file__).resolve().parents[1]

# The demo config, shrunk so that a step takes milliseconds on one CPU core.
TINY = [
    "text.width=32", "text.heads=2", "text.layers=1", "model.embed_dim=32",
    "data.batch_size=16", "data.workers=0", "data.shuffle_buffer=32",
    "data.shuffle_initial=16", "optim.warmup_steps=2", "optim.lr=3e-3",
    "zero_shot.every=0", "zero_shot.max_batches=1", "run.log_every=1",
    "run.tensorboard=false", "run.progress=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache: Path) -> dict[str, str]:
    """Environment of a child run: shared demo-data cache, CPU DeepSpeed, no inherited ranks."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out |= {"INTERNIMAGE_CACHE": str(cache), "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return out


def pretrain_cmd(ranks: int, out: Path, *args: str) -> list[str]:
    """`internimage pretrain` on ``ranks`` processes (torchrun when more than one)."""
    cli = ["-m", "launch.cli", "pretrain", "--output-dir", str(out), *TINY, *args]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli]


def run(cmd: list[str], cache: Path, timeout: int = 300, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(cache), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (training lines only)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def latest(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def kill_once_saved(cmd: list[str], cache: Path, run_dir: Path, tag: str,
                    timeout: float = 240) -> None:
    """Run ``cmd`` (a training run writing to ``run_dir``) in its own process group and
    SIGKILL the whole group as soon as ``checkpoints/latest`` names ``tag``: a kill
    mid-run, with no chance to clean up (also when it exits or ``timeout`` passes)."""
    proc = subprocess.Popen(cmd, env=env(cache), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while latest(run_dir) != tag and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------------
# The same commands, each rank forked from tests/rank_launcher.py's forkserver (torch, timm
# and the CLI imported once per pytest process) instead of a fresh interpreter (~7 s of
# imports per rank, plus torchrun's own). Each rank sees what a launched one sees: the
# environment of `env` (with RANK, WORLD_SIZE, MASTER_* for more than one rank, as torchrun
# sets them), its argv, one thread, and its stdout/stderr (file descriptors) captured.


def _work(cmd: list[str]) -> tuple[int, RankWork]:
    """(ranks, what each runs: a rank_launcher ``Cli`` or ``Code``) of a command built as
    above (or ``python -c CODE ARGS``)."""
    from tests.rank_launcher import Cli, Code

    if cmd[1:3] == ["-m", "launch.cli"]:
        return 1, Cli(cmd[3:])
    if cmd[1] == "-c":
        return 1, Code(cmd[2], cmd[3:])
    if cmd[1:3] == ["-m", "torch.distributed.run"]:
        start = cmd.index("launch.cli")
        return int(cmd[cmd.index("--nproc-per-node") + 1]), Cli(cmd[start + 1:])
    raise ValueError(f"not a command of pretrain_cmd: {cmd[:4]}")


def start_forked(cmd: list[str], cache: Path, logs: Path) -> list[BaseProcess]:
    """Start the ranks of ``cmd`` (a `pretrain_cmd` or ``python -c CODE ARGS`` command)
    forked, in the environment of `env`; rank r's stdout and stderr go to
    ``logs/rank<r>.out`` / ``.err``. The processes, in rank order: the caller waits for
    or ends them (tests/rank_launcher.py's ``wait_ranks``, ``stop_ranks``)."""
    from tests.rank_launcher import start_ranks

    world, work = _work(cmd)
    # one rank: a plain `python ...` command, which has no rank variables (`env` drops any)
    return start_ranks(work, world, env(cache), stdout_dir=logs, stderr_dir=logs,
                       torchrun_env=world > 1)


def _logs() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="forked_run_"))


def run_forked(cmd: list[str], cache: Path, timeout: int = 300, check: bool = True
               ) -> subprocess.CompletedProcess:
    """`run` of a `pretrain_cmd` (or ``python -c CODE ARGS``) command, its ranks forked:
    the first nonzero exit code of the ranks (as torchrun's), their outputs in rank order."""
    import shutil

    from tests.rank_launcher import wait_ranks

    logs = _logs()
    try:
        procs = start_forked(cmd, cache, logs)
        if wait_ranks(procs, timeout):
            raise subprocess.TimeoutExpired(cmd, timeout)
        codes = [p.exitcode for p in procs]
        out, err = ("".join((logs / f"rank{r}.{kind}").read_text(errors="replace")
                            for r in range(len(procs))) for kind in ("out", "err"))
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    proc = subprocess.CompletedProcess(cmd, next((c for c in codes if c), 0), out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def kill_forked_once_saved(cmd: list[str], cache: Path, run_dir: Path, tag: str,
                           timeout: float = 240) -> None:
    """`kill_once_saved` with the ranks forked: SIGKILL every rank as soon as
    ``checkpoints/latest`` names ``tag`` (also when one exits or ``timeout`` passes)."""
    import shutil

    from tests.rank_launcher import stop_ranks

    logs = _logs()
    procs = start_forked(cmd, cache, logs)
    deadline = time.time() + timeout
    while (latest(run_dir) != tag and time.time() < deadline
           and all(p.exitcode is None for p in procs)):
        time.sleep(0.05)
    stop_ranks(procs)
    shutil.rmtree(logs, ignore_errors=True)
