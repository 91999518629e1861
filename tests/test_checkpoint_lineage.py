"""Checkpoints after a rewind (``--resume RUN/checkpoints/step_X`` of an earlier step):
a save that dies never leaves ``latest`` on a folder mixing two saves' shards, the rewind
point survives pruning, and resume resolution never picks a staging folder
(runtime/checkpoint.py, runtime/checkpoint_path.py).

The engine here writes DeepSpeed's layout (one ``*_model_states.pt`` per rank in
``save_dir/tag``) with a marker naming the save, so a test can tell which save each shard
came from; the real engine's use of the staging folder is covered by the fine-tuning and
pre-training resume tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import runtime.checkpoint as ck
from runtime.checkpoint_path import CheckpointPathError, resolve_checkpoint
from runtime.dist import DistInfo

RANKS = 2
SHARED = {"model_hash": "h", "world_size": 1}


class Killed(BaseException):
    """A SIGKILL / node failure in the middle of a save (not an Exception: nothing
    catches it on the way out)."""


class FakeEngine:
    """Writes DeepSpeed's per-rank shard files holding ``label``; dies before writing
    rank ``die_at_rank``'s shard when given."""
    device = "cpu"  # where a rank's collectives put their tensors (DeepSpeedEngine.device)

    def __init__(self, label: str, die_at_rank: int | None = None):
        self.label, self.die_at_rank = label, die_at_rank

    def zero_optimization(self) -> bool:  # asked by runtime.master_weights.master_names
        return False

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        assert save_latest is False  # ``latest`` is ours, written once complete
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        for rank in range(RANKS):
            if rank == self.die_at_rank:
                raise Killed
            (folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_text(self.label)


def save(root: Path, step: int, label: str, keep_last: int = 2, **engine) -> None:
    ck.save_checkpoint(FakeEngine(label, **engine), root, step, {}, SHARED | {"step": step,
                       "label": label}, DistInfo(), keep_last)


def shards(folder: Path) -> set[str]:
    """The labels of the saves whose shards ``folder`` holds (one for a sound checkpoint)."""
    return {p.read_text() for p in folder.glob("*_model_states.pt")}


def resumed(root: Path) -> tuple[Path, dict]:
    """What ``--resume auto`` (a requeued job) and ``--resume RUN`` would load."""
    auto, state = ck.open_resume("auto", root, "h", 1)
    assert resolve_checkpoint(root.parent).path == auto
    return auto, state


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


def _die_after_rename(monkeypatch, die_at: int) -> None:
    """Rank 0 killed right after the ``die_at``-th rename of runtime.checkpoint."""
    calls = [0]
    for name in ("replace", "rename"):
        real = getattr(ck.os, name)

        def dying(src, dst, real=real):
            real(src, dst)
            calls[0] += 1
            if calls[0] == die_at:
                raise Killed
        monkeypatch.setattr(ck.os, name, dying)


def test_a_save_that_dies_after_a_rewind_leaves_latest_on_one_consistent_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save(root, 1900, "old")
    save(root, 2000, "old")
    # rewound to step 1900, trained to 2000 again, killed while the ranks write their shards
    with pytest.raises(Killed):
        save(root, 2000, "new", die_at_rank=1)
    folder, state = resumed(root)
    assert folder.name == "step_0002000" and state["label"] == "old"
    assert shards(folder) == {"old"}  # before: {"old", "new"}, and it looked complete
    # the next attempt completes: latest names it, nothing of the old one or the dead
    # attempt is left
    save(root, 2000, "new")
    folder, state = resumed(root)
    assert folder.name == "step_0002000" and state["label"] == "new"
    assert shards(folder) == {"new"}
    assert step_dirs(root) == ["step_0001900", "step_0002000"]


@pytest.mark.parametrize("die_at", range(1, 6))
def test_a_crash_anywhere_while_a_checkpoint_replaces_one_of_its_step_resumes_a_whole_one(
        tmp_path, monkeypatch, die_at):
    """Rank 0 swapping the new step_0002000 over the abandoned branch's: dying after any
    of its file operations leaves ``latest`` naming a complete checkpoint, one save's."""
    root = tmp_path / "run" / "checkpoints"
    save(root, 1900, "old")
    save(root, 2000, "old")
    _die_after_rename(monkeypatch, die_at)
    with pytest.raises(Killed):
        save(root, 2000, "new")
    monkeypatch.undo()
    folder, state = resumed(root)
    assert len(shards(folder)) == 1 and state["label"] in shards(folder)
    assert folder.name.startswith("step_0002000")
    loaded = state["label"]
    # the step's folder by name is the checkpoint the run resumed from, or refused while
    # the swap is unfinished (it was the abandoned branch's, under the right name), or
    # not there (set aside already)
    try:
        by_name = ck.resolve_resume(str(root / "step_0002000"), root)
        assert shards(by_name) == {loaded}
    except ck.ResumeError as err:
        assert "--resume auto" in str(err) or "not found" in str(err)
    # the resumed run's next save keeps it under its own name (its first prune deleted
    # it and kept the abandoned branch's step_0002000, or left none)
    save(root, 2100, "next", keep_last=5)
    kept = root / "step_0002000"
    assert shards(kept) == {loaded}
    assert json.loads((kept / ck.TRAINER_STATE).read_text())["label"] == loaded
    assert ck.resolve_resume(str(kept), root) == kept


def test_after_a_rewind_pruning_keeps_the_rewind_point_and_drops_the_abandoned_branch(
        tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (1800, 1900, 2000):
        save(root, step, "old")
    assert step_dirs(root) == ["step_0001900", "step_0002000"]
    # rewound to step 1900 (checkpoint_every 20): the abandoned step 2000 is no newer
    # than what the run has reached, and never one of the two kept
    save(root, 1920, "new")
    assert step_dirs(root) == ["step_0001900", "step_0001920"]  # before: 1920, 2000
    save(root, 1940, "new")
    assert step_dirs(root) == ["step_0001920", "step_0001940"]
    assert ck.read_latest(root) == "step_0001940"


def test_a_rewind_says_which_checkpoints_it_abandons(tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    for step in (1900, 2000):
        save(root, step, "old")
    with caplog.at_level("WARNING", logger="runtime.checkpoint"):
        assert ck.resolve_resume(str(root / "step_0001900"), root) == root / "step_0001900"
    assert "step_0002000 will be deleted" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="runtime.checkpoint"):
        ck.resolve_resume("auto", root)
        ck.resolve_resume(str(root / "step_0002000"), root)
    assert not caplog.text


def test_the_abandoned_branch_stays_until_the_new_branch_has_a_complete_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (1900, 2000):
        save(root, step, "old")
    with pytest.raises(Killed):  # the rewind's first save dies: the rewind can be undone
        save(root, 1920, "new", die_at_rank=1)
    assert ck.read_latest(root) == "step_0002000"
    assert {"step_0001900", "step_0002000"} <= set(step_dirs(root))
    save(root, 1920, "new")  # the dead attempt's staging folder goes with the old branch
    assert step_dirs(root) == ["step_0001900", "step_0001920"]


def test_resolution_never_picks_a_staging_folder(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save(root, 2, "a")
    with pytest.raises(Killed):
        save(root, 4, "b", die_at_rank=1)
    staging = next(root.glob("step_0000004.tmp-*"))
    assert (staging / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    for given in (staging, staging / "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        with pytest.raises(CheckpointPathError, match="staging folder"):
            resolve_checkpoint(given)
    (root / "latest").unlink()  # no latest: the listing names only checkpoints
    with pytest.raises(CheckpointPathError) as err:
        resolve_checkpoint(tmp_path / "run")
    assert "step_0000002" in str(err.value) and ".tmp-" not in str(err.value)


def test_side_files_land_in_the_checkpoint_before_it_is_complete(tmp_path):
    """An EMA's weights are written into the staging folder, so the published checkpoint
    holds them and no half-written step_* folder ever exists."""
    root = tmp_path / "run" / "checkpoints"
    ck.save_checkpoint(FakeEngine("a"), root, 2, {}, SHARED | {"step": 2}, DistInfo(), 2,
                       side_files={"ema.pt": {"w": 1}})
    folder = resolve_checkpoint(root).path
    assert ck.load_torch_file(folder / "ema.pt") == {"w": 1}
    assert json.loads((folder / ck.TRAINER_STATE).read_text())["step"] == 2
    assert step_dirs(root) == ["step_0000002"]


def test_the_finetune_command_says_once_what_a_rewind_abandons(tmp_path, caplog,
                                                                monkeypatch):
    # The command resolves --resume to know whether --init is needed, then the training
    # run resolves it again: the rewind's warning must come once (it came twice).
    import finetune.classification
    from finetune.engine import resume_checkpoint
    from launch.cli import main

    out = tmp_path / "run"
    for step in (1900, 2000):
        save(out / "checkpoints", step, "old")
    resolved = []

    def train(cfg, out_dir, resume=None):  # the run's own resolution, then no compute
        resolved.append(resume_checkpoint(resume, out_dir))
        return {}

    monkeypatch.setattr(finetune.classification, "train", train)
    rewind = str(out / "checkpoints" / "step_0001900")
    with caplog.at_level("WARNING", logger="runtime.checkpoint"):
        assert main(["finetune", "classification", "--output-dir", str(out),
                     "--resume", rewind]) == 0
    assert resolved == [out / "checkpoints" / "step_0001900"]
    assert caplog.text.count("step_0002000 will be deleted") == 1


# the save's renames: its rank state file (1) and trainer state (2) into the staging
# folder, then the publish's (3 onwards)
@pytest.mark.parametrize("die_at", range(3, 6))
def test_a_crash_anywhere_in_a_runs_first_publish_resumes_its_checkpoint(tmp_path,
                                                                         monkeypatch, die_at):
    """The first save's publish (nothing of the step there before): rank 0 dying after
    any of its renames leaves ``latest`` naming the complete checkpoint. Renamed into
    place before ``latest`` was written, a crash between the two left a complete
    step_0000100 and no ``latest``: --resume auto started the run afresh, silently."""
    root = tmp_path / "run" / "checkpoints"
    _die_after_rename(monkeypatch, die_at)
    with pytest.raises(Killed):
        save(root, 100, "first")
    monkeypatch.undo()
    folder, state = resumed(root)
    assert folder.name.startswith("step_0000100") and state["label"] == "first"
    assert shards(folder) == {"first"}


class DiskFullEngine(FakeEngine):
    """Rank 0's shard written, then torch's error for a full disk (the message torch
    2.x raised on a 110 MB tmpfs in a reviewer's run: it names no cause)."""

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_text(self.label)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                           "14720448 vs 14720368")


def test_a_save_that_fails_writing_says_so_and_the_next_start_takes_its_room_back(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save(root, 2, "ok")
    with pytest.raises(ck.CheckpointSaveError) as err:
        ck.save_checkpoint(DiskFullEngine("partial"), root, 4, {}, SHARED | {"step": 4},
                           DistInfo(), 2)
    message = str(err.value)
    assert message.startswith("saving step_0000004 failed (RuntimeError: [enforce fail")
    assert "GiB free in" in message and "the last checkpoint took" in message
    assert "latest still names step_0000002" in message and "--resume auto" in message
    assert ck.read_latest(root) == "step_0000002"
    [partial] = [p for p in root.glob("step_0000004*")]
    assert ck.is_staging(partial.name)
    # the resume's start (rank 0, under the run lock) deletes the failed save's folder
    assert len(ck.clear_leftovers(root)) == 1 and ck.wait_for_deletions(timeout=60)
    assert step_dirs(root) == ["step_0000002"]


class NoRoom:
    """A side file (an EMA's weights) whose write meets a full disk."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_full_disk_at_rank_0s_own_files_is_the_same_one_line(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    save(root, 2, "ok")
    with pytest.raises(ck.CheckpointSaveError, match=r"saving step_0000004 failed \(OSError: "
                       r"\[Errno 28\] No space left on device\).*latest still names "
                       r"step_0000002"):
        ck.save_checkpoint(FakeEngine("x"), root, 4, {}, SHARED | {"step": 4}, DistInfo(),
                           2, side_files={"ema.pt": NoRoom()})


@pytest.mark.parametrize("error", ["DistBackendError", "gloo"])
def test_a_collective_failure_inside_a_save_is_not_taken_for_the_disk(tmp_path, error):
    import torch.distributed as dist

    raised = {"DistBackendError": dist.DistBackendError("rank 1 timed out in all_gather"),
              # what torch 2.14's gloo raises on a rank whose peer exited
              "gloo": RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                   "Connection closed by peer [127.0.0.1]:29500")}[error]

    class LostRank(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest, client_state):
            raise raised

    with pytest.raises(type(raised)) as err:
        ck.save_checkpoint(LostRank("x"), tmp_path / "checkpoints", 2, {}, SHARED,
                           DistInfo(), 2)
    assert err.value is raised


def test_a_damaged_file_of_the_resumed_checkpoint_is_named_with_the_one_before(tmp_path):
    """engine.load_checkpoint of a checkpoint with a truncated shard (a full disk, an
    interrupted copy) raised torch's 'failed reading zip archive', naming no file."""
    import torch

    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        save(root, step, "ok")
    step_dir = root / "step_0000004"
    for rank in range(RANKS):  # DeepSpeed's files of ZeRO-3, as torch.save writes them
        for kind in ("model", "optim"):
            torch.save({"x": torch.zeros(1000)},
                       step_dir / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt")
    shard = step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated

    class Loading:
        def load_checkpoint(self, load_dir, tag):
            return torch.load(Path(load_dir) / tag / shard.name), {}

    with pytest.raises(ck.ResumeError) as err:
        ck.load_engine_checkpoint(Loading(), step_dir, rank=0)
    message = str(err.value)
    assert f"cannot load {step_dir}: {shard.name} cannot be read" in message, message
    assert f"--resume {root / 'step_0000002'}" in message
    # rank 1 opens other files: a failure there that its own files do not explain
    with pytest.raises(ck.ResumeError, match="DeepSpeed could not load .*RuntimeError"):
        ck.load_engine_checkpoint(Loading(), step_dir, rank=1)
    # the same check before the engine (check_engine_files): rank 0 refused, rank 1 not
    with pytest.raises(ck.ResumeError, match=f"{shard.name} cannot be read"):
        ck.check_engine_files(step_dir, 0)
    ck.check_engine_files(step_dir, 1)


def test_files_in_torch_s_legacy_format_are_not_taken_for_damaged(tmp_path):
    """DeepSpeed's checkpoint_serialization: false writes torch's legacy (non-zip) format,
    which cannot be memory-mapped: the pre-engine check took every such file, and the
    checkpoint before it, for damaged ones, where DeepSpeed loads them."""
    import torch

    step_dir = tmp_path / "checkpoints" / "step_0000004"
    step_dir.mkdir(parents=True)
    for kind in ("model", "optim"):
        torch.save({"x": torch.zeros(1000)},
                   step_dir / f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt",
                   _use_new_zipfile_serialization=False)
    ck.check_engine_files(step_dir, 0)
    # an empty file (a save cut at its start) is no torch file of either format
    (step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ck.ResumeError, match="optim_states.pt cannot be read .*not a torch"):
        ck.check_engine_files(step_dir, 0)


@pytest.mark.parametrize("text, why", [("[]", "not a JSON object (a list)"),
                                       ('"step_4"', "not a JSON object (a str)"),
                                       ('{"step": 4', "not JSON")])
def test_a_state_file_that_holds_no_object_is_refused_as_damaged(tmp_path, text, why):
    """A trainer state that parses but holds no object (a hand edit, a bad copy) is as
    damaged as one cut short: every reader calls ``.get`` on it, and segmentation's rank
    0 alone raised an AttributeError before a broadcast the others waited in."""
    step_dir = tmp_path / "checkpoints" / "step_0000004"
    step_dir.mkdir(parents=True)
    (step_dir / ck.TRAINER_STATE).write_text(text)
    with pytest.raises(ck.ResumeError, match=re.escape(f"trainer_state.json is damaged, {why}")):
        ck.load_trainer_state(step_dir)
