"""A checkpoint saved by several real ranks (gloo): each rank writes its own state file,
no rank is sent another's state (rank 0 used to gather them all into trainer_state.json:
16.5 MB at 512 ranks), rank 0 publishes only once every rank has written its shards and
its state file, no rank waits while rank 0 deletes the checkpoint the save pruned, and the
staging folder's token is rank 0's, broadcast (runtime/checkpoint.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.pretrain_utils import free_port

pytestmark = [pytest.mark.distributed]

WORLD = 2


class SlowEngine:
    """Writes this rank's DeepSpeed-style shard file, rank 1 late (after rank 0 is done)."""
    device = "cpu"  # where a rank's collectives put their tensors (DeepSpeedEngine.device)

    def __init__(self, rank: int):
        self.rank = rank

    def zero_optimization(self) -> bool:
        return False

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        if self.rank == 1:
            time.sleep(1.0)
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt").write_text("x")


def _save_on_rank(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import shutil

    import runtime.checkpoint as ck
    from runtime.dist import DistInfo

    # what this rank is handed by the object collectives (their output lists), and how
    # often each is called
    received: list = []
    calls = {"all_gather_object": 0, "gather_object": 0, "broadcast_object_list": 0}

    def spy(name):
        real = getattr(dist, name)

        def call(*args, **kwargs):
            calls[name] += 1
            real(*args, **kwargs)
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, list):
                    received.extend(x for x in arg if isinstance(x, dict))
        return call

    for name in calls:
        setattr(dist, name, spy(name))
    info = DistInfo(rank=rank, world_size=WORLD)
    local = {"rank": rank, "rng": f"rank {rank}'s generators"}
    ck.save_checkpoint(SlowEngine(rank), Path(root), 2, local, {"step": 2, "world_size": WORLD},
                       info, keep_last=1)
    # what rank 0 found in the staging folder when it published
    publish = ck._publish

    def spy_publish(root_dir, staging, tag):
        folder = Path(root_dir) / staging
        Path(out, "at_publish.json").write_text(json.dumps(sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())))
        return publish(root_dir, staging, tag)

    ck._publish = spy_publish
    if rank == 0:  # a Lustre unlinking step 2's files: done when the test says so
        real = shutil.rmtree

        def slow(path, *args, **kwargs):
            Path(out, "deleting").touch()
            _wait_for([Path(out, "release")], 180)
            real(path, *args, **kwargs)

        ck.shutil.rmtree = slow
    ck.save_checkpoint(SlowEngine(rank), Path(root), 3, local,
                       {"step": 3, "world_size": WORLD}, info, keep_last=1)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"received": received} | calls))
    if rank == 0:
        ck.wait_for_deletions()
    dist.barrier()
    # Skip interpreter teardown: gloo's destructors occasionally abort when peers exit at
    # the same moment (as in tests/test_objectives.py).
    os._exit(0)


def _wait_for(paths: list[Path], timeout: float) -> bool:
    """Until every one of ``paths`` exists (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_each_rank_writes_its_own_state_file_and_none_waits_for_rank_0s_deletion(tmp_path):
    root, out = tmp_path / "checkpoints", tmp_path / "out"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_save_on_rank, args=(r, port, str(root), str(out)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        _wait_for([out / "deleting"], 120)  # rank 0's deletion began (and blocks)
        # before: rank 0 deleted step 2 between the two barriers; every rank waited for it
        returned = [out / f"rank{r}.json" for r in range(WORLD)]
        assert _wait_for(returned, 30), "a save waited for rank 0's deletion"
        assert sorted(p.name for p in root.glob("step_*")) == ["step_0000003"]
    finally:
        (out / "release").touch()
        for p in procs:
            p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORLD
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003"]
    states = [{"rank": r, "rng": f"rank {r}'s generators"} for r in range(WORLD)]
    folder = root / "step_0000003"
    assert (root / "latest").read_text() == "step_0000003"
    # the shared state only, with how many rank files there are and when rank 0 wrote it
    shared = json.loads((folder / "trainer_state.json").read_text())
    assert 0 < time.time() - shared.pop("saved_at") < 300
    assert shared == {"step": 3, "world_size": WORLD, "rank_states": WORLD}
    for r in range(WORLD):
        assert json.loads((folder / "rank_states" / f"{r:05d}.json").read_text()) == states[r]
    # rank 1 wrote its shard and its state a second after rank 0 was ready: the barrier
    # held rank 0, which found every rank's files there when it published
    assert json.loads((out / "at_publish.json").read_text()) == [
        *(f"rank_states/{r:05d}.json" for r in range(WORLD)), "trainer_state.json",
        *(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(WORLD))]
    # no rank was handed a rank's state by an object collective (rank 0 was sent all 512
    # at every save, ~32 KB each); two broadcasts a save (of the two saves here): the
    # staging token, no all-gather (every rank's token to every rank: 512 strings received
    # by each of 512 ranks), and rank 0's outcome (None, or its refusal)
    for r in range(WORLD):
        assert json.loads((out / f"rank{r}.json").read_text()) == {
            "received": [], "all_gather_object": 0, "gather_object": 0,
            "broadcast_object_list": 4}


def _save_at_own_step(rank: int, port: int, root: str, out: str) -> None:
    """Rank 1 saves one step ahead of rank 0 (ranks that resumed different checkpoints)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import runtime.checkpoint as ck
    from runtime.dist import DistInfo

    step = 4 + rank
    try:
        ck.save_checkpoint(SlowEngine(rank), Path(root), step, {}, {"step": step},
                           DistInfo(rank=rank, world_size=WORLD), keep_last=1)
        outcome = "saved"
    except ck.CheckpointSaveError as err:
        outcome = str(err)
    Path(out, f"rank{rank}.txt").write_text(outcome)
    dist.barrier()
    os._exit(0)


def test_ranks_at_different_steps_save_nothing_and_every_rank_says_why(tmp_path):
    """DeepSpeed checks the tag of a save over the ranks (``checkpoint.tag_validation``)
    with an ``assert`` (deepspeed/runtime/engine.py, ``_checkpoint_tag_validation``):
    gone under ``python -O``, where each rank wrote into its own folder and rank 0
    published a checkpoint holding its files alone. Every rank refuses, before any write,
    and ``latest`` still names the checkpoint before."""
    root, out = tmp_path / "checkpoints", tmp_path / "out"
    (root / "step_0000002").mkdir(parents=True)
    (root / "latest").write_text("step_0000002")
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_save_at_own_step, args=(r, port, str(root), str(out)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORLD
    said = [(out / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert all("the ranks are at different steps (rank 0 at step 4" in s for s in said), said
    assert "this rank is at step 5" in said[1] and "this rank is at" not in said[0]
    assert all("latest still names step_0000002" in s for s in said), said
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    assert (root / "latest").read_text() == "step_0000002"
