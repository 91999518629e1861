"""A resize's universal conversion keeps DeepSpeed's fragments off the run's filesystem,
and rank 0's outcome reaches the other ranks before anything is deleted
(pretrain/resize.py).

DeepSpeed 0.19.8's ds_to_universal writes one fragment file per parameter x old rank x
state into ``<output_folder>/tmp`` (deepspeed/checkpoint/ds_to_universal.py: main's
``temp_dir = os.path.join(args.output_folder, 'tmp')``, ``dump_param_fragment``), then
merges and deletes them: for InternImage-H at 512 ranks, >2 million files created, read
and unlinked on the run's Lustre/NFS while every other rank waits. They go to node-local
scratch (``TMPDIR``) instead. And a failed or hung conversion's leftovers were deleted
before rank 0 signalled the others (``mark_done``): unlinking millions of files could
outlast their wait, so they reported rank 0 lost instead of its refusal.

Run as a script (``python tests/test_resize_scratch.py OUT``) this file is one rank of a
2-rank ZeRO-3 bf16 save (pre-training's layout) through ``save_checkpoint``; the fixture
runs it forked from tests/rank_launcher.py's forkserver, then the tests convert it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TAG = "step_0000001"


def _rank_main(out_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch
    from torch import nn

    from runtime.checkpoint import save_checkpoint
    from runtime.dist import init_distributed
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    info = init_distributed()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
        config=deepspeed_config(DeepSpeedSpec(micro_batch=2, zero_stage=3, precision="bf16")),
        dist_init_required=False)
    loss = engine(torch.randn(2, 8, dtype=torch.bfloat16)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    save_checkpoint(engine, Path(out_dir, "checkpoints"), 1, {}, {"step": 1}, info,
                    keep_last=2)


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory) -> Path:
    """A real 2-rank ZeRO-3 bf16 checkpoint: ``<run>/checkpoints/step_0000001``."""
    from tests.rank_launcher import run_file_function

    run = tmp_path_factory.mktemp("zero3_run")
    run_file_function(__file__, "_rank_main", WORLD, str(run), timeout=300)
    return run / "checkpoints" / TAG


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """This test's TMPDIR (``tempfile.gettempdir()``, as a SLURM site's node-local one)."""
    folder = tmp_path / "node_local_tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _run_files(run: Path) -> list[str]:
    """Every file under ``run``, links not followed (what lands on the run's filesystem)."""
    return [os.path.join(d, f) for d, _, files in os.walk(run) for f in files]


@pytest.mark.distributed
def test_a_real_zero3_conversion_writes_its_fragments_to_node_local_scratch(
        zero3_checkpoint, tmp_path, scratch, monkeypatch):
    import pretrain.resize as resize
    from runtime.checkpoint import wait_for_deletions

    # a copy: each test converts into a run of its own
    run = tmp_path / "run"
    shutil.copytree(zero3_checkpoint.parent.parent, run)
    ckpt = run / "checkpoints" / TAG
    seen: dict = {"run_tmp_dirs": set()}
    real_run = resize.run_tool
    done = threading.Event()

    def watch():  # a scan of the run's folder while ds_to_universal runs
        while not done.is_set():
            for d, dirs, _ in os.walk(run):
                seen["run_tmp_dirs"].update(  # a real folder, not the link into TMPDIR
                    os.path.join(d, x) for x in dirs
                    if x == "tmp" and not os.path.islink(os.path.join(d, x)))
            time.sleep(0.01)

    def run_conversion(cmd, **kwargs):
        output = Path(cmd[cmd.index("--output_folder") + 1])
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            proc = real_run(cmd, **kwargs)
        finally:
            done.set()
            watcher.join()
        assert proc.returncode == 0, proc.stderr[-3000:]
        link = output / "tmp"
        seen["link"] = os.readlink(link) if link.is_symlink() else None
        seen["fragments"] = [p for p in Path(scratch).rglob("*") if p.is_file()]
        seen["run_files"] = _run_files(run)
        return proc

    monkeypatch.setattr(resize, "run_tool", run_conversion)
    out = resize.convert_to_universal(ckpt)
    # the fragment folder was a link into TMPDIR, which holds the fragments (ds_to_universal
    # names them <param>/<tp rank>/<state>.<dp rank>: one per parameter x old rank x state)
    assert seen["link"] is not None and Path(seen["link"]).parent == scratch
    names = {p.name for p in seen["fragments"]}
    assert {"fp32.00", "fp32.01", "exp_avg.00", "exp_avg_sq.01"} <= names, names
    assert not seen["run_tmp_dirs"]  # no real tmp/ ever appeared under the run
    assert not [f for f in seen["run_files"] if "/tmp/" in f.removeprefix(str(run))]
    # the universal form: a file per parameter and state, and no link left in it
    assert (out / "zero" / "0.weight" / "fp32.pt").is_file()
    assert (out / "zero" / "1.bias" / "exp_avg_sq.pt").is_file()
    assert not (out / "tmp").exists() and not (out / "tmp").is_symlink()
    # the conversion's scratch folder goes (in the background)
    assert wait_for_deletions(timeout=60)
    assert not Path(seen["link"]).exists()


def _checkpoint(root: Path) -> Path:
    """A checkpoint with per-rank optimizer files (what makes a resize convert)."""
    ckpt = root / TAG
    ckpt.mkdir(parents=True)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def _failing(cmd, **kw):
    """ds_to_universal (a stand-in) that wrote fragments and part of its output, then
    failed."""
    output = Path(cmd[cmd.index("--output_folder") + 1])
    os.makedirs(output / "tmp" / "0.weight" / "0", exist_ok=True)  # as dump_param_fragment
    (output / "tmp" / "0.weight" / "0" / "fp32.00").write_text("fragment")
    (output / "zero" / "0.weight").mkdir(parents=True)
    return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nRuntimeError: broken")


def _hanging(tmp_path: Path) -> str:
    """An executable standing in for python -m ds_to_universal: writes a fragment, then
    hangs (killed at CONVERSION_TIMEOUT_S); $6 is its --output_folder."""
    hang = tmp_path / "python-that-hangs"
    hang.write_text('#!/bin/sh\nmkdir -p "$6/tmp/0.weight/0" && echo x > '
                    '"$6/tmp/0.weight/0/fp32.00" && exec sleep 600\n')
    hang.chmod(0o755)
    return str(hang)


@pytest.mark.parametrize("outcome", ["failed", "timed out"])
def test_rank_0_signals_its_refusal_before_it_deletes_the_leftovers(outcome, tmp_path,
                                                                     scratch, monkeypatch):
    """Every deletion of what a failed or killed conversion left (its partial folder in
    the run, its fragments in TMPDIR) waits here until rank 0 has called mark_done: the
    code that deleted them first, inline, never reached it (rmtree gives up after 5 s)."""
    import pretrain.resize as resize
    import runtime.checkpoint as ck

    root = tmp_path / "run" / "checkpoints"
    ckpt = _checkpoint(root)
    if outcome == "failed":
        monkeypatch.setattr(resize, "run_tool", _failing)
    else:
        monkeypatch.setattr(resize.sys, "executable", _hanging(tmp_path))
        monkeypatch.setattr(resize, "CONVERSION_TIMEOUT_S", 1)
    events: list[str] = []
    marked = threading.Event()
    real_rmtree = shutil.rmtree

    def mark_done(key):
        events.append("mark_done")
        marked.set()

    def rmtree(path, *args, **kwargs):
        events.append("deleted after mark_done" if marked.wait(timeout=5)
                      else "deleted before mark_done")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(resize, "mark_done", mark_done)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(ck, "all_gather_objects", lambda outcome: [outcome, None])
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    with pytest.raises(ck.ResumeError) as err:
        resize.resize_load(engine, ckpt, root, is_main=True)
    assert "failed" in str(err.value) or "did not finish" in str(err.value)
    assert ck.wait_for_deletions(timeout=60)
    assert "deleted before mark_done" not in events, events
    assert "deleted after mark_done" in events  # and the leftovers do go
    assert sorted(p.name for p in root.iterdir()) == [TAG]
    assert list(scratch.glob("internimage-universal-*")) == []  # its fragments' folder


def test_a_full_scratch_is_named_in_the_refusal(tmp_path, scratch, monkeypatch):
    """A conversion that filled TMPDIR (torch.save's ENOSPC reads "unexpected pos ...",
    nothing about space) is refused with what to do about it."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError, wait_for_deletions

    ckpt = _checkpoint(tmp_path / "checkpoints")
    monkeypatch.setattr(resize, "run_tool", _failing)
    real_usage = shutil.disk_usage

    def usage(path):  # the scratch filesystem left full by the conversion
        real = real_usage(path)
        return type(real)(real.total, real.total - 4096, 4096)

    monkeypatch.setattr(resize.shutil, "disk_usage", usage)
    with pytest.raises(ResumeError) as err:
        resize.convert_to_universal(ckpt)
    message = str(err.value)
    assert "\n" not in message and "RuntimeError: broken" in message
    assert f"scratch folder {scratch} (TMPDIR) is full" in message
    assert "set TMPDIR to a node-local folder with room" in message
    assert wait_for_deletions(timeout=60)


@pytest.mark.parametrize("full", ["scratch", "run"])
def test_a_conversion_that_cannot_fit_is_refused_before_it_runs(full, tmp_path, scratch,
                                                                 monkeypatch):
    """The fragments (in TMPDIR) and the universal form (in the run's checkpoints) are
    each about the optimizer files' size: a disk without that room failed the conversion
    only after it had run (hours for H at 512 ranks). Refused at once now, naming where."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError, wait_for_deletions

    ckpt = _checkpoint(tmp_path / "checkpoints")
    os.truncate(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 3 * 2**30)  # sparse
    calls = []
    monkeypatch.setattr(resize, "run_tool", lambda cmd, **kw: calls.append(cmd))
    real_usage = shutil.disk_usage

    def usage(path):
        real = real_usage(path)
        small = (Path(path).is_relative_to(scratch) if full == "scratch"
                 else not Path(path).is_relative_to(scratch))
        return type(real)(real.total, real.used, 2**30 if small else 2**40)

    monkeypatch.setattr(resize.shutil, "disk_usage", usage)
    with pytest.raises(ResumeError) as err:
        resize.convert_to_universal(ckpt)
    message = str(err.value)
    where = (f"its scratch folder's filesystem (TMPDIR) {scratch}" if full == "scratch"
             else f"the run's checkpoints folder {ckpt.parent}")
    assert f"needs about 3.0 GiB in {where}" in message, message
    assert "1.0 GiB free" in message
    assert calls == []  # ds_to_universal never started
    assert wait_for_deletions(timeout=60)
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [TAG]


def test_a_killed_conversions_scratch_is_deleted_by_the_next_one_not_a_live_ones(
        tmp_path, scratch, monkeypatch):
    """A conversion killed with SIGKILL (a cancelled job, the OOM killer) ran no cleanup:
    its fragments (the optimizer state's size) stayed in the node's TMPDIR for good. The
    next conversion on the node deletes them; a live conversion's folder (another job's, on
    a shared /tmp) and a folder that is not a conversion's stay."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError, wait_for_deletions

    code = ("import sys, tempfile, time; from pathlib import Path; "
            "sys.path.insert(0, sys.argv[1]); tempfile.tempdir = sys.argv[2]; "
            "import pretrain.resize as r; "
            "folder, _ = r._scratch_folder(Path('ckpt'), sys.argv[3]); "
            "(folder / 'fp32.00').write_text('fragment'); print(folder, flush=True); "
            "time.sleep(600)")
    procs = {name: subprocess.Popen([sys.executable, "-c", code, str(REPO), str(scratch),
                                     name], stdout=subprocess.PIPE, text=True)
             for name in ("killed", "live")}
    try:
        folders = {name: Path(proc.stdout.readline().strip()) for name, proc in procs.items()}
        foreign = scratch / f"{resize.SCRATCH_PREFIX}made-by-hand"
        foreign.mkdir()
        procs["killed"].kill()
        procs["killed"].wait()
        monkeypatch.setattr(resize, "run_tool", _failing)
        with pytest.raises(ResumeError):
            resize.convert_to_universal(_checkpoint(tmp_path / "checkpoints"))
        assert wait_for_deletions(timeout=60)
        # (only scratch-named folders: torch may put its own caches in TMPDIR meanwhile,
        # e.g. torchinductor_<user> when this test runs alone)
        left = sorted(p.name for p in scratch.iterdir() if p.name.startswith(
            resize.SCRATCH_PREFIX))
        assert left == sorted([folders["live"].name, foreign.name]), left
        assert (folders["live"] / "fp32.00").is_file()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_sweep_between_creating_and_locking_the_owner_file_keeps_the_new_folder(
        scratch, monkeypatch):
    """Two conversions on one node (two jobs, a shared /tmp): one sweeping while the other
    has created its owner file but not yet locked it took the new folder for a dead
    conversion's and deleted it under the live one. The sweep is run in that window here:
    the folder and its owner file must survive, and the owner file be locked after."""
    import fcntl

    import pretrain.resize as resize
    from runtime.checkpoint import wait_for_deletions

    swept: list[list[Path]] = []
    real_flock = fcntl.flock

    def sweep_first(fd, operation):  # another conversion's sweep lands in the window
        if not swept:
            swept.append(resize._sweep_dead_scratch())
        return real_flock(fd, operation)

    monkeypatch.setattr(resize.fcntl, "flock", sweep_first)
    folder, fd = resize._scratch_folder(Path("ckpt"), "window")
    try:
        monkeypatch.setattr(resize.fcntl, "flock", real_flock)
        assert swept == [[]], swept  # nothing taken for dead
        assert wait_for_deletions(timeout=60)
        assert sorted(p.name for p in folder.iterdir()) == [resize.SCRATCH_OWNER]
        assert resize._sweep_dead_scratch() == []  # locked: a live conversion's
        assert folder.is_dir()
    finally:
        os.close(fd)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
