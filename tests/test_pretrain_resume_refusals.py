"""A resume refused by what one rank reads of its own state is refused on every rank, in
one line, and a damaged state file is named, not a JSON traceback.

Each rank reads its own ``rank_states/NNNNN.json`` (runtime/checkpoint.py) after the
resume checks the ranks agree on: a missing or damaged file of rank 1 ended rank 1 alone,
while rank 0 went on to build the engine (killed by torchrun; under a bare ``srun``
without --kill-on-bad-exit it would wait in a collective until the process group's
timeout). The README promises a refused resume is "refused on every rank"."""

from __future__ import annotations

import pytest

import runtime.checkpoint as ck
from tests.pretrain_utils import pretrain_cmd, run_forked
from tests.test_checkpoint_rank_files import _resume, _saved_checkpoint


def test_a_rank_file_without_a_data_position_is_a_resume_error(tmp_path, monkeypatch):
    """A rank file that parses but lacks what a save writes: a ResumeError (which the
    ranks agree on), not a KeyError on that rank alone."""
    from pretrain.trainer import Trainer

    ckpt, _ = _saved_checkpoint(tmp_path, 2)
    ck.rank_state_path(ckpt, 1).write_text("{}")
    seen = []
    monkeypatch.setattr("pretrain.trainer.agree_on_refusal", seen.append)
    trainer = Trainer.__new__(Trainer)
    trainer.resume_dir, trainer.info = ckpt, type("I", (), {"rank": 1})()
    trainer._restore_rank_state = lambda: _resume(tmp_path, ckpt, 1, 2)
    trainer._agreed_rank_state()
    assert isinstance(seen[0], ck.ResumeError) and "rank 1's saved state" in str(seen[0])


@pytest.mark.parametrize("name", ["trainer_state", "rank_state"])
def test_a_damaged_state_file_is_named(name, tmp_path):
    ckpt, _ = _saved_checkpoint(tmp_path, 2)
    path = ckpt / ck.TRAINER_STATE if name == "trainer_state" else ck.rank_state_path(ckpt, 1)
    path.write_text(path.read_text()[:40])  # cut short (a disk that filled, a bad copy)
    with pytest.raises(ck.ResumeError, match=str(path.relative_to(ckpt)) + ".*not JSON"):
        _resume(tmp_path, ckpt, 1, 2)


