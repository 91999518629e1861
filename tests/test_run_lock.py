"""One job at a time in a run directory (runtime/run_lock.py): a live holder is refused,
a dead one is taken over at once where that can be told (this machine, this SLURM job)
and after its heartbeat has stopped elsewhere; a holder that lost the lock saves nothing.

The holders here are real processes (a subprocess that takes the lock and keeps it
beating) or lock files written as another machine's holder would write them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runtime import preemption, run_lock
from runtime.checkpoint import save_checkpoint
from runtime.dist import DistInfo
from runtime.run_lock import LOCK_NAME, RunLockError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _release():
    yield
    run_lock.release()
    preemption.STOP_REQUESTED.clear()  # a lost lock requests the training loop's stop


def _holder_process(run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Another process on this machine that takes ``run_dir``'s lock and keeps it."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from runtime import preemption, run_lock
        run_lock.acquire(Path({str(run_dir)!r}), heartbeat_s=0.1)
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _other_machine(run_dir: Path, beat: int = 0, slurm_job: str | None = None,
                   **fields) -> dict:
    """A lock file as a holder on another machine writes it (``fields``: more of its
    fields, e.g. ``slurm_restart``; without: as a version that recorded no count)."""
    holder = {"token": "0123456789abcdef", "host": "node-elsewhere-17", "pid": 4242,
              "pid_namespace": "pid:[4026531836]", "process_start": "123456",
              "slurm_job": slurm_job, "started": "2026-12-01T10:00:00+0000", "beat": beat,
              **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder) + "\n")
    return holder


def test_lock_names_its_holder_and_goes_with_release(tmp_path):
    run_lock.acquire(tmp_path, heartbeat_s=0.05)
    saved = json.loads((tmp_path / LOCK_NAME).read_text())
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()
    time.sleep(0.3)  # the heartbeat rewrites it
    assert json.loads((tmp_path / LOCK_NAME).read_text())["beat"] > 0
    run_lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left either


def test_live_holder_on_this_machine_is_refused_at_once_then_taken_over_once_killed(
        tmp_path, caplog):
    proc = _holder_process(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunLockError, match=f"in use by process {proc.pid} on "):
            run_lock.acquire(tmp_path, stale_s=60)  # no watching: this machine can tell
        assert time.monotonic() - start < 5
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a holder killed without warning leaves its lock: taken over at once, with a warning
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="runtime.run_lock"):
        run_lock.acquire(tmp_path, stale_s=60)
    assert time.monotonic() - start < 5
    assert f"process {proc.pid} is gone" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_reused_pid_is_not_the_holder(tmp_path, caplog):
    """A live process with the holder's PID that started at another time (the PID was
    reused after the holder died) does not hold the run."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        me = run_lock.RunLock(tmp_path).me  # this machine's identity, as a holder's file has
        stale = dict(vars(me), token="fedcba9876543210", pid=other.pid, process_start="1")
        (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
        with caplog.at_level(logging.WARNING, logger="runtime.run_lock"):
            run_lock.acquire(tmp_path, stale_s=60)
        assert f"process {other.pid} is another process now" in caplog.text
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("recorded", [{"slurm_restart": 0}, {}])
def test_requeued_slurm_job_takes_its_own_lock_over(tmp_path, monkeypatch, caplog, recorded):
    """A requeue keeps SLURM_JOB_ID, counts SLURM_RESTART_COUNT up (sbatch(1), OUTPUT
    ENVIRONMENT VARIABLES: set once the job is restarted or requeued) and may start on
    another node: the lock the job's first attempt left is taken over without waiting for
    a heartbeat; so is one of a version that recorded no count ({})."""
    _other_machine(tmp_path, slurm_job="918273", **recorded)
    monkeypatch.setenv("SLURM_JOB_ID", "918273")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="runtime.run_lock"):
        run_lock.acquire(tmp_path, stale_s=60)
    assert time.monotonic() - start < 5
    since = " from restart 0" if recorded else ""
    assert f"this SLURM job (918273), requeued{since} to restart 1" in caplog.text
    mine = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (mine["slurm_job"], mine["slurm_restart"]) == ("918273", 1)


