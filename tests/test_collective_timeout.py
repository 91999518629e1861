"""``run.collective_timeout_min``: how long one collective waits for the other ranks.

A rank that hangs rather than dies (a stalled NFS read, a GPU in a bad state, a stopped
process) makes every other rank wait in its next collective until the process group's
timeout. The setting bounds that wait for the world group and for the groups DeepSpeed
creates after it (ZeRO's data-parallel group), rank 0's log names it at the start, and a
value that cannot be a timeout is refused before any compute."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from tests.pretrain_utils import REPO

KEY = "run.collective_timeout_min"


# 1e-9 minutes passes "> 0" but is a zero timedelta (torch's millisecond count)
@pytest.mark.parametrize("value", ["0", "-1", ".nan", ".inf", "1e7", "1e-9"])
@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "classification"],
                                     ["finetune", "detection"], ["finetune", "segmentation"]])
def test_a_timeout_that_cannot_be_one_is_refused_in_one_line(command, value, tmp_path,
                                                             capsys):
    from launch.cli import main

    out = tmp_path / "run"
    assert main([*command, "--output-dir", str(out), f"{KEY}={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "config error: " in lines[0], lines
    assert f"{KEY}: must be > 0 minutes" in lines[0]
    assert not out.exists()


def test_the_timeout_loads_unset_or_as_a_number_of_minutes():
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    assert load_config(PretrainConfig, DEMO_CONFIG, []).run.collective_timeout_min is None
    cfg = load_config(PretrainConfig, DEMO_CONFIG, [f"{KEY}=0.25"])
    assert cfg.run.collective_timeout_min == 0.25


def test_the_timeout_reaches_deepspeed_and_the_later_groups_and_is_fixed_once_set(
        monkeypatch, caplog):
    """``init_distributed(minutes)`` hands DeepSpeed the timedelta and makes it torch's
    default for groups created later; a second call, the group being up, changes nothing."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d

    from runtime.dist import init_distributed
    from tests.test_device_binding import _FakeNode

    node = _FakeNode(monkeypatch, visible=1, local_rank=0, local_world_size=1,
                     cuda_visible_devices="0")
    init_distributed(0.25)
    assert [call["timeout"] for call in node.init_calls] == [timedelta(seconds=15)]
    assert distributed_c10d._get_default_timeout("gloo") == timedelta(seconds=15)
    assert distributed_c10d._get_default_timeout("nccl") == timedelta(seconds=15)
    with caplog.at_level(logging.WARNING, logger="runtime.dist"):
        init_distributed(5.0)
    assert len(node.init_calls) == 1
    assert distributed_c10d._get_default_timeout("nccl") == timedelta(seconds=15)
    # said, not silently ignored: the run's setting has no effect in this process
    assert [r.getMessage() for r in caplog.records] == [
        "run.collective_timeout_min=5 is not applied: this process's group already "
        "exists with a 0.25 min timeout"]


# Two ranks join through runtime.dist.init_distributed with a 3 s timeout; rank 1 stops
# itself (SIGSTOP: alive, its sockets open, never answering) and rank 0 runs one
# collective on the world group and one on the group every ZeRO collective runs on
# (DeepSpeed creates it later with dist.new_group(ranks), deepspeed/utils/groups.py
# _clone_world_group), printing how long each took to fail.
_GROUPS = """
import logging, os, signal, time
import torch
import torch.distributed as dist
from runtime.dist import barrier, init_distributed

logging.basicConfig(level=logging.INFO)  # as the command line sets it
info = init_distributed(0.05)
from deepspeed.utils import groups

zero_group = groups._get_data_parallel_group()
barrier()
if info.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
for name, wait in (("world", barrier),
                   ("zero", lambda: dist.all_reduce(torch.ones(4), group=zero_group))):
    start = time.monotonic()
    try:
        wait()
        print(name, "returned", flush=True)
    except RuntimeError as err:
        print(name, "failed after", round(time.monotonic() - start, 1), "s:", err, flush=True)
os._exit(0)
"""


@pytest.mark.distributed
def test_a_stopped_rank_fails_the_others_collectives_after_the_timeout(tmp_path):
    """Both the world group's barrier and ZeRO's group fail after the configured 3 s, not
    after torch's default for groups created later (gloo: 30 min)."""
    from tests.rank_launcher import Code, start_ranks, stop_ranks

    # both ranks forked from the forkserver (tests/rank_launcher.py): real processes, without
    # two fresh interpreters' imports of torch and DeepSpeed
    environ = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}
    main, peer = start_ranks(Code(_GROUPS), 2, environ, stdout_dir=tmp_path,
                             stderr_dir=tmp_path)
    try:
        # bounded: before the fix the ZeRO group's collective waited for 30 minutes
        main.join(240)
        assert main.exitcode is not None, "rank 0 still waiting after 240 s"
    finally:
        stop_ranks([main, peer])  # SIGKILL ends a stopped process too
    stdout, stderr = ((tmp_path / f"rank0.{kind}").read_text() for kind in ("out", "err"))
    lines = [x for x in stdout.splitlines() if x.startswith(("world ", "zero "))]
    assert [x.split()[:2] for x in lines] == [["world", "failed"], ["zero", "failed"]], \
        stdout + stderr[-3000:]
    for line in lines:
        assert 2.5 <= float(line.split()[3]) < 60, line  # the 3 s timeout, not 30 min
        assert "Timed out waiting 3000ms" in line, line
    assert f"collective timeout: 0.05 min ({KEY})" in stderr


@pytest.mark.distributed
def test_pretraining_with_a_stopped_rank_ends_after_the_timeout(tmp_path, cache):
    """A 2-rank pre-training whose rank 1 is stopped (SIGSTOP) after the first logged step:
    rank 0 exits non-zero about ``run.collective_timeout_min`` (12 s) later instead of
    waiting for DeepSpeed's 10 minutes, and its log named the setting at the start.

    12 s: the test waits the whole timeout out, yet it bounds every collective of the run,
    start-up's (rank 0's own work before a collective) too, on a machine the other test
    worker keeps busy: a 6 s bound left too little margin there."""
    from tests.pretrain_utils import losses, pretrain_cmd, start_forked
    from tests.rank_launcher import stop_ranks

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    procs = start_forked(pretrain_cmd(2, out, "--max-steps", "100000", f"{KEY}=0.2"),
                         cache, logs)
    rank0, rank1 = procs
    try:
        deadline = time.time() + 300
        while time.time() < deadline and rank0.exitcode is None and rank1.exitcode is None:
            if (out / "metrics.jsonl").is_file() and losses(out):
                break
            time.sleep(0.05)
        assert (out / "metrics.jsonl").is_file() and losses(out), \
            "no step logged:\n" + (logs / "rank0.err").read_text(errors="replace")[-3000:]
        os.kill(rank1.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        rank0.join(12 + 108)  # the timeout, and generous room for a loaded machine
        took = time.monotonic() - stopped
        assert rank0.exitcode is not None, f"rank 0 still waiting {took:.0f} s after the stop"
    finally:
        stop_ranks(procs)
    err = (logs / "rank0.err").read_text(errors="replace")
    assert rank0.exitcode != 0, err[-3000:]
    assert f"collective timeout: 0.2 min ({KEY})" in err
    assert "Timed out waiting 12000ms" in err, err[-3000:]
