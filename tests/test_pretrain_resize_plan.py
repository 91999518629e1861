"""Resuming pre-training on another world size, the parts that need no processes: an
epoch run's plan and lr schedule in samples (pretrain/engine.py, runtime/schedules.py) and
the universal conversion's reuse (pretrain/resize.py). The runs themselves:
tests/test_pretrain_resize.py."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

LR, MIN_RATIO = 3e-3, 1e-4 / 3e-3


def expected_factor(samples: float, warmup_samples: float, unit: float, end: float) -> float:
    """The schedule as the config defines it, in samples (written out here, not taken from
    the code under test): linear warm-up whose first step is already at one step's share,
    then a half cosine from 1 to MIN_RATIO at ``end``."""
    if samples < warmup_samples:
        return min(1.0, (samples + unit) / warmup_samples)
    progress = min(1.0, (samples - warmup_samples) / (end - warmup_samples))
    return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def _scheduler(warmup: int, total: int):
    from runtime.schedules import WarmupCosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    return WarmupCosine(opt, warmup, total, MIN_RATIO)


def _run_to(scheduler, step: int) -> None:
    """Step the scheduler as DeepSpeed does, once per optimizer step."""
    while scheduler.last_epoch < step:
        scheduler.optimizer.step()
        scheduler.step()


def _lr(scheduler) -> float:
    return scheduler.optimizer.param_groups[0]["lr"]


def test_replanned_schedule_follows_the_curve_in_samples_and_ends_at_min_lr():
    """2 ranks x 16 (an 8-step plan over 256 samples) saved at step 2, resumed on 1 rank: 12
    steps of 16 follow the same lr curve in samples and end at min_lr exactly."""
    from pretrain.engine import align_schedule

    sched = _scheduler(2, 8)
    _run_to(sched, 2)
    before = _lr(sched)
    assert align_schedule(sched, 2, 14, 16, 32)
    assert _lr(sched) == pytest.approx(before, rel=1e-12)  # continuous at the change
    for step in range(2, 15):
        _run_to(sched, step)
        samples = 64 + 16 * (step - 2)
        assert _lr(sched) == pytest.approx(LR * expected_factor(samples, 64, 32, 256),
                                           rel=1e-12), step
    assert _lr(sched) == pytest.approx(LR * MIN_RATIO, rel=1e-12)


def test_replanned_during_warmup_keeps_the_warmup_in_samples():
    """Resized after step 1 of a 4-step warm-up at 32 a step: the warm-up still ends after
    128 samples (6 more steps of 16), then the cosine runs to the end."""
    from pretrain.engine import align_schedule

    sched = _scheduler(4, 8)  # 256 samples at 32
    _run_to(sched, 1)
    assert align_schedule(sched, 1, 15, 16, 32)
    for step in range(1, 16):
        _run_to(sched, step)
        samples = 32 + 16 * (step - 1)
        assert _lr(sched) == pytest.approx(LR * expected_factor(samples, 128, 32, 256),
                                           rel=1e-12), step


def test_replanned_twice_stays_continuous_and_ends_at_min_lr():
    """2 -> 1 -> 3 ranks with a left-over that no global batch divides (250 samples):
    continuous at each change, min_lr exactly at the last step."""
    from pretrain.engine import align_schedule

    sched = _scheduler(2, 7)  # int(250 / 32) = 7 steps of 32
    _run_to(sched, 3)  # 96 samples
    lrs = [_lr(sched)]
    assert align_schedule(sched, 3, 3 + (250 - 96) // 16, 16, 32)  # 9 more steps: 240
    for step in range(4, 9):  # 5 of them, to 176 samples
        _run_to(sched, step)
        lrs.append(_lr(sched))
    assert align_schedule(sched, 8, 8 + (250 - 176) // 48, 48, 16)  # 1 more: 224
    assert _lr(sched) == pytest.approx(lrs[-1], rel=1e-12)
    _run_to(sched, 9)
    lrs.append(_lr(sched))
    assert lrs[-1] == pytest.approx(LR * MIN_RATIO, rel=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # the cosine only goes down


def test_unchanged_plan_keeps_the_restored_schedule():
    """A resume on the same global batch and plan: nothing re-planned (an exact resume)."""
    from pretrain.engine import align_schedule

    sched = _scheduler(2, 8)
    _run_to(sched, 3)
    state = dict(sched.state_dict())
    assert not align_schedule(sched, 3, 8, 32, 32)
    assert sched.state_dict() == state


def test_replanned_schedule_survives_save_and_restore():
    """The re-planned schedule is in the scheduler's state (what DeepSpeed saves), and a
    state saved before it existed loads as the step schedule it was."""
    from pretrain.engine import align_schedule

    sched = _scheduler(2, 8)
    _run_to(sched, 2)
    align_schedule(sched, 2, 14, 16, 32)
    _run_to(sched, 5)
    restored = _scheduler(2, 99)  # built for another plan: the checkpoint's wins
    restored.load_state_dict(sched.state_dict())
    for step in range(6, 15):
        _run_to(sched, step)
        _run_to(restored, step)
        assert _lr(restored) == _lr(sched)
    old_state = {k: v for k, v in _scheduler(2, 8).state_dict().items()
                 if k != "samples_plan"}
    legacy = _scheduler(2, 99)
    legacy.load_state_dict(old_state)
    assert legacy.samples_plan is None and legacy.total_steps == 8


def test_epoch_plan_is_counted_in_samples():
    """A fresh run's steps as before; a resumed one ends when the samples left are read at
    its global batch; a step-based run counts steps whatever the world size."""
    from pretrain.engine import total_steps

    # the config sections total_steps reads
    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=16),
                          engine=SimpleNamespace(grad_accum=1),
                          run=SimpleNamespace(epochs=1.0, samples_per_epoch=256, max_steps=0))
    assert total_steps(cfg, 2) == 8 and total_steps(cfg, 1) == 16
    assert total_steps(cfg, 1, step=2, samples=64) == 14
    assert total_steps(cfg, 2, step=10, samples=160) == 13
    assert total_steps(cfg, 3, step=10, samples=160) == 12  # 96 left: 2 steps of 48
    assert total_steps(cfg, 2, step=8, samples=256) == 8  # nothing left: done
    cfg.run.epochs, cfg.run.max_steps = 0.0, 40
    assert total_steps(cfg, 1, step=2, samples=64) == total_steps(cfg, 4) == 40


def test_ema_momentum_of_an_epoch_run_stays_on_its_curve_in_samples_when_the_batch_changes():
    """The EMA teacher's momentum follows BYOL's cosine (written out here: Grill et al.
    2020, section 3.2) over the run's plan. An epoch run (960 samples, 8 per step) saved at
    step 40 and resumed with 16 per step (grad_accum 2 at the same world size) continues
    at the samples read, as its lr does; counted in steps it jumped from 1/3 to 1/2 of the
    cosine at the resume (40/120 -> 40/80)."""
    from pretrain.engine import run_progress, total_steps
    from pretrain.m3i.ema import momentum_at

    base = 0.995

    def byol(fraction: float) -> float:
        return 1 - (1 - base) * (math.cos(math.pi * fraction) + 1) / 2

    def momentum(cfg, step: int, samples_after: int, batch: int, end: int) -> float:
        return momentum_at(*run_progress(cfg, step, samples_after, batch, end), base)

    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=8),
                          engine=SimpleNamespace(grad_accum=1),
                          run=SimpleNamespace(epochs=1.0, samples_per_epoch=960, max_steps=0))
    end = total_steps(cfg, 1)
    assert end == 120
    for step in (1, 2, 40, 41, 120):  # a fresh run: step k updates at (k - 1) / K
        assert momentum(cfg, step, 8 * step, 8, end) == pytest.approx(byol((step - 1) / 120))
    cfg.engine.grad_accum = 2  # resumed at step 40 (320 samples), 16 per step from here
    end = total_steps(cfg, 1, step=40, samples=320)
    assert end == 80
    for step in (41, 60, 80):
        read_before = 320 + 16 * (step - 41)
        assert momentum(cfg, step, read_before + 16, 16, end) == pytest.approx(
            byol(read_before / 960), rel=1e-12), step
    # a step-based run counts steps whatever each reads (as its lr schedule)
    cfg.run.epochs, cfg.run.max_steps = 0.0, 50
    assert momentum(cfg, 26, 10**6, 16, 50) == pytest.approx(byol(25 / 50))


# ---------------------------------------------------------------------------------------
# The universal conversion's reuse: rank-0 file operations as runtime.checkpoint does them.


def _checkpoint(root: Path, name: str, branch: str) -> Path:
    from runtime.checkpoint import TRAINER_STATE

    d = root / name
    d.mkdir()
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text(branch)
    (d / TRAINER_STATE).write_text(json.dumps({"branch": branch}))
    return d


@pytest.fixture
def converter(monkeypatch):
    """Stand-in for ``ds_to_universal``: writes which checkpoint content it converted.
    Returns the list of the folders it converted."""
    import pretrain.resize as resize

    calls = []

    def run(cmd, **kw):
        src = Path(cmd[cmd.index("--input_folder") + 1])
        dst = Path(cmd[cmd.index("--output_folder") + 1])
        dst.mkdir(exist_ok=True)  # as ds_to_universal's os.makedirs(exist_ok=True)
        content = (src / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_text()
        (dst / "branch").write_text(content)
        calls.append(src.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resize.subprocess, "run", run)
    return calls


def test_universal_form_of_a_replaced_checkpoint_is_converted_again(tmp_path, converter):
    """The sequence of the audit (a resize, then a rewind that saved the same step again,
    then another resize): the second resize loads the new step 4, not the abandoned one."""
    from pretrain.resize import convert_to_universal
    from runtime.checkpoint import _publish, prune

    root = tmp_path / "checkpoints"
    root.mkdir()
    _checkpoint(root, "step_0000002", "A")
    _checkpoint(root, "step_0000004", "A")
    (root / "latest").write_text("step_0000004")
    out = convert_to_universal(root / "step_0000004")  # resized resume of branch A
    assert (out / "branch").read_text() == "A" and converter == ["step_0000004"]
    assert convert_to_universal(root / "step_0000004") == out  # reused while unchanged
    assert converter == ["step_0000004"]
    # the rewound run (branch B) saves step 4 again
    _checkpoint(root, "step_0000004.tmp-deadbeef", "B")
    _publish(root, "step_0000004.tmp-deadbeef", "step_0000004")
    prune(root, keep_last=2)
    out = convert_to_universal(root / "step_0000004")
    assert (out / "branch").read_text() == "B" and len(converter) == 2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step_0000002", "step_0000004", "step_0000004_universal"]


def test_universal_form_without_a_recorded_source_is_converted_again(tmp_path, converter):
    """A conversion made before sources were recorded cannot be trusted: made again."""
    from pretrain.resize import convert_to_universal

    ckpt = _checkpoint(tmp_path, "step_0000004", "B")
    old = tmp_path / "step_0000004_universal"
    old.mkdir()
    (old / "branch").write_text("A")
    assert (convert_to_universal(ckpt) / "branch").read_text() == "B"
    assert converter == ["step_0000004"]


def test_failed_conversion_is_one_line(tmp_path, monkeypatch):
    """The command line prints a ResumeError as one line: DeepSpeed's traceback is cut to
    its last line, and nothing of the attempt is left."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError

    ckpt = _checkpoint(tmp_path, "step_0000004", "A")
    monkeypatch.setattr(resize.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "Traceback (most recent call last):\n  File x\nValueError: broken\n"))
    with pytest.raises(ResumeError) as err:
        resize.convert_to_universal(ckpt)
    assert "\n" not in str(err.value) and str(err.value).endswith("ValueError: broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004"]


