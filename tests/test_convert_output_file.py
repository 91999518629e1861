"""What `internimage convert` leaves at its destination: the whole file or, when the
write fails, what was there before (never a truncated export an ``--init`` reads), with
the mode the umask gives (safetensors' writer made 0600 files, which the rest of a team
cannot read on a shared filesystem)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from tests.test_convert_formats import _tiny


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "released.pth"
    torch.manual_seed(0)
    torch.save(_tiny().state_dict(), src)
    return src


@pytest.mark.parametrize("name, fmt", [("out.safetensors", "safetensors"),
                                       ("out.pth", "official")])
def test_the_export_gets_the_umasks_mode(released, tmp_path, name, fmt):
    from finetune.convert import convert

    old = os.umask(0o022)
    try:
        convert(released, tmp_path / name, fmt=fmt)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_a_write_that_fails_leaves_the_previous_export(released, tmp_path, monkeypatch):
    import safetensors.torch

    from finetune.convert import convert
    from models import read_state_dict

    dst = tmp_path / "out.safetensors"
    convert(released, dst)
    before = dst.read_bytes()

    def half_then_fail(tensors, path, metadata=None):  # a full disk, a kill mid-write
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        convert(released, dst, dtype="bf16")
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    assert read_state_dict(str(dst)).keys() == torch.load(released).keys()


_SLOW_WRITE = """
import os, sys, time
import safetensors.torch
from launch.cli import main

def slow(tensors, path, metadata=None):  # an H export takes minutes to write
    with open(path, "wb") as f:
        f.write(b"\\0" * 100)
        f.flush()
    print("writing", flush=True)
    time.sleep(60)

safetensors.torch.save_file = slow
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


def _start_slow_convert(released, dst):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(released), str(dst)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_convert_stopped_by_sigterm_leaves_no_temporary_file(released, tmp_path):
    """scancel and SLURM's time limit send SIGTERM: the half-written temporary file (up
    to 4 GB for H) is removed, not left hidden beside the destination."""
    import signal

    proc = _start_slow_convert(released, tmp_path / "out.safetensors")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_convert_removes_what_a_killed_convert_left(released, tmp_path, caplog):
    """SIGKILL (the OOM killer) runs no cleanup: the next convert to the same destination
    removes the dead process's temporary file, and says so; a live one's is kept."""
    import signal
    import time

    from finetune.convert import ABANDONED_AFTER_S
    from launch.cli import main

    dst = tmp_path / "out.safetensors"
    live = _start_slow_convert(released, dst)
    try:
        proc = _start_slow_convert(released, dst)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        (abandoned,) = [p for p in tmp_path.iterdir() if f"-{proc.pid}-" in p.name]
        # left unchanged for less than ABANDONED_AFTER_S: it could be a live writer's
        # in another PID namespace under this host name (a container), so it stays
        assert main(["convert", str(released), str(dst)]) == 0
        assert abandoned.exists()
        old = time.time() - ABANDONED_AFTER_S - 1
        os.utime(abandoned, (old, old))
        assert main(["convert", str(released), str(dst)]) == 0
        left = sorted(p.name for p in tmp_path.iterdir())
        assert abandoned.name not in left and "out.safetensors" in left
        assert len(left) == 2  # the live convert's file is kept
        assert abandoned.name in caplog.text
    finally:
        live.kill()
        live.wait()
