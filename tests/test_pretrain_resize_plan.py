"""Resuming pre-training on another world size, the parts that need no processes: an
epoch run's plan and lr schedule in samples (pretrain/engine.py, runtime/schedules.py) and
the universal conversion's reuse (pretrain/resize.py). The runs themselves:
tests/test_pretrain_resize.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
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
        # as ds_to_universal's main ends: its output folder's name, in a file beside it
        (dst.parent / "latest_universal").write_text(dst.name)
        calls.append(src.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resize, "run_tool", run)
    return calls


def test_universal_form_of_a_replaced_checkpoint_is_converted_again(tmp_path, converter):
    """The sequence of the audit (a resize, then a rewind that saved the same step again,
    then another resize): the second resize loads the new step 4, not the abandoned one."""
    from pretrain.resize import convert_to_universal
    from runtime.checkpoint import _publish, prune, wait_for_deletions

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
    assert wait_for_deletions(timeout=60)  # the outdated form: deleted in the background
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


def _failing(cmd, **kw):
    """``ds_to_universal`` (a stand-in) that failed, after it had written some of its files
    and its ``latest_universal`` pointer to its output folder."""
    dst = Path(cmd[cmd.index("--output_folder") + 1])
    (dst / "zero" / "param_a").mkdir(parents=True, exist_ok=True)
    (dst.parent / "latest_universal").write_text(dst.name)
    return subprocess.CompletedProcess(
        cmd, 1, "", "Traceback (most recent call last):\n  File x\nValueError: broken\n")


def test_failed_conversion_is_one_line(tmp_path, monkeypatch):
    """The command line prints a ResumeError as one line: DeepSpeed's traceback is cut to
    its last line, and nothing of the attempt is left (its folder, and the pointer to it
    that ds_to_universal writes, which named a folder gone once it failed)."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError, wait_for_deletions

    ckpt = _checkpoint(tmp_path, "step_0000004", "A")
    monkeypatch.setattr(resize, "run_tool", _failing)
    with pytest.raises(ResumeError) as err:
        resize.convert_to_universal(ckpt)
    assert "\n" not in str(err.value) and str(err.value).endswith("ValueError: broken")
    assert wait_for_deletions(timeout=60)  # deleted in the background
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


def _old_conversion_goes_on(dst: Path) -> None:
    """What the old job's ds_to_universal writes after the takeover, into ``dst``, the
    output folder it was given: the rest of its fragments (folders made with
    ``exist_ok=True``), the removal of its ``tmp/`` fragments (``shutil.rmtree(<output>/
    tmp)`` after merging) and the copy of the ``mp*`` files into the output
    (deepspeed/checkpoint/ds_to_universal.py)."""
    (dst / "zero" / "param_b").mkdir(parents=True, exist_ok=True)
    (dst / "zero" / "param_b" / "fp32.pt").write_text("old")
    shutil.rmtree(dst / "tmp", ignore_errors=True)
    (dst / "mp_rank_00_model_states.pt").write_text("old")


