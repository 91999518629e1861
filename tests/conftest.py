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


def pytest_configure(config):
    """Keep the file order of `_heavy_files_first` under `make test` (``-n 2 --dist
    loadfile``): pytest-xdist (3.x, ``--loadscope-reorder``, on by default) would otherwise
    hand out files by their number of tests, most first, so that a long file of few tests
    (the SLURM files, the Triton backend run) came among the last and one worker ran it
    alone at the end. Set here, in the controller, which loads this file too."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


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


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """The demo-data cache (``INTERNIMAGE_CACHE`` / ``data.cache_dir``) of this test run,
    shared by every test file and both pytest-xdist workers, so each built-in dataset is
    written once per run instead of once per file. Safe to share: every demo writer builds
    in a temporary directory and renames it into place (the losers of a race discard
    theirs), and no test modifies the cache."""
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker has its own basetemp inside the run's common one
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "demo_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _torch_linear_restored():
    """A test that runs ZeRO-3 in this process must not leave DeepSpeed's wrapper of
    ``torch.nn.functional.linear`` to the tests after it: ``zero.Init`` replaces it for
    the rest of the process ("This will persist unless manually reset",
    deepspeed/runtime/zero/partition_parameters.py, 0.19.8), and torch.fx cannot trace
    the wrapper (its ``if input.dim() == 2`` on a proxy: tests/test_timm_contract.py's
    FX tests failed when they ran in the same worker after an in-process ZeRO-3 run). A
    job is one process: nothing of ours resets it outside tests."""
    import torch.nn.functional as F

    original = F.linear
    yield
    F.linear = original


@pytest.fixture(autouse=True)
def _no_run_lock_or_stop_left():
    """Each test is a job of its own, several run in one worker process. A run directory's
    lock that a test left held (``open_run`` or a Trainer built directly, no entry point
    to release it) keeps its heartbeat thread beating; once the passed test's tmp_path is
    removed (pyproject: tmp_path_retention_policy), that thread takes the missing file
    for a takeover and requests a stop, which ended a later test's run at its first step
    (16 CI failures, nowhere near their cause). Released here; and a test that leaves a
    stop request set fails itself, instead of the next run in the worker."""
    yield
    from runtime import preemption, run_lock

    run_lock.release()
    if preemption.STOP_REQUESTED.is_set():
        preemption.STOP_REQUESTED.clear()
        pytest.fail("the test left runtime.preemption.STOP_REQUESTED set: clear it")


@pytest.fixture
def no_sbatch(tmp_path, monkeypatch) -> Path:
    """A fake SLURM on PATH (tests/test_secrets.py): the file its sbatch writes exists
    only if it was called, so a test sees whether submit queued anything."""
    from tests.test_secrets import _fake_slurm

    called = tmp_path / "sbatch_called.txt"
    _fake_slurm(tmp_path / "bin", called)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return called
