"""A checkpoint ``latest`` names is on disk, not in a node's cache (runtime/checkpoint.py):
every file of it was fsynced, by the rank that wrote it, before rank 0 wrote
``trainer_state.json``; the folder renames and ``latest`` reach the disk too.

Why it matters: DeepSpeed's ``TorchCheckpointEngine.save`` is a bare ``torch.save``
(deepspeed 0.19.8, deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py), which
does not fsync; a node crash seconds after ``latest`` was written (a SLURM NODE_FAIL
restart) would otherwise resume truncated shards. On a parallel filesystem an fsync
flushes the calling client's cache only, so each rank must fsync its own files.

Run as a script (``python tests/test_checkpoint_fsync.py OUT``) this file is one rank;
the fixture runs 2, forked from tests/rank_launcher.py's forkserver. Each saves a real
DeepSpeed engine through ``save_checkpoint`` at ZeRO-3 in bf16 (pre-training's
layout: two files a rank), ZeRO-1 in bf16 and ZeRO-0 in fp32 (rank 0's
``mp_rank_00_model_states.pt``), recording every ``os.fsync`` (the path its descriptor
names), every ``os.replace`` and every ``torch.save`` (which file DeepSpeed wrote on which
rank: the outside truth of who wrote what), with the time (CLOCK_MONOTONIC: one clock for
all the processes of the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [(3, "bf16"), (1, "bf16"), (0, "fp32")]
WORLD = 2


def _rank_main(out_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch
    from torch import nn

    import runtime.checkpoint as ck
    from runtime.dist import init_distributed
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    info = init_distributed()
    events: list[list] = []  # [kind, monotonic ns, path(s)]

    def now() -> int:
        return time.monotonic_ns()

    real_fsync, real_replace, real_save = os.fsync, os.replace, torch.save
    real_trainer_state = ck.write_trainer_state

    def fsync(fd):
        events.append(["fsync", now(), os.readlink(f"/proc/self/fd/{fd}")])
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        events.append(["replace", now(), os.path.abspath(src), os.path.abspath(dst)])

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            events.append(["torch.save", now(), os.path.abspath(f)])

    def trainer_state(ckpt_dir, state):
        events.append(["trainer_state", now(), str(ckpt_dir)])
        return real_trainer_state(ckpt_dir, state)

    os.fsync, os.replace, torch.save = fsync, replace, save
    ck.write_trainer_state = trainer_state
    for stage, precision in LAYOUTS:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        engine, *_ = deepspeed.initialize(
            model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4),
            config=deepspeed_config(DeepSpeedSpec(micro_batch=2, zero_stage=stage,
                                                  precision=precision)),
            dist_init_required=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        loss = engine(torch.randn(2, 8, dtype=dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        root = Path(out_dir, f"zero{stage}_{precision}", "checkpoints")
        events.clear()
        ck.save_checkpoint(engine, root, 1, {"rank": info.rank}, {"step": 1}, info,
                           keep_last=2)
        Path(root.parent, f"events{info.rank}.json").write_text(json.dumps(events))


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> Path:
    from tests.rank_launcher import run_file_function

    out = tmp_path_factory.mktemp("fsync")
    run_file_function(__file__, "_rank_main", WORLD, str(out), timeout=300)
    return out


def _final(path: str) -> str:
    """A path as it is once the save is published: the staging folder under its step's
    name, a temporary file (``.name.tmp``, renamed over ``name``) under its own."""
    path = re.sub(r"(step_\d+)\.tmp-[0-9a-f]+", r"\1", path)
    return re.sub(r"/\.([^/]+)\.tmp$", r"/\1", path)


@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "precision"), LAYOUTS)
def test_every_file_of_a_checkpoint_is_fsynced_by_its_writer_before_it_is_published(
        saves, stage, precision):
    run = saves / f"zero{stage}_{precision}"
    root = run / "checkpoints"
    folder = root / "step_0000001"
    events = {r: json.loads((run / f"events{r}.json").read_text()) for r in range(WORLD)}
    published = min(t for kind, t, *_ in events[0] if kind == "trainer_state")
    fsynced: dict[int, dict[str, int]] = {r: {} for r in range(WORLD)}  # path: first
    for r in range(WORLD):
        for kind, t, *paths in events[r]:
            if kind == "fsync":
                fsynced[r].setdefault(_final(paths[0]), t)
    # who wrote each of DeepSpeed's files: the rank whose torch.save wrote it
    writers = {_final(e[2]): r for r in range(WORLD) for e in events[r]
               if e[0] == "torch.save"}
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    deepspeed = [f for f in files if f.endswith(".pt")]
    assert deepspeed and set(deepspeed) <= set(writers), (deepspeed, writers)
    for f in files:
        if f in writers:
            writer = writers[f]
        elif f.startswith(f"{folder}/rank_states/"):  # each rank's own state file
            writer = int(Path(f).stem)
        else:
            assert f == f"{folder}/trainer_state.json", f
            continue
        assert f in fsynced[writer], f"{f} (written by rank {writer}) never fsynced by it"
        assert fsynced[writer][f] < published, f"{f} fsynced after trainer_state.json"
        # and the folder holding its name, by the same rank, before the publish
        assert fsynced[writer].get(str(Path(f).parent), published) < published, f
    if stage == 3:  # each rank wrote its own model and optimizer states
        assert sorted(writers.values()) == [0, 0, 1, 1]
    # rank 0: trainer_state.json and latest fsynced, and checkpoints/ after the rename of
    # the staging folder into place (which a node crash would otherwise undo)
    renamed = max(e[1] for e in events[0] if e[0] == "replace" and e[3] == str(folder))
    last_root_fsync = max(e[1] for e in events[0] if e[0] == "fsync" and e[2] == str(root))
    assert renamed < last_root_fsync
    # and the run directory, which the first save created checkpoints/ in
    assert any(e[0] == "fsync" and e[2] == str(run) and e[1] > renamed for e in events[0])
    assert f"{folder}/trainer_state.json" in fsynced[0] and f"{root}/latest" in fsynced[0]
    assert (root / "latest").read_text() == "step_0000001"


def test_a_side_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    """``save_torch_file`` (fine-tuning's EMA weights in a checkpoint): the file and the
    folder its rename is in reach the disk before it returns."""
    import runtime.checkpoint as ck

    seen: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(
        os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    ck.save_torch_file(tmp_path / "ckpt" / "ema.pt", {"w": 1})
    assert ck.load_torch_file(tmp_path / "ckpt" / "ema.pt") == {"w": 1}
    assert [_final(p) for p in seen] == [str(tmp_path / "ckpt" / "ema.pt"),
                                        str(tmp_path / "ckpt")]


def test_folders_set_aside_are_renamed_durably_before_their_deletion_starts(tmp_path,
                                                                             monkeypatch):
    """A prune renames each folder that goes to a garbage name, then a thread deletes it:
    the renames are fsynced (checkpoints/) before any unlink, so a node crash mid-deletion
    never brings a half-deleted folder back under its ``step_*`` name, where its
    trainer_state.json, if not yet unlinked, would make it look complete."""
    import runtime.checkpoint as ck

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / ck.tag_for(step)).mkdir(parents=True)
        (root / ck.tag_for(step) / ck.TRAINER_STATE).write_text("{}")
    (root / ck.LATEST).write_text(ck.tag_for(3))
    order: list[str] = []
    lock = threading.Lock()
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(fd):
        with lock:
            order.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        return real_fsync(fd)

    def rmtree(path, *args, **kwargs):
        with lock:
            order.append("rmtree")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ck.prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == [ck.LATEST, ck.tag_for(3)]
    assert "rmtree" in order
    assert f"fsync {root}" in order[:order.index("rmtree")], order


if __name__ == "__main__":
    _rank_main(sys.argv[1])