def _taken_over(monkeypatch, new_job_converts: bool, new_job: dict) -> None:
    """``ds_to_universal`` (a stand-in) of a job whose run lock another job took while it
    was converting (a holder stalled past the lock's timeout: two steps of one SLURM job):
    half-way, the new holder's start removes what it takes for a killed job's leftovers
    (runtime.checkpoint.clear_leftovers, run for real here), this conversion's folder
    among them; ``new_job_converts``: the new holder then converts the same checkpoint
    (convert_to_universal, for real: its outcome in ``new_job["outcome"]``) while the old
    one's ds_to_universal goes on writing into the folder it was given."""
    import pretrain.resize as resize
    import runtime.checkpoint as ck

    given: list[Path] = []  # each ds_to_universal's output folder, the old job's first

    def run(cmd, **kw):
        dst = Path(cmd[cmd.index("--output_folder") + 1])
        given.append(dst)
        if len(given) == 2:  # the new job's: extract, merge, copy (the old one's interleaved)
            (dst / "tmp").mkdir(exist_ok=True)  # as its makedirs(exist_ok=True)
            (dst / "tmp" / "fragment").write_text("new")
            _old_conversion_goes_on(given[0])
            if not (dst / "tmp" / "fragment").is_file():
                return subprocess.CompletedProcess(cmd, 1, "", "FileNotFoundError: fragment")
            for param in ("param_a", "param_b"):
                (dst / "zero" / param).mkdir(parents=True, exist_ok=True)
                (dst / "zero" / param / "fp32.pt").write_text("new")
            shutil.rmtree(dst / "tmp", ignore_errors=True)  # as ds_to_universal does
            (dst / "mp_rank_00_model_states.pt").write_text("new")
            (dst.parent / "latest_universal").write_text(dst.name)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        (dst / "zero" / "param_a").mkdir(parents=True)
        (dst / "zero" / "param_a" / "fp32.pt").write_text("old")
        assert len(ck.clear_leftovers(dst.parent)) == 1  # the new holder's start
        if new_job_converts:
            try:
                new_job["outcome"] = resize.convert_to_universal(
                    Path(cmd[cmd.index("--input_folder") + 1]))
            except ck.ResumeError as err:
                new_job["outcome"] = err
        else:
            _old_conversion_goes_on(dst)
        (dst.parent / "latest_universal").write_text(dst.name)  # its main's end
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(resize, "run_tool", run)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("new_job_converts", [False, True])
def test_a_conversion_whose_folder_was_taken_over_publishes_nothing(new_job_converts,
                                                                     tmp_path, monkeypatch):
    """The old holder's conversion finished writing into a folder that is no longer the
    one it created: publishing it (the rename it ends with) put a universal form without
    param_a where a resize resume loads it. It is refused in one line; the universal form
    already there (an older conversion) stays. The new job's own conversion of the same
    checkpoint, made meanwhile, holds nothing of the old one's: both wrote into one folder
    name, so the old one's late files landed in the new job's folder and its removal of
    ``tmp/`` took the new job's fragments (its conversion failed, or published the old
    one's files). And ds_to_universal's pointer to the old one's folder, gone, is not left."""
    from pretrain.resize import SOURCE, convert_to_universal, source_identity
    from runtime.checkpoint import ResumeError, wait_for_deletions

    ckpt = _checkpoint(tmp_path, "step_0000004", "A")
    published = tmp_path / "step_0000004_universal"
    published.mkdir()  # made by an older version: converted again
    (published / "branch").write_text("old")
    new_job: dict = {}
    _taken_over(monkeypatch, new_job_converts, new_job)
    with pytest.raises(ResumeError) as err:
        convert_to_universal(ckpt)
    assert wait_for_deletions(timeout=60)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{published}: ")
    assert "replaced while it was being written" in message and "nothing published" in message
    if new_job_converts:  # the new job's, published, with its files alone
        assert new_job["outcome"] == published
        files = _files(published)
        assert json.loads(files.pop(SOURCE))["identity"] == source_identity(ckpt)
        assert files == {"zero/param_a/fp32.pt": "new", "zero/param_b/fp32.pt": "new",
                         "mp_rank_00_model_states.pt": "new"}
    else:  # the older form, as it was
        assert _files(published) == {"branch": "old"}
    # nothing of the old job's is left: its folder (its own name: no other job's) and
    # ds_to_universal's pointer to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004",
                                                          "step_0000004_universal"]


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


def _fake_gather(monkeypatch, rank: int, world: int, gathered: list) -> None:
    """runtime.checkpoint.all_gather_objects on rank ``rank`` of ``world``: every other rank
    passed (None); what this rank passed is recorded in ``gathered``. Rank 0's mark and the
    others' wait for it (the store of whatever process group this test process holds, left
    by an earlier test, would never get the mark) pass at once; real ranks:
    tests/test_pretrain_resize_refusal_ranks.py."""
    import pretrain.resize as resize
    import runtime.checkpoint as ck

    def gather(outcome):
        gathered.append(outcome)
        return [outcome if r == rank else None for r in range(world)]

    monkeypatch.setattr(ck, "all_gather_objects", gather)
    monkeypatch.setattr(resize, "mark_done", lambda key: None)
    monkeypatch.setattr(resize, "wait_for_main", lambda key, what, bound_s: None)


