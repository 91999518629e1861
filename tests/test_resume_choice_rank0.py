"""Which checkpoint a training start resumes is rank 0's choice on every rank, made once it
holds the run directory's lock (finetune.engine.open_run, pretrain Trainer._open_resume).

A job still ending in the run directory (a resubmit right after `scancel`, a retry
script) may publish a newer checkpoint while the new job's rank 0 waits for its lock.
Before, every other rank read ``latest`` at once, without the lock: the ranks resumed
different steps and hung, or, their cadences aligned, saved the files of two steps as one
checkpoint. 2 real gloo ranks, forked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from runtime.dist import DistInfo
from tests.fake_ranks import as_rank
from tests.rank_launcher import run_file_function

pytestmark = pytest.mark.distributed


def _publish(run: Path, step: int) -> None:
    """A complete checkpoint of ``step`` as far as the resume's choice reads it (a model
    states file and the trainer state), and ``latest`` naming it."""
    tag = f"step_{step:07d}"
    ckpt = run / "checkpoints" / tag
    ckpt.mkdir(parents=True)
    torch.save({}, ckpt / "mp_rank_00_model_states.pt")  # (a resume opens it before the engine)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest.tmp").write_text(tag)
    os.replace(run / "checkpoints" / "latest.tmp", run / "checkpoints" / "latest")


def _open_run_worker(out_dir: str, run: str) -> None:
    import torch.distributed as dist

    import finetune.engine as engine
    from runtime import run_lock
    from runtime.checkpoint import engine_layout

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # the subject is the choice alone: the chosen checkpoint's own checks pass
    engine.checked_state = lambda ckpt, *args, **kwargs: {"step": int(ckpt.name[5:])}
    engine.own_rank_state = lambda *args, **kwargs: None
    if rank == 0:
        real_acquire = run_lock.acquire

        def acquire_while_the_old_job_saves(path, *args, **kwargs):
            time.sleep(1.0)  # the other rank has long read latest, if it reads it itself
            _publish(Path(run), 4)  # the ending job's last save, published meanwhile
            return real_acquire(path, *args, **kwargs)

        run_lock.acquire = acquire_while_the_old_job_saves
    opened = engine.open_run("auto", Path(run), "h", 2, engine_layout(0, "fp32"),
                             publish=False, rank=rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"resume_dir": opened.resume_dir.name if opened.resume_dir else None}))
    dist.barrier()
    if rank == 0:
        run_lock.release()
    os._exit(0)  # (gloo's destructors, as tests/test_finetune_init_once.py)


def test_every_rank_resumes_the_checkpoint_rank_zero_chose_under_the_lock(tmp_path):
    run, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    _publish(run, 2)
    run_file_function(__file__, "_open_run_worker", 2, str(out), str(run), timeout=180)
    chosen = [json.loads((out / f"rank{r}.json").read_text())["resume_dir"] for r in range(2)]
    assert chosen == ["step_0000004", "step_0000004"]


def test_pretraining_ranks_take_rank_zeros_choice_without_reading_latest(tmp_path,
                                                                          monkeypatch):
    """Rank 1 of 2 of a pre-training start: the checkpoint (here none: a fresh start) is
    the one rank 0 sent, and rank 1 never resolves ``--resume`` itself."""
    import pretrain.trainer as trainer_mod
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import global_batch

    def resolve(*args, **kwargs):
        raise AssertionError("only rank 0 resolves --resume")

    monkeypatch.setattr(trainer_mod, "resolve_resume", resolve)
    sent = as_rank(monkeypatch, 1, answer=(True, None))  # rank 0 chose a fresh start
    cfg = load_config(PretrainConfig, DEMO_CONFIG, [f"run.output_dir={tmp_path / 'run'}"])
    trainer = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    trainer.cfg, trainer.info = cfg, DistInfo(rank=1, world_size=2)
    trainer.run_dir = tmp_path / "run"
    trainer.ckpt_root = trainer.run_dir / "checkpoints"
    trainer.batch = global_batch(cfg, 2)
    trainer._open_resume(cfg, "auto")
    assert trainer.resume_dir is None and trainer.state is None
    assert len(sent) == 1  # it waited for rank 0's answer


def _save_refused_worker(out_dir: str, run: str) -> None:
    import torch.distributed as dist

    import runtime.checkpoint as ck
    from runtime.dist import DistInfo as Info
    from runtime.run_lock import RunLockError
    from tests.test_best_checkpoint import Engine

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checks = []

    def lost_at_the_second_look(run_dir):  # taken over during the save's writes
        checks.append(run_dir)
        return None if len(checks) == 1 else "taken over by process 4242 on node-17"

    ck.lost_message = lost_at_the_second_look
    record = {}
    try:
        ck.save_checkpoint(Engine(), Path(run) / "checkpoints", 3, {}, {"step": 3},
                           Info(rank=rank, world_size=2), keep_last=2)
    except RunLockError as err:
        record["error"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)


def test_rank_zeros_refusal_to_publish_is_every_rank_s(tmp_path):
    """Rank 0 finds the run taken over right before it would publish: every rank raises
    that refusal (RunLockError, one line), where the others waited in a barrier rank 0
    never reached; nothing is published."""
    run, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    run_file_function(__file__, "_save_refused_worker", 2, str(out), str(run), timeout=180)
    errors = [json.loads((out / f"rank{r}.json").read_text()).get("error", "")
              for r in range(2)]
    assert all("taken over by process 4242" in e for e in errors), errors
    assert errors[1].startswith("rank 0: ")
    assert not (run / "checkpoints" / "latest").exists()
