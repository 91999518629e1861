"""What every fine-tuning loop needs and nothing task-specific: process group, run
directory, checkpoints with ``--resume auto``, and the dry-run plan. Random state, metrics
and the stop flag are shared with pre-training: runtime/rng.py, runtime/metrics.py,
runtime/preemption.py."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """Rank, world size and device of this process (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes files."""
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun/SLURM process group when ``WORLD_SIZE > 1``; else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1:
        return Dist(dist.get_rank(), world, device)
    return Dist(0, 1, device)


def wrap_ddp(model: nn.Module, d: Dist, find_unused: bool = False) -> nn.Module:
    """DDP when there are several ranks; the model itself otherwise."""
    if d.world_size == 1:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``t`` over ranks (identity alone)."""
    if d.world_size > 1:
        dist.all_reduce(t)
    return t


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a crash mid-write never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """``auto``: ``OUT/checkpoints/last.pt`` if it exists; a path: that file; None: none."""
    if not resume:
        return None
    if resume == "auto":
        last = out_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint written by ``save_checkpoint`` (our own file, trusted)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def print_plan(title: str, rows: dict[str, Any]) -> None:
    """The dry-run plan as an aligned table."""
    width = max(len(k) for k in rows)
    print(title)
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")