def test_a_resize_from_another_runs_checkpoint_converts_into_this_run(tmp_path, converter):
    """`--resume OTHER_RUN/checkpoints/step_X` on another world size: the universal form
    (twice the checkpoint's size) goes into this run's checkpoints/, which prunes it; the
    other run, which this one does not hold the lock of (it may be live, or read-only),
    is left as it was, its own files and pointers included."""
    from pretrain.resize import convert_to_universal

    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    ckpt = _checkpoint(other, "step_0000004", "A")
    (other / "latest").write_text("step_0000004")
    (other / "latest_universal").write_text("step_0000002_universal")  # the other run's
    before = sorted(p.name for p in other.iterdir())
    mine = tmp_path / "mine" / "checkpoints"
    out = convert_to_universal(ckpt, into=mine)
    assert out.parent == mine and (out / "branch").read_text() == "A"
    assert sorted(p.name for p in other.iterdir()) == before
    assert convert_to_universal(ckpt, into=mine) == out and len(converter) == 1  # reused


def _taken_over(monkeypatch, new_job_converts: bool) -> None:
    """``ds_to_universal`` (a stand-in) of a job whose run lock another job took while it
    was converting (a holder stalled past the lock's timeout: two steps of one SLURM job):
    half-way, the new holder's start removes what it takes for a killed job's leftovers
    (runtime.checkpoint.clear_leftovers, run for real here), this conversion's folder
    among them; ``new_job_converts``: the new holder then starts its own conversion under
    the same name. The old conversion goes on writing its files under its folder's name."""
    import pretrain.resize as resize
    import runtime.checkpoint as ck

    def run(cmd, **kw):
        dst = Path(cmd[cmd.index("--output_folder") + 1])
        (dst / "zero" / "param_a").mkdir(parents=True)
        (dst / "zero" / "param_a" / "fp32.pt").write_text("converted")
        assert len(ck.clear_leftovers(dst.parent)) == 1  # the new holder's start
        if new_job_converts:
            dst.mkdir()
            (dst / resize.SOURCE).write_text(json.dumps({"token": "the new job's"}))
        (dst / "zero" / "param_b").mkdir(parents=True, exist_ok=True)  # the rest
        (dst / "zero" / "param_b" / "fp32.pt").write_text("converted")
        (dst / "mp_rank_00_model_states.pt").write_text("states")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resize.subprocess, "run", run)


