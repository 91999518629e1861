"""Fine-tuning ranks agree on what each of them looked at for itself (2 real gloo ranks).

- Each rank lists its own copy of an image-folder (or segmentation) set. A node whose copy
  lacked files computed another epoch length, so another evaluation, checkpoint and last
  step: the other ranks waited in a collective it never entered. Now every rank compares
  its listing (paths relative to the set's root, labels) and all refuse alike.
- A classification resume looked for ``ema.pt`` on each rank: a rank that did not see it
  took the branch whose EMA copy is a ZeRO-3 collective (a hang), and every rank read the
  whole file. Now rank 0 looks and reads for all (``finetune.zero.resumed_ema_state``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from tests.pretrain_utils import free_port

pytestmark = [pytest.mark.distributed]


def _copy(root: Path, skip: tuple[int, ...] = ()) -> Path:
    """A class-folder set (train/ and val/, 2 classes x 3 images), images ``skip`` of
    train/c1 left out: one node's incomplete copy (all three: a class folder still empty
    mid-sync, which torchvision's ImageFolder refuses)."""
    for split in ("train", "val"):
        for c in ("c0", "c1"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                if split != "train" or c != "c1" or i not in skip:
                    Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def _folders(rank: int, base: str) -> object:
    """Each rank builds the sets from its own node's copy (rank 1's under another mount
    point: only the paths relative to the root are compared)."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_data import build_datasets
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, [
        "data.kind=imagefolder", f"data.root={base}/node{rank}", "data.num_classes=2",
        "data.img_size=16"])
    train, val = build_datasets(cfg)
    return len(train), len(val)


def _ema(rank: int, base: str) -> object:
    """Rank 1's view of the checkpoint folder lacks ema.pt (a stale listing): it gets rank
    0's EMA all the same."""
    from finetune.zero import resumed_ema_state

    step = Path(base, "step")
    if rank == 1:
        real = Path.is_file
        Path.is_file = lambda p: False if p.name == "ema.pt" else real(p)  # (this process)
    state = resumed_ema_state(step, rank == 0)
    return {k: v.tolist() for k, v in state.items()} if state is not None else None


def _rank(rank: int, port: int, base: str, body: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {"ok": {"folders": _folders, "ema": _ema}[body](rank, base)}
    except Exception as err:  # what each rank refused with
        out = {"error": f"{type(err).__name__}: {err}"}
    Path(base, f"{body}-{rank}.json").write_text(json.dumps(out))
    # the last collective's sender may end before its receiver has read: gloo aborts the
    # receiver on the closed connection (SIGABRT, once in a few runs of the EMA case)
    dist.barrier()
    dist.destroy_process_group()


def _run(base: Path, body: str) -> list[dict]:
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(base), body)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, p.exitcode
    return [json.loads(Path(base, f"{body}-{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("incomplete", [False, True])
def test_ranks_that_listed_different_image_folders_refuse_alike(tmp_path, incomplete):
    _copy(tmp_path / "node0")
    _copy(tmp_path / "node1", skip=(2,) if incomplete else ())
    results = _run(tmp_path, "folders")
    if not incomplete:  # the same files under another mount point: agreed
        assert results == [{"ok": [6, 6]}] * 2
        return
    assert results[0] == results[1], results  # the same refusal on both ranks
    error = results[0]["error"]
    assert error.startswith("ListingMismatch: data: the ranks listed different training "
                            "sets: rank 0 6 items, rank 1 5"), error


def test_a_rank_whose_listing_raises_ends_every_rank(tmp_path):
    """One node's class folder still empty (ImageFolder raises there alone): that rank
    raises its own error and rank 0 a refusal naming it, both at once. Before, rank 1
    ended alone and rank 0 waited in the listing's all-gather until the collective
    timeout (30 minutes by default)."""
    _copy(tmp_path / "node0")
    _copy(tmp_path / "node1", skip=(0, 1, 2))
    results = _run(tmp_path, "folders")
    assert results[1]["error"].startswith("FileNotFoundError: Found no valid file for the "
                                          "classes c1"), results
    assert results[0]["error"].startswith("ListingMismatch: data: rank 1 could not list the "
                                          "training set (FileNotFoundError: Found no valid "
                                          "file"), results


def test_a_rank_that_does_not_see_ema_pt_resumes_rank_0_s_ema(tmp_path):
    import torch

    (tmp_path / "step").mkdir()
    saved = {"w": torch.arange(4.0), "b": torch.tensor([0.5])}
    torch.save(saved, tmp_path / "step" / "ema.pt")
    results = _run(tmp_path, "ema")
    want = {k: v.tolist() for k, v in saved.items()}
    assert results == [{"ok": want}, {"ok": want}], results