def test_a_refused_conversion_is_raised_on_every_rank(tmp_path, monkeypatch):
    """Rank 0 converts; the others waited for it in a bare barrier, and when it refused
    (ds_to_universal failed, or its folder was taken over) they waited on, ending only
    when the launcher killed them (under a plain srun: at the collective timeout). Now
    rank 0's refusal is all-gathered: rank 0 raises its own, every other rank one line
    naming it, and no rank switches to a universal load."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError

    (tmp_path / "checkpoints").mkdir()
    ckpt = _checkpoint(tmp_path / "checkpoints", "step_0000004", "A")
    monkeypatch.setattr(resize, "run_tool", _failing)
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    gathered: list = []
    _fake_gather(monkeypatch, 0, 2, gathered)
    with pytest.raises(ResumeError) as own:
        resize.resize_load(engine, ckpt, ckpt.parent, is_main=True)
    assert gathered == [str(own.value)] and str(own.value).endswith("ValueError: broken")
    # rank 1 of 2: handed rank 0's refusal by the gather
    monkeypatch.setattr("runtime.checkpoint.all_gather_objects",
                        lambda outcome: [str(own.value), None])
    with pytest.raises(ResumeError) as other:
        resize.resize_load(engine, ckpt, ckpt.parent, is_main=False)
    assert str(other.value) == f"rank 0 of 2 refused the resume: {own.value}"
    assert engine._config.load_universal_checkpoint is False


def test_a_conversion_that_cannot_write_is_refused_on_every_rank(tmp_path, monkeypatch):
    """An OSError of rank 0's conversion (its checkpoints/ unwritable, a full disk) is a
    one-line refusal all ranks raise too, not a traceback on rank 0 with the others left
    waiting."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError, wait_for_deletions

    (tmp_path / "checkpoints").mkdir()
    ckpt = _checkpoint(tmp_path / "checkpoints", "step_0000004", "A")

    def full(cmd, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resize, "run_tool", full)
    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
    gathered: list = []
    _fake_gather(monkeypatch, 0, 2, gathered)
    with pytest.raises(ResumeError) as err:
        resize.resize_load(engine, ckpt, ckpt.parent, is_main=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{ckpt}: ")
    assert "No space left on device" in message and gathered == [message]
    assert wait_for_deletions(timeout=60)  # deleted in the background
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step_0000004"]


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one whose parent died may wait
    for a reaper that a container's init never is)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hung_conversion_is_refused_after_its_timeout(tmp_path, monkeypatch):
    """A ds_to_universal that never ends (a stalled mount; the extract workers' hang noted
    in REFERENCE.md) is killed at CONVERSION_TIMEOUT_S and refused in one line, nothing of
    it left, instead of holding every rank until the job's time limit."""
    import pretrain.resize as resize
    from runtime.checkpoint import ResumeError, wait_for_deletions

    ckpt = _checkpoint(tmp_path, "step_0000004", "A")
    hang = tmp_path / "python-that-hangs"
    # with a worker of its own, as ds_to_universal's pools: killed with it (killing only
    # the main process, as subprocess.run's timeout does, left it running)
    worker_pid = tmp_path.parent / f"{tmp_path.name}-worker.pid"
    hang.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {worker_pid}\nexec sleep 600\n")
    hang.chmod(0o755)
    monkeypatch.setattr(resize.sys, "executable", str(hang))  # the real subprocess.run
    monkeypatch.setattr(resize, "CONVERSION_TIMEOUT_S", 1)
    with pytest.raises(ResumeError) as err:
        resize.convert_to_universal(ckpt)
    assert str(err.value) == (f"{ckpt}: DeepSpeed's ds_to_universal did not finish within "
                              "1 s (hung?)")
    worker = int(worker_pid.read_text())
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker), "the conversion's worker outlived its timeout"
    assert wait_for_deletions(timeout=60)  # deleted in the background
    assert sorted(p.name for p in tmp_path.iterdir()) == ["python-that-hangs", "step_0000004"]


def test_a_rank_waiting_for_rank_0_gives_up_at_its_bound():
    """The other ranks wait for rank 0's conversion through the store, however long it
    takes up to a bound: a rank 0 that hangs (alive, its store answering) ends their wait
    with one error naming what they waited for. A one-process gloo group over a HashStore
    stands in for the job's (wait_for_main asks only the store; keys of this test alone)."""
    import torch.distributed as dist

    from runtime.dist import MainRankLostError, mark_done, wait_for_main

    created = not dist.is_initialized()  # else an earlier test's group: its store serves
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(MainRankLostError) as err:
            wait_for_main("internimage/test/never-marked", "the conversion", bound_s=0.3,
                          poll_s=0.1)
        assert str(err.value) == "rank 0 did not finish the conversion within 0.3 s"
        mark_done("internimage/test/done")
        wait_for_main("internimage/test/done", "the conversion", bound_s=0.3, poll_s=0.1)
    finally:
        if created:
            dist.destroy_process_group()