def test_a_live_run_of_the_same_slurm_attempt_is_not_taken_over(tmp_path, monkeypatch):
    """Two runs started by hand into one directory from steps of one allocation (salloc:
    one SLURM_JOB_ID, no restart between them) are two live jobs: the second watches the
    first's heartbeat and is refused (before, it took the run over at once, and both
    saved into it)."""
    holder = _other_machine(tmp_path, slurm_job="918273", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "918273")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)  # the first attempt
    refused = pytest.raises(RunLockError, match="in use by process 4242 on "
                            "node-elsewhere-17, SLURM job 918273")
    with _beating(tmp_path, holder), refused:
        run_lock.acquire(tmp_path, heartbeat_s=0.3, stale_s=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == holder["token"]


@contextlib.contextmanager
def _beating(run_dir: Path, holder: dict):
    """``holder``'s heartbeat, as its thread on another machine writes the lock."""
    stop = threading.Event()

    def beat():
        while not stop.wait(0.05):
            holder["beat"] += 1
            tmp = run_dir / "beat.tmp"
            tmp.write_text(json.dumps(holder))
            os.replace(tmp, run_dir / LOCK_NAME)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_other_machine_with_a_beating_lock_is_refused(tmp_path):
    holder = _other_machine(tmp_path)
    refused = pytest.raises(RunLockError, match="in use by process 4242 on node-elsewhere-17")
    with _beating(tmp_path, holder), refused:
        run_lock.acquire(tmp_path, heartbeat_s=0.3, stale_s=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == holder["token"]


@pytest.mark.parametrize("content", ["holder", "unreadable"])
def test_silent_lock_of_another_machine_is_taken_over_after_stale_s(tmp_path, caplog, content):
    if content == "holder":
        _other_machine(tmp_path, slurm_job="1")  # another SLURM job than this one's (none)
    else:  # a holder killed while it created the file
        (tmp_path / LOCK_NAME).write_text('{"token": "ab')
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="runtime.run_lock"):
        run_lock.acquire(tmp_path, heartbeat_s=0.3, stale_s=1.0)
    assert time.monotonic() - start >= 1.0
    assert "no heartbeat for 1 s" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


class _NoSave:
    """An engine a refused save must never reach."""
    device = "cpu"  # where a rank's collectives put their tensors (DeepSpeedEngine.device)

    def save_checkpoint(self, *args, **kwargs):
        raise AssertionError("saved although the run directory was taken over")


def test_a_holder_that_lost_its_lock_saves_nothing(tmp_path, caplog):
    run_lock.acquire(tmp_path, heartbeat_s=0.05)
    root = tmp_path / "checkpoints"
    root.mkdir()
    with caplog.at_level(logging.ERROR, logger="runtime.run_lock"):
        _other_machine(tmp_path)  # another job decided this one was dead
        deadline = time.monotonic() + 10
        while run_lock.lost_message(tmp_path) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "taken over by process 4242 on node-elsewhere-17" in caplog.text
    assert preemption.STOP_REQUESTED.is_set()  # the loop stops at its next step
    with pytest.raises(RunLockError, match="taken over by process 4242"):
        save_checkpoint(_NoSave(), root, 3, {}, {"step": 3}, DistInfo(), keep_last=2)
    assert list(root.iterdir()) == []
    run_lock.release()  # not its lock any more: the new holder's file stays
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 4242


class _TakenOverWhileWriting:
    """An engine whose writes last until another job has taken the run directory over (a
    stall of this job past the lock's stale bound, during a long save)."""
    device = "cpu"  # where a rank's collectives put their tensors (DeepSpeedEngine.device)

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def zero_optimization(self) -> bool:
        return False

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_text(tag)
        _other_machine(self.run_dir)


def test_a_lock_lost_during_a_save_s_writes_publishes_nothing(tmp_path):
    """The lock is read once more before the publish: the job that took the run over keeps
    its ``latest``, and nothing of it is pruned as a crashed save."""
    run_lock.acquire(tmp_path, heartbeat_s=60)  # no heartbeat in the test's time
    root = tmp_path / "checkpoints"
    theirs = root / "step_0000007.tmp-feedbeef"  # the other job's save in progress
    theirs.mkdir(parents=True)
    (root / "latest").write_text("step_0000006")
    try:
        with pytest.raises(RunLockError, match="taken over by process 4242"):
            save_checkpoint(_TakenOverWhileWriting(tmp_path), root, 3, {}, {"step": 3},
                            DistInfo(), keep_last=2)
    finally:
        run_lock.release()
    assert (root / "latest").read_text() == "step_0000006" and theirs.is_dir()


def test_finetune_start_in_a_run_directory_another_job_holds_is_refused(tmp_path):
    from finetune.engine import open_run
    from runtime.checkpoint import engine_layout

    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(RunLockError, match=f"in use by process {proc.pid}"):
            open_run("auto", tmp_path, "h", 1, engine_layout(0, "fp32"))
    finally:
        proc.kill()
        proc.wait()
    run = open_run("auto", tmp_path, "h", 1, engine_layout(0, "fp32"))  # the holder is gone
    assert run.resume_dir is None


@pytest.mark.distributed
def test_pretrain_resume_while_the_run_still_trains_is_refused_then_continues_it(
        tmp_path, cache):
    """The run a second job would corrupt: a 1-rank run still training (as workers left
    by a killed torchrun go on) and a 2-rank `--resume auto` of it. Every rank of the
    second job refuses in one line and writes nothing; once the first is killed, a resume
    takes its lock over at once and continues from its last checkpoint."""
    from tests.pretrain_utils import latest, losses, pretrain_cmd, run_forked, start_forked
    from tests.rank_launcher import stop_ranks

    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    holder = start_forked(pretrain_cmd(1, out, "--max-steps", "100000",
                                       "--checkpoint-every", "2"), cache, logs)[0]
    try:
        deadline = time.time() + 240
        while latest(out) is None and time.time() < deadline and holder.exitcode is None:
            time.sleep(0.05)
        assert latest(out) is not None, "the first run saved no checkpoint"
        config = (out / "config.yaml").read_text()
        second = run_forked(pretrain_cmd(2, out, "--max-steps", "100000", "--resume", "auto"),
                            cache, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"in use by process {holder.pid}" in second.stderr  # rank 0's refusal
        assert "rank 0 of 2 refused" in second.stderr  # and rank 1's, in one line
        assert (out / "config.yaml").read_text() == config
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
        assert holder.exitcode is None  # the first run trains on, untouched
    finally:
        stop_ranks([holder])
    # killed inside a publish, `latest` may name the staging folder (step_N.tmp-...):
    # the newest complete checkpoint, which the resume takes (runtime/checkpoint.py)
    step = int(latest(out).split("_")[1].split(".")[0])
    resumed = run_forked(pretrain_cmd(1, out, "--max-steps", str(step + 1), "--resume", "auto"),
                         cache)
    assert f"process {holder.pid} is gone" in resumed.stderr
    assert latest(out) == f"step_{step + 1:07d}"
    assert max(losses(out)) == step + 1
    assert not (out / LOCK_NAME).exists()  # released at the end of the run


def test_a_filesystem_without_hard_links_still_locks(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    run_lock.acquire(tmp_path, heartbeat_s=0.05)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    proc = _holder_process(tmp_path / "other")  # a second holder elsewhere is unaffected
    try:
        with pytest.raises(RunLockError, match=f"in use by process {proc.pid}"):
            run_lock.RunLock(tmp_path / "other").acquire()
    finally:
        proc.kill()
        proc.wait()
    run_lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_failed_read_never_ends_the_heartbeat(tmp_path, monkeypatch):
    """ESTALE/EIO on a shared filesystem: a heartbeat thread that died of one stopped
    beating, another job took the run over 120 s later, and this one saved on."""
    real = run_lock.read_holder
    failures = [OSError(116, "Stale file handle")]

    def flaky(path):
        if failures:
            raise failures.pop()
        return real(path)

    monkeypatch.setattr(run_lock, "read_holder", flaky)
    lock = run_lock.acquire(tmp_path, heartbeat_s=0.05)
    deadline = time.monotonic() + 10
    while lock.me.beat < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not failures and lock._thread.is_alive() and lock.me.beat >= 3


def test_every_save_reads_the_lock_again(tmp_path):
    """Not only the heartbeat's view: a taken-over lock is found at the save even where
    no beat came since (a heartbeat far apart, or a thread that is gone)."""
    run_lock.acquire(tmp_path, heartbeat_s=3600)
    assert run_lock.lost_message(tmp_path) is None
    _other_machine(tmp_path)
    assert "taken over by process 4242" in run_lock.lost_message(tmp_path)
    assert preemption.STOP_REQUESTED.is_set()


def test_a_lock_released_while_watched_is_taken_not_refused(tmp_path):
    """`scancel` of the first job, then a second submission on another node while the
    first one still shuts down: the lock it watches goes away; it was refused as alive."""
    _other_machine(tmp_path)
    threading.Timer(0.3, (tmp_path / LOCK_NAME).unlink).start()
    run_lock.acquire(tmp_path, heartbeat_s=3, stale_s=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_another_machine_with_this_hosts_name_is_not_this_machine(tmp_path, caplog):
    """Containers given one --hostname on two machines share the name and the initial PID
    namespace's inode, not the boot id: its holder's PID is not looked up here."""
    me = run_lock.RunLock(tmp_path).me
    gone_pid = subprocess.Popen(["true"])
    gone_pid.wait()
    remote = dict(vars(me), token="fedcba9876543210", pid=gone_pid.pid,
                  boot_id="another-boot", extra_field_of_a_newer_version=1)
    (tmp_path / LOCK_NAME).write_text(json.dumps(remote))
    with caplog.at_level(logging.WARNING, logger="runtime.run_lock"):
        run_lock.acquire(tmp_path, heartbeat_s=0.3, stale_s=1.0)
    assert "no heartbeat for 1 s" in caplog.text and "is gone" not in caplog.text


def test_a_filesystem_error_at_the_start_is_a_one_line_refusal(tmp_path, monkeypatch):
    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_lock.RunLock, "_create", full)
    with pytest.raises(RunLockError, match="cannot take the run directory's lock .*No space"):
        run_lock.acquire(tmp_path)


def test_a_refused_second_job_leaves_the_first_ones_staged_config(tmp_path):
    """The command line stages the config before the start takes the lock; a second job
    staging into the same directory replaced the first one's staged config (the first
    then published the second's as the run's config.yaml), or deleted it on its refusal."""
    from runtime.checkpoint import CONFIG, discard_config, publish_config, stage_config

    stage_config(tmp_path, lambda path: path.write_text("first job's config\n"))
    second = textwrap.dedent(f"""
        from pathlib import Path
        from runtime.checkpoint import discard_config, stage_config
        run = Path({str(tmp_path)!r})
        stage_config(run, lambda path: path.write_text("second job's config\\n"))
        discard_config(run)  # its start was refused: the run directory is in use
    """)
    subprocess.run([sys.executable, "-c", second], cwd=ROOT, check=True)
    publish_config(tmp_path)
    assert (tmp_path / CONFIG).read_text() == "first job's config\n"
    discard_config(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG]


def test_release_never_raises(tmp_path, monkeypatch, caplog):
    """It runs in the `finally` of a run (which may be ending on another error) and at
    exit: a filesystem error there must not replace the run's own outcome."""
    run_lock.acquire(tmp_path, heartbeat_s=3600)

    def stale(path):
        raise OSError(116, "Stale file handle")

    monkeypatch.setattr(run_lock, "read_holder", stale)
    with caplog.at_level(logging.WARNING, logger="runtime.run_lock"):
        run_lock.release()
    assert "lock not removed" in caplog.text
