"""Deleting old checkpoints off the critical path (runtime/checkpoint.py): rank 0 renames
each folder that goes to a garbage name and a background thread deletes it, so a save
returns while the files are still being unlinked; a deletion cut short leaves garbage that
nothing resolves as a checkpoint and the next prune finishes. On two real ranks (the second
barrier lets rank 1 go while rank 0 deletes; the staging token broadcast):
tests/test_checkpoint_ranks.py."""

from __future__ import annotations

import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

import runtime.checkpoint as ck
from runtime.checkpoint_path import CheckpointPathError, is_staging, resolve_checkpoint
from runtime.dist import DistInfo, broadcast_object

SHARED = {"model_hash": "h", "world_size": 1}
SHARDS = 4  # DeepSpeed files per checkpoint (one per rank at 512 ranks: ~1,024)


class Engine:
    """Writes DeepSpeed-style shard files holding ``label`` (``ranks``: whose shards)."""
    device = "cpu"  # where a rank's collectives put their tensors (DeepSpeedEngine.device)

    def __init__(self, label: str = "x", ranks: range = range(SHARDS)):
        self.label, self.ranks = label, ranks

    def zero_optimization(self) -> bool:  # asked by runtime.master_weights.master_names
        return False

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        for rank in self.ranks:
            (folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_text(self.label)


def save(root: Path, step: int, label: str = "x", keep_last: int = 2, world: int = 1) -> None:
    """Rank 0's save (of ``world`` ranks: the others' barriers return at once here)."""
    ck.save_checkpoint(Engine(label), root, step, {}, SHARED | {"step": step, "label": label},
                       DistInfo(world_size=world), keep_last)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


class BlockedRmtree:
    """``shutil.rmtree`` that waits for ``release`` before deleting (a slow Lustre)."""

    def __init__(self):
        self.real = shutil.rmtree
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, path, *args, **kwargs):
        self.entered.set()
        self.release.wait(timeout=60)
        return self.real(path, *args, **kwargs)


@pytest.fixture(autouse=True)
def _deletions_done():
    """No test leaves the deletion thread running (a non-daemon thread: pytest's exit
    would wait for it)."""
    yield
    assert ck.wait_for_deletions(timeout=60)


def _save_in_thread(root: Path, step: int, label: str = "x",
                    world: int = 1) -> threading.Thread:
    thread = threading.Thread(target=save, args=(root, step, label), kwargs={"world": world})
    thread.start()
    return thread


