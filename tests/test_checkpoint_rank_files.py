"""Per-rank state files (runtime/checkpoint.py): a resume on the same world size reads the
small shared ``trainer_state.json`` and this rank's own file alone; a resize (another
world size or worker count) reads every old rank's file, which the data re-deal needs; a
checkpoint written before rank files (every rank's state inside ``trainer_state.json``,
under ``ranks``) resumes as before. The 2-rank save: tests/test_checkpoint_ranks.py; an
old-layout checkpoint resumed exactly end to end: tests/test_pretrain_engine.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3_server import good_samples, write_tar

import runtime.checkpoint as ck
from data.config import S3Config
from runtime.dist import DistInfo

S3 = S3Config(retries=0, backoff=0.01)


def _cfg(tmp_path: Path, workers: int = 0):
    """A pre-training data config over 6 small shards (written once under ``tmp_path``)."""
    from pretrain.data import DataConfig, SourceConfig

    urls = []
    for i in range(6):
        path = tmp_path / f"s{i}.tar"
        if not path.exists():
            write_tar(path, good_samples(f"s{i}-", 6, size=8))
        urls.append(str(path))
    return DataConfig(sources=[SourceConfig("s", urls)], image_size=8, batch_size=1,
                      workers=workers, shuffle_buffer=0, context_length=8, seed=4, s3=S3)


def _write(ckpt: Path, shared: dict, states: list[dict], layout: str) -> None:
    """A checkpoint's trainer state with ``states`` as rank files, or (``old``) every rank
    inside trainer_state.json, as checkpoints were written before rank files."""
    if layout == "old":
        ckpt.mkdir(parents=True)
        ck.write_trainer_state(ckpt, shared | {"ranks": states})
        return
    for rank, state in enumerate(states):
        ck.write_rank_state(ckpt, rank, state)
    ck.write_trainer_state(ckpt, shared | {ck.RANK_STATES: len(states)})


def _saved_checkpoint(tmp_path: Path, world: int, layout: str = "files",
                      tag: str = "step_0000002") -> tuple[Path, list]:
    """A checkpoint of ``world`` ranks that each drew a few batches: its folder (each
    rank's state in its own file, or, ``layout="old"``, all inside trainer_state.json) and
    every rank's saved state."""
    from pretrain.data import build_loader

    cfg = _cfg(tmp_path)
    states = []
    for rank in range(world):
        loader = build_loader(cfg, rank, world)
        for i, _ in enumerate(loader):
            if i + 1 == 2 + rank:
                break
        states.append({"rng": {"rank": rank},
                       "data": json.loads(json.dumps(loader.state_dict()))})
    ckpt = tmp_path / "checkpoints" / tag
    _write(ckpt, {"step": 2, "world_size": world, "model_hash": "h"}, states, layout)
    return ckpt, states


def _resume(tmp_path: Path, ckpt: Path, rank: int, world: int, workers: int = 0):
    """A pre-training Trainer, rank ``rank`` of ``world``, past its rank-state restore
    (the rest of its set-up, the engine, is not built); every file it read, with sizes."""
    from pretrain.data import build_loader
    from pretrain.trainer import Trainer

    read: dict[str, int] = {}
    real = Path.read_text

    def spy(path, *args, **kwargs):
        text = real(path, *args, **kwargs)
        read[str(Path(path).relative_to(ckpt))] = len(text.encode())
        return text

    trainer = Trainer.__new__(Trainer)
    trainer.info = DistInfo(rank=rank, world_size=world)
    trainer.resume_dir = ckpt
    trainer._saved_rng = None
    Path.read_text = spy
    try:
        trainer.state = ck.load_trainer_state(ckpt)
        trainer.resized = trainer.state["world_size"] != world
        trainer.loader = build_loader(_cfg(tmp_path, workers), rank, world)
        trainer._restore_rank_state()
    finally:
        Path.read_text = real
    return trainer, read


def test_a_same_size_resume_reads_its_own_rank_file_alone(tmp_path):
    ckpt, states = _saved_checkpoint(tmp_path, 3)
    # the other ranks' files are gone: a resume that needed them would fail
    for rank in (0, 2):
        ck.rank_state_path(ckpt, rank).unlink()
    trainer, read = _resume(tmp_path, ckpt, 1, 3)
    assert sorted(read) == ["rank_states/00001.json", "trainer_state.json"]
    assert trainer._saved_rng == {"rank": 1}
    assert trainer.loader.state_dict() == states[1]["data"]


@pytest.mark.parametrize("world, workers", [(2, 0), (3, 2)])
def test_another_world_size_or_worker_count_reads_every_old_rank_file(tmp_path, world,
                                                                       workers):
    """2 ranks resumed on 3 (a resize), or on 3 with another worker count (same world
    size): the loader re-deals every old slot's position, as it did from the list of all
    ranks' states inside trainer_state.json."""
    from pretrain.data import build_loader

    ckpt, states = _saved_checkpoint(tmp_path, 3)
    trainer, read = _resume(tmp_path, ckpt, 1, world, workers)
    assert sorted(read) == [*(f"rank_states/{r:05d}.json" for r in range(3)),
                            "trainer_state.json"]
    redealt = build_loader(_cfg(tmp_path, workers), 1, world,
                           state=[s["data"] for s in states])
    assert trainer.loader.state_dict() == redealt.state_dict()
    # the RNG is restored on the same world size only
    assert trainer._saved_rng == ({"rank": 1} if world == 3 else None)


@pytest.mark.parametrize("world", [3, 2])
def test_a_checkpoint_with_every_rank_inside_trainer_state_resumes_as_before(tmp_path,
                                                                             world):
    """Written before rank files (a run in progress upgrades mid-run): the same position
    and RNG as from the same states in rank files; the entries are dropped once used."""
    old, states = _saved_checkpoint(tmp_path, 3, layout="old")
    assert not (old / ck.RANK_STATES).exists()
    from_old, read = _resume(tmp_path, old, 1, world)
    assert sorted(read) == ["trainer_state.json"]
    new, _ = _saved_checkpoint(tmp_path, 3, tag="step_0000003")
    from_new, _ = _resume(tmp_path, new, 1, world)
    assert from_old.loader.state_dict() == from_new.loader.state_dict()
    assert from_old._saved_rng == from_new._saved_rng
    assert "ranks" not in from_old.state


def test_a_missing_rank_file_is_refused_naming_it(tmp_path):
    ckpt, _ = _saved_checkpoint(tmp_path, 2)
    ck.rank_state_path(ckpt, 1).unlink()
    with pytest.raises(ck.ResumeError, match=r"rank_states/00001.json missing"):
        _resume(tmp_path, ckpt, 1, 2)


@pytest.mark.parametrize("layout", ["files", "old"])
def test_finetune_reads_its_own_rng_and_every_rank_only_for_a_saved_key(tmp_path, layout):
    """Fine-tuning: the RNG from this rank's file alone; a streamed set's positions
    (``data``) from every rank's; a key no rank saved from rank 0's file alone."""
    from finetune.engine import FinetuneRun
    from runtime.rng import rng_state

    ckpt = tmp_path / "checkpoints" / "step_0000004"
    states = [{"rng": rng_state(), "data": {"rank": r}} for r in range(3)]
    _write(ckpt, {"step": 4, "world_size": 3, "model_hash": "h"}, states, layout)
    run = FinetuneRun(tmp_path, ckpt, ck.load_trainer_state(ckpt))
    assert run.rank_states("data") == [{"rank": r} for r in range(3)]
    if layout == "files":  # the others' files gone: neither needs them
        for rank in (1, 2):
            ck.rank_state_path(ckpt, rank).unlink()
    assert run.rank_states("absent") == [None, None, None]
    import torch

    expected = torch.get_rng_state()
    torch.rand(3)
    run.restore_rng(DistInfo(rank=0, world_size=3))
    assert torch.equal(torch.get_rng_state(), expected)


def test_a_refused_resume_is_raised_on_every_rank_only_once_all_have_checked(monkeypatch):
    """A refusing rank (rank 0 hosts the rendezvous store) used to exit at once, while a
    slower rank was still setting up its process group: that rank died of "Connection
    reset by peer", a traceback in its log. Now each rank's outcome is all-gathered first;
    the refusing rank raises its own error, the others one naming it."""
    gathered: list = []

    def gather(outcome):
        gathered.append(outcome)
        return [None, "step_0000002: saved by a fp32 engine"]

    monkeypatch.setattr(ck, "all_gather_objects", gather)
    with pytest.raises(ck.ResumeError, match=r"rank 1 of 2 refused the resume: "
                                             r"step_0000002: saved by a fp32 engine"):
        ck.agree_on_refusal(None)  # rank 0, whose checks passed
    own = ck.ResumeError("step_0000002: saved by a fp32 engine")
    with pytest.raises(ck.ResumeError) as raised:
        ck.agree_on_refusal(own)  # rank 1: its own error, after the gather
    assert raised.value is own
    assert gathered == [None, "step_0000002: saved by a fp32 engine"]
    monkeypatch.setattr(ck, "all_gather_objects", lambda outcome: [None, None])
    ck.agree_on_refusal(None)  # every rank passed: nothing raised