@pytest.mark.parametrize("name", ["trainer_state", "rank_state"])
def test_a_state_file_that_cannot_be_read_is_a_resume_error(name, tmp_path, monkeypatch):
    """EIO/ESTALE on one rank's read: a ResumeError the ranks agree on (agree_on_refusal
    takes those), not a bare OSError raised by that rank alone while the others wait."""
    import errno
    from pathlib import Path

    ckpt, _ = _saved_checkpoint(tmp_path, 2)
    path = ckpt / ck.TRAINER_STATE if name == "trainer_state" else ck.rank_state_path(ckpt, 1)
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path:
            raise OSError(errno.ESTALE, "Stale file handle", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(ck.ResumeError,
                       match=str(path.relative_to(ckpt)) + " cannot be read.*Stale file"):
        _resume(tmp_path, ckpt, 1, 2)


@pytest.mark.slow
def test_a_rank_file_missing_refuses_the_resume_on_every_rank(tmp_path, cache):
    out = tmp_path / "run"
    run_forked(pretrain_cmd(2, out, "--max-steps", "2", "--checkpoint-every", "2"), cache)
    ckpt = out / "checkpoints" / "step_0000002"
    ck.rank_state_path(ckpt, 1).unlink()
    proc = run_forked(pretrain_cmd(2, out, "--max-steps", "3", "--resume", "auto"), cache,
                      check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith("internimage pretrain:")]
    assert len(lines) == 2, proc.stderr[-3000:]  # one line on each rank
    assert all("rank_states/00001.json missing" in x for x in lines), lines
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_truncated_zero_shard_of_one_rank_refuses_the_resume_on_every_rank(tmp_path, cache):
    """Rank 1's own ZeRO-3 shard truncated (a full disk, an interrupted copy): met only in
    engine.load_checkpoint, after deepspeed.initialize, rank 1 refused alone while rank 0
    went on into the engine's collectives (ended by torchrun, or by the process group's
    timeout under a plain launcher). Now each rank opens its own DeepSpeed files before
    the engine (runtime.checkpoint.check_engine_files), and both refuse in one line."""
    out = tmp_path / "run"
    run_forked(pretrain_cmd(2, out, "--max-steps", "2", "--checkpoint-every", "2"), cache)
    ckpt = out / "checkpoints" / "step_0000002"
    [shard] = ckpt.glob("*zero_pp_rank_1_*optim_states.pt")
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = run_forked(pretrain_cmd(2, out, "--max-steps", "3", "--resume", "auto"), cache,
                      check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.startswith("internimage pretrain:")]
    assert len(lines) == 2, proc.stderr[-3000:]  # one line on each rank
    assert all(f"{shard.name} cannot be read" in x for x in lines), lines
    assert "Traceback" not in proc.stderr


def test_raising_max_steps_on_resume_says_the_extra_steps_train_at_min_lr(tmp_path, cache):
    """README: a step-based run's schedule keeps its end on resume. The steps past it
    train at optim.min_lr; that used to happen without a word while config.yaml recorded
    the new run.max_steps (which a fresh run would schedule to the end)."""
    import json

    out = tmp_path / "run"
    run_forked(pretrain_cmd(1, out, "--max-steps", "3", "--checkpoint-every", "3"), cache)
    proc = run_forked(pretrain_cmd(1, out, "--max-steps", "5", "--resume", "auto"), cache)
    assert "run.max_steps=5, the checkpoint's schedule ends at step 3: steps 4-5 train at " \
           "optim.min_lr" in proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[4] == lrs[5] == pytest.approx(1e-4)  # the demo's optim.min_lr


def test_extending_a_run_that_ended_inside_its_warm_up_says_what_its_lr_does(tmp_path,
                                                                             cache):
    """A smoke test (its run ends inside the warm-up) extended on resume: its schedule
    keeps its end, so the lr warms up to optim.lr until the warm-up's end, then drops to
    optim.min_lr at once; the warning said the extra steps all train at min_lr."""
    import json

    out = tmp_path / "run"
    warmup = "optim.warmup_steps=4"
    run_forked(pretrain_cmd(1, out, "--max-steps", "3", "--checkpoint-every", "3", warmup),
               cache)
    proc = run_forked(pretrain_cmd(1, out, "--max-steps", "6", "--resume", "auto", warmup),
                      cache)
    assert ("run.max_steps=6, the checkpoint's schedule ends at step 3, inside its 4-step "
            "warm-up: steps 4-5 train at optim.lr; step 6 trains at optim.min_lr=0.0001"
            ) in proc.stderr, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # the lr logged at a step is the scheduler's after it: what the next step trains at
    assert lrs[2] < lrs[3] == lrs[4] == pytest.approx(3e-3)  # steps 4-5 at TINY's optim.lr
    assert lrs[5] == pytest.approx(1e-4)  # step 6 at the demo's optim.min_lr


@pytest.mark.parametrize("end, warmup, min_ratio, steps", [
    (3, 4, 0.05, 6), (5, 10, 0.05, 8), (10, 10, 0.05, 15), (3, 4, 1.0, 8), (100, 10, 0.05, 120)])
def test_the_extension_warning_says_what_the_restored_schedule_trains_at(end, warmup,
                                                                        min_ratio, steps):
    """Each step range the warning names trains at what it says: a real WarmupCosine,
    stepped as DeepSpeed steps it (after each optimizer step), past its end (the
    reviewer's cases: an end inside the warm-up, an end at it, min_lr = lr)."""
    import re

    import torch

    from pretrain.engine import extension_warning
    from runtime.schedules import WarmupCosine

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosine(opt, warmup, end, min_ratio)
    trained = {}
    for k in range(1, steps + 1):  # step k trains at the lr set after step k - 1
        trained[k] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    message = extension_warning(sched, steps, min_lr=min_ratio)
    spans = re.findall(r"steps? (\d+)(?:-(\d+))? (trains? at optim.lr|trains? at optim.min_lr|"
                       r"still warms? up)", message)
    assert spans and int(spans[0][0]) == end + 1 and int(spans[-1][1] or spans[-1][0]) == steps
    for first, last, what in spans:
        for k in range(int(first), int(last or first) + 1):
            if "min_lr" in what:
                assert trained[k] == pytest.approx(min_ratio), (k, message)
            elif "optim.lr" in what:
                assert trained[k] == pytest.approx(1.0), (k, message)
            else:
                assert trained[k] < 1.0, (k, message)
    assert ("inside its" in message) == (end < warmup)


def test_a_refused_fresh_start_leaves_no_run_directory(tmp_path, cache):
    """As fine-tuning's (README): a start refused before any compute (here a --resume
    path that does not exist) removes the folders it created, empty; an existing folder
    stays as it was."""
    out = tmp_path / "runs" / "new"
    proc = run_forked(pretrain_cmd(1, out, "--max-steps", "2", "--resume",
                                   str(tmp_path / "nothere")), cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "internimage pretrain:" in proc.stderr
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    proc = run_forked(pretrain_cmd(1, kept, "--max-steps", "2", "--resume",
                                   str(tmp_path / "nothere")), cache, check=False)
    assert proc.returncode == 2 and kept.is_dir() and list(kept.iterdir()) == []


@pytest.mark.parametrize("saved", [None, "step_0000004"])
def test_ctrl_c_ends_a_run_in_one_line_naming_its_last_checkpoint(saved, tmp_path,
                                                                 monkeypatch, capsys):
    """Ctrl-C (a KeyboardInterrupt out of the run) printed some 60 lines of traceback per
    rank and nothing about where to go on from; now rank 0 prints one line naming the
    last complete checkpoint, and the command exits 130 (a shell's status for SIGINT).
    (The interrupt is raised by a stand-in of the run here: a real SIGINT to a 1-rank
    run after its first save, 9 times at different moments, ended it the same way.)"""
    import pretrain.trainer
    from launch.cli import main

    out = tmp_path / "run"

    def interrupted(cfg, resume=None):
        if saved:
            (out / "checkpoints" / saved).mkdir(parents=True)
            (out / "checkpoints" / "latest").write_text(saved)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain.trainer, "pretrain", interrupted)
    assert main(["pretrain", "--output-dir", str(out), "--max-steps", "8"]) == 130
    err = capsys.readouterr().err
    line = ("interrupted; its last complete checkpoint is "
            f"{out / 'checkpoints' / saved}: go on with --resume auto" if saved else
            "interrupted before its first checkpoint: nothing to resume, start it again")
    assert err == f"internimage pretrain: {line}\n", err