def test_a_save_returns_while_the_pruned_checkpoint_is_still_being_deleted(tmp_path,
                                                                          monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    save(root, 1)
    save(root, 2)
    rmtree = BlockedRmtree()
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    saving = _save_in_thread(root, 3)
    try:
        saving.join(timeout=10)
        # before: rank 0 deleted step 1 inside save_checkpoint, before the second barrier
        assert not saving.is_alive(), "save_checkpoint waited for the deletion"
        assert rmtree.entered.wait(timeout=10)  # the deletion is under way, blocked
        [garbage] = [n for n in names(root) if ck.is_garbage(n)]
        assert garbage.endswith("-step_0000001")
        assert (root / garbage / "trainer_state.json").is_file()  # not deleted yet
        assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000003"]
        assert ck.read_latest(root) == "step_0000003"
        assert ck.open_resume("auto", root, "h", 1)[0] == root / "step_0000003"
    finally:
        rmtree.release.set()
        saving.join(timeout=60)
    assert ck.wait_for_deletions(timeout=60)
    assert names(root) == ["latest", "step_0000002", "step_0000003"]


def test_a_same_step_checkpoint_swapped_out_after_a_rewind_is_deleted_in_the_background(
        tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    save(root, 1900, "old")
    save(root, 2000, "old")
    rmtree = BlockedRmtree()
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    saving = _save_in_thread(root, 2000, "new")  # rewound to 1900, saved 2000 again
    try:
        saving.join(timeout=10)
        assert not saving.is_alive(), "save_checkpoint waited for the deletion"
        folder, state = ck.open_resume("auto", root, "h", 1)
        assert folder == root / "step_0002000" and state["label"] == "new"
        assert {p.read_text() for p in folder.glob("*_model_states.pt")} == {"new"}
    finally:
        rmtree.release.set()
        saving.join(timeout=60)
    assert ck.wait_for_deletions(timeout=60)
    assert names(root) == ["latest", "step_0001900", "step_0002000"]


def test_a_deletion_cut_short_is_never_resumed_and_the_next_prune_finishes_it(tmp_path,
                                                                            monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    save(root, 1)
    save(root, 2)
    real = shutil.rmtree

    def dies_halfway(path, *args, **kwargs):  # what a kill mid-deletion leaves on disk
        for shard in sorted(Path(path).glob("*_model_states.pt"))[:SHARDS // 2]:
            shard.unlink()

    monkeypatch.setattr(ck.shutil, "rmtree", dies_halfway)
    save(root, 3)
    assert ck.wait_for_deletions(timeout=60)
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    # before: step_0000001 was left half-deleted under its own name, trainer_state.json
    # and all (it looked complete)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000003"]
    [garbage] = [root / n for n in names(root) if ck.is_garbage(n)]
    assert (garbage / "trainer_state.json").is_file()
    # an abandoned branch's newer checkpoint whose deletion died before it began
    newer = root / f"{ck.DELETING}0badc0de-step_0000009"
    shutil.copytree(root / "step_0000003", newer)
    for left in (garbage, newer):
        assert is_staging(left.name) and ck._step_of(left.name) is None
        for given in (left, left / "zero_pp_rank_3_mp_rank_00_model_states.pt"):
            with pytest.raises(CheckpointPathError, match="staging folder"):
                resolve_checkpoint(given)
    assert ck.open_resume("auto", root, "h", 1)[0] == root / "step_0000003"
    assert resolve_checkpoint(root.parent).path == root / "step_0000003"
    (root / "latest").unlink()  # without latest: the listing names only checkpoints
    with pytest.raises(CheckpointPathError) as err:
        resolve_checkpoint(root.parent)
    assert "step_0000003" in str(err.value) and "deleting" not in str(err.value)
    assert ck.resolve_resume("auto", root) is None
    # no lineage known (no latest): garbage goes all the same, checkpoints stay
    ck.prune(root, keep_last=2)
    assert names(root) == ["step_0000002", "step_0000003"]
    (root / "latest").write_text("step_0000003")
    shutil.copytree(root / "step_0000002", root / f"{ck.DELETING}0badc0de-step_0000002")
    save(root, 4)  # the next save's prune finishes what was left
    assert ck.wait_for_deletions(timeout=60)
    assert names(root) == ["latest", "step_0000003", "step_0000004"]


def _saves_then_exits(root: str) -> None:
    """Three saves keeping one, each deletion slow; then the process ends normally."""
    real = shutil.rmtree

    def slow(path, *args, **kwargs):
        time.sleep(0.5)
        real(path, *args, **kwargs)

    ck.shutil.rmtree = slow
    for step in (1, 2, 3):
        ck.save_checkpoint(Engine(), Path(root), step, {}, {"step": step}, DistInfo(), 1)


def test_a_normal_exit_finishes_the_deletions_already_decided(tmp_path):
    """The deletion thread is no daemon: the process ends once it is done (not before,
    leaving a checkpoint's 13 GB behind; not never). A fresh interpreter that ends as a
    training command does (a forked pytest worker inherits its threads and locks: under
    load one such child never ended)."""
    import subprocess
    import sys

    from tests.pretrain_utils import REPO

    root = tmp_path / "checkpoints"
    code = ("import sys; from tests.test_checkpoint_prune import _saves_then_exits; "
            "_saves_then_exits(sys.argv[1])")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert names(root) == ["latest", "step_0000003"]
    assert took >= 1.0  # it waited for the deletions (0.5 s each, the last after the run)


def test_broadcast_object_without_a_process_group_is_the_object():
    assert broadcast_object("a1b2c3d4") == "a1b2c3d4"


def test_a_save_waits_for_the_previous_saves_deletions_so_they_never_pile_up(tmp_path,
                                                                           monkeypatch):
    """A filesystem that cannot delete a checkpoint before the next save: that save waits
    for it (as every save did before deletions left the critical path). Without the wait,
    six saves behind a stuck delete left six whole checkpoints set aside on disk."""
    root = tmp_path / "run" / "checkpoints"
    save(root, 1)
    save(root, 2)
    rmtree = BlockedRmtree()
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    # a lone rank waits however short the collective timeout: nobody waits for it
    monkeypatch.setattr(ck, "group_timeout", lambda: timedelta(seconds=1))
    first = _save_in_thread(root, 3)  # sets step 1 aside: its deletion blocks
    first.join(timeout=10)
    assert not first.is_alive() and rmtree.entered.wait(timeout=10)
    second = _save_in_thread(root, 4)
    try:
        second.join(timeout=2)
        assert second.is_alive(), "a save set more aside while the last was not deleted"
        # published before it waits: a save cut short in the wait has lost nothing
        assert ck.read_latest(root) == "step_0000004"
        assert len([n for n in names(root) if ck.is_garbage(n)]) == 1
    finally:
        rmtree.release.set()
        second.join(timeout=60)
    assert ck.wait_for_deletions(timeout=60)
    assert names(root) == ["latest", "step_0000003", "step_0000004"]


def test_the_wait_for_deletions_ends_before_the_other_ranks_collective_timeout(
        tmp_path, monkeypatch, caplog):
    """The other ranks wait in the save's last barrier while rank 0 waits for a slow
    deletion; a wait past the collective timeout would fail them and end the run. Rank 0
    waits until they have waited half of it, then saves on with the deletion still queued
    (and says so)."""
    root = tmp_path / "run" / "checkpoints"
    save(root, 1, world=2)
    save(root, 2, world=2)
    rmtree = BlockedRmtree()
    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    monkeypatch.setattr(ck, "group_timeout", lambda: timedelta(seconds=2))
    first = _save_in_thread(root, 3, world=2)  # sets step 1 aside: its deletion blocks
    first.join(timeout=10)
    assert not first.is_alive() and rmtree.entered.wait(timeout=10)
    second = _save_in_thread(root, 4, world=2)
    try:
        second.join(timeout=20)
        assert not second.is_alive(), "rank 0 waited past the collective timeout"
        assert ck.read_latest(root) == "step_0000004"
        # both set aside, the first still blocked: the deletions are only queued
        assert len([n for n in names(root) if ck.is_garbage(n)]) == 2
        assert "goes on without it" in caplog.text
    finally:
        rmtree.release.set()
        second.join(timeout=60)
    assert ck.wait_for_deletions(timeout=60)
    assert names(root) == ["latest", "step_0000003", "step_0000004"]


def _fork_during_a_deletion(tmp: str) -> None:
    """In a fresh interpreter (a forked pytest worker carries other tests' threads and
    state): a deletion blocked in this process's thread, then a forked child that saves
    and prunes; exits 0 once the child has, 3 if the child never ends."""
    import multiprocessing

    parent_root, child_root = Path(tmp) / "parent", Path(tmp) / "child"
    for root in (parent_root, child_root):
        save(root, 1)
        save(root, 2)
    rmtree = BlockedRmtree()
    ck.shutil.rmtree = rmtree
    save(parent_root, 3)  # its deletion blocks in this process's thread
    assert rmtree.entered.wait(timeout=10)
    ck.shutil.rmtree = rmtree.real  # the child deletes freely

    def child_saves() -> None:
        save(child_root, 3, keep_last=1)
        ck.wait_for_deletions(timeout=30)

    child = multiprocessing.get_context("fork").Process(target=child_saves)
    child.start()
    child.join(timeout=60)
    code = 0 if child.exitcode == 0 else 3
    if child.exitcode is None:  # waiting for ever for a thread it does not have
        child.kill()
    rmtree.release.set()
    assert names(child_root) == ["latest", "step_0000003"] or code
    os._exit(code)


def test_a_process_forked_while_a_deletion_runs_saves_and_prunes_on_its_own(tmp_path):
    """A process forked while its parent's deletion thread works (a launcher forking
    after a save) has no such thread: it used to take the parent's for its own, queue
    behind it, and wait for ever at its next save."""
    import subprocess
    import sys

    from tests.pretrain_utils import REPO

    code = ("import sys; from tests.test_checkpoint_prune import _fork_during_a_deletion; "
            "_fork_during_a_deletion(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
