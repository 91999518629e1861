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
