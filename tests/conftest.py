"""Shared pytest set-up.

Without a CUDA device, Triton kernels run on CPU tensors under Triton's interpreter; the
variable must be set before triton is first imported, hence here at collection time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")


def pytest_collection_modifyitems(config, items):
    """Run heavy test files first; skip `gpu`-marked tests with a clear reason where no
    CUDA device exists."""
    _heavy_files_first(items)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Marks of the tests that start real processes, a cluster or a server: the long ones.
_HEAVY_MARKS = ("slurm", "distributed", "s3", "slow", "triton")


def _heavy_files_first(items) -> None:
    """`make test` runs whole files on two pytest-xdist workers, which take files in
    collection order; a long file collected last would leave one worker running it alone
    at the end. So: the SLURM file first, then files with other heavy tests, then the rest
    (stable: the order inside each class, and inside each file, is unchanged)."""
    rank: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        heavy = 0 if "slurm" in item.keywords else 1 if any(
            m in item.keywords for m in _HEAVY_MARKS) else 2
        rank[path] = min(rank.get(path, 2), heavy)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])
