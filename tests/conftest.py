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
    """Skip `gpu`-marked tests with a clear reason where no CUDA device exists."""
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
