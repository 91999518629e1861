"""SIGTERM to a plain start (`internimage pretrain|finetune`, alone or under torchrun) saves
at the next step boundary: what torchrun (forwarding its own SIGTERM to each rank's process
group, SIGKILL 30 s later: torch/distributed/elastic/multiprocessing/api.py ``_close``),
Kubernetes (SIGTERM, then SIGKILL after terminationGracePeriodSeconds, 30 s by default) and
``scancel`` (SIGTERM, SIGKILL after KillWait) give a run before ending it. Ended at once,
the run lost every step since its last periodic checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from runtime import preemption
from tests.pretrain_utils import (
    REPO,
    env,
    latest,
    losses,
    pretrain_cmd,
    run_forked,
    start_forked,
)


@pytest.fixture(autouse=True)
def _no_signal_noted():
    preemption.SIGNALLED.clear()
    yield
    preemption.SIGNALLED.clear()


def _wait_for_step(run_dir, step: int, proc=None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None):
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged within {timeout}s")


def test_sigterm_to_torchrun_saves_every_rank_at_the_step_boundary_and_resume_goes_on(
        cache, tmp_path, monkeypatch):
    """2 ranks under the real torchrun, each with a forked data-loader worker (which gets
    the same SIGTERM from torchrun's killpg and must not end its rank's reading), no
    periodic checkpoint: SIGTERM to torchrun leaves a complete checkpoint at the step the
    ranks agreed on, rank 0 names it, the ranks exit 143 (not 0: torchrun, a Kubernetes
    Job or a retry loop must not take the run for finished), and `--resume auto` goes on
    from the next step."""
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(2, run_dir, "--max-steps", "400", "--checkpoint-every", "1000",
                       "data.workers=1")
    proc = subprocess.Popen(cmd, env=env(cache), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(run_dir, 3, proc)
        proc.send_signal(signal.SIGTERM)  # torchrun itself, as Kubernetes or a user does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    tag = latest(run_dir)
    assert tag is not None, err[-4000:]
    step = int(tag.split("_")[-1])
    assert 3 <= step < 400 and max(losses(run_dir)) == step, err[-4000:]
    ckpt = run_dir / "checkpoints" / tag
    assert len(list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))) == 2, os.listdir(ckpt)
    line = (f"internimage pretrain: stopped by SIGTERM at step {step}, saved; its last "
            f"complete checkpoint is {ckpt}: go on with --resume auto")
    assert err.count(line) == 1, err[-4000:]  # rank 0 only
    assert "DataLoader worker" not in err, err[-4000:]  # the workers read on to the save

    # the resume goes on at the next step (killed there: the rest is the tested resume)
    monkeypatch.setenv(preemption.KILL_AFTER_STEP_ENV, str(step + 1))
    resumed = run_forked([*cmd, "--resume", "auto"], cache, check=False)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, step + 2)), (steps, resumed.stderr[-3000:])


def test_a_signal_reaching_one_rank_ends_every_rank_as_signalled(cache, tmp_path):
    """The reviewer's case: a SIGTERM to one node's ranks only (one evicted pod, one
    preempted node of a multi-node torchrun job): every rank stops and saves (the stop is
    agreed), but the others exited 0 with the finished run's output, and their node's
    torchrun reported success. Every rank now exits 143 and rank 0, not signalled, names
    the checkpoint."""
    from tests.rank_launcher import stop_ranks, wait_ranks

    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    procs = start_forked(pretrain_cmd(2, run_dir, "--max-steps", "400",
                                      "--checkpoint-every", "1000"), cache, logs)
    try:
        _wait_for_step(run_dir, 2)
        os.kill(procs[1].pid, signal.SIGTERM)  # rank 1 alone
        assert wait_ranks(procs, 120) == []
    finally:
        stop_ranks(procs)
    assert [p.exitcode for p in procs] == [143, 143], (logs / "rank0.err").read_text()[-3000:]
    tag = latest(run_dir)
    assert tag is not None and 2 <= int(tag.split("_")[-1]) < 400
    assert (f"stopped by SIGTERM at step {int(tag.split('_')[-1])}, saved"
            in (logs / "rank0.err").read_text())
    assert '"final"' not in (logs / "rank0.out").read_text()  # no finished run's output


def test_sigterm_to_a_finetune_run_saves_at_the_step_boundary_and_exits_143(
        cache, tmp_path, capsys):
    """In this process (the handler is the command's, installed in the main thread): a
    classification fine-tuning run SIGTERMed after its second step saves there, prints
    where to go on from and returns 143; the handler it replaced is back afterwards."""
    from launch.cli import main

    out = tmp_path / "run"
    before = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: before.append(s))
    sender = threading.Thread(target=lambda: (
        _wait_for_step(out, 2), os.kill(os.getpid(), signal.SIGTERM)), daemon=True)
    try:
        sender.start()
        status = main(["finetune", "classification", "--output-dir", str(out),
                       f"data.cache_dir={cache}", "run.max_steps=400", "run.eval_every=0",
                       "run.checkpoint_every=1000", "run.log_every=1"])
        sender.join(timeout=60)
        os.kill(os.getpid(), signal.SIGTERM)  # after the run: the test's own handler again
        deadline = time.time() + 10
        while not before and time.time() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert before == [signal.SIGTERM]
    assert status == 128 + signal.SIGTERM
    tag = latest(out)
    assert tag is not None and 2 <= int(tag.split("_")[-1]) < 400
    err = capsys.readouterr().err
    assert (f"internimage finetune: stopped by SIGTERM at step {int(tag.split('_')[-1])}, "
            f"saved; its last complete checkpoint is {out / 'checkpoints' / tag}") in err


def test_forked_children_ignore_the_signal_and_nothing_is_installed_off_the_main_thread():
    """A forked data-loader worker inherits the handler: the signal its process group
    gets (torchrun's killpg, scancel) is ignored there, and only the rank notes it. In a
    thread (a SLURM job's training thread) nothing is installed: submitit's handlers stay."""
    with preemption.stop_on_signals():
        pid = os.fork()
        if pid == 0:  # the child: a signal to it is ignored; it exits 7 on its own
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            os._exit(7 if not preemption.SIGNALLED else 8)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
        assert preemption.stop_signal() is None  # the child's signal was the child's
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat: only noted
        deadline = time.time() + 10
        while len(preemption.SIGNALLED) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert preemption.stop_signal() == signal.SIGTERM

    seen = []

    def in_thread():
        with preemption.stop_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    current = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [current]