@pytest.mark.parametrize("new_job_converts", [False, True])
def test_a_conversion_whose_folder_was_taken_over_publishes_nothing(new_job_converts,
                                                                     tmp_path, monkeypatch):
    """The old holder's conversion finished writing into a folder that is no longer the
    one it created: publishing it (the rename it ends with) put a universal form without
    param_a, or with the new job's files, where a resize resume loads it. It is refused in
    one line; the universal form already there (an older conversion) stays, and the new
    job's folder is left to it."""
    from pretrain.resize import SOURCE, convert_to_universal
    from runtime.checkpoint import ResumeError, derived_staging, wait_for_deletions

    ckpt = _checkpoint(tmp_path, "step_0000004", "A")
    published = tmp_path / "step_0000004_universal"
    published.mkdir()  # made by an older version: converted again
    (published / "branch").write_text("old")
    _taken_over(monkeypatch, new_job_converts)
    with pytest.raises(ResumeError) as err:
        convert_to_universal(ckpt)
    assert wait_for_deletions(timeout=60)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{published}: ")
    assert "replaced while it was being written" in message and "nothing published" in message
    assert sorted(p.name for p in published.iterdir()) == ["branch"]  # as it was
    assert (published / "branch").read_text() == "old"
    tmp = tmp_path / derived_staging(published.name)
    assert not (tmp_path / f".{published.name}.stale").exists()
    if new_job_converts:  # the new job's own conversion, untouched
        assert json.loads((tmp / SOURCE).read_text()) == {"token": "the new job's"}
    else:  # what the old one wrote after the takeover: a hidden leftover, not published
        assert not (tmp / "zero" / "param_a").exists() and (tmp / "zero" / "param_b").exists()


def test_a_conversion_publishes_its_own_folder_with_its_source(tmp_path, converter):
    """The mark a conversion checks before publishing is its source record: the published
    form still names the checkpoint and its identity (what a later resize reuses it by)."""
    from pretrain.resize import SOURCE, convert_to_universal, source_identity

    ckpt = _checkpoint(tmp_path, "step_0000004", "A")
    out = convert_to_universal(ckpt)
    record = json.loads((out / SOURCE).read_text())
    assert record["source"] == "step_0000004" and record["identity"] == source_identity(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004",
                                                          "step_0000004_universal"]
