"""``--init`` under several ranks: rank 0 alone reads the checkpoint, the others receive its
tensors (finetune.init.read_once), and a read that fails on rank 0 fails on every
rank instead of leaving them waiting for tensors. 2 real gloo ranks, forked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.rank_launcher import run_file_function

pytestmark = pytest.mark.distributed

ARCH = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}


def _tiny(seed: int):
    from models import build_model

    torch.manual_seed(seed)
    return build_model("internimage_t", num_classes=0, dcn_backend="reference", **ARCH)


def _worker(out_dir: str, src: str) -> None:
    import torch.distributed as dist

    import finetune.init as init
    from models import CheckpointError

    dist.init_process_group("gloo")  # env://, as torchrun sets it
    rank = dist.get_rank()
    reads = []
    real_read = init.read_backbone

    def counted(path):
        reads.append(str(path))
        if rank != 0:
            raise AssertionError(f"rank {rank} read {path} itself")
        return real_read(path)

    init.read_backbone = counted
    model = _tiny(seed=100 + rank)  # each rank starts from other weights
    record: dict = {"reads": reads}
    try:
        init.load_init(model, src, variant="internimage_t", arch=ARCH)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    except CheckpointError as err:
        record["error"] = str(err)
    except FileNotFoundError as err:  # what rank 0's own read of a missing file raises
        record["error"] = f"FileNotFoundError: {err}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    # Skip interpreter teardown: gloo's destructors occasionally abort when peers exit
    # at the same moment (as tests/test_objectives.py's workers).
    os._exit(0)


def _run(tmp_path: Path, src: Path) -> list[dict]:
    out = tmp_path / "ranks"
    out.mkdir()
    run_file_function(__file__, "_worker", 2, str(out), str(src), timeout=180)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_rank_zero_reads_the_init_and_every_rank_gets_its_weights(tmp_path):
    src = tmp_path / "backbone.pth"
    # the released layout: the state dict under 'model' (classification/utils.py)
    torch.save({"model": _tiny(seed=0).state_dict()}, src)
    records = _run(tmp_path, src)
    assert records[0]["reads"] == [str(src)] and records[1]["reads"] == []
    assert all("error" not in r for r in records), records
    want = torch.load(src)["model"]
    for rank in range(2):
        got = torch.load(tmp_path / "ranks" / f"rank{rank}.pt")
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (rank, key)


def test_a_read_failing_on_rank_zero_fails_every_rank(tmp_path):
    src = tmp_path / "missing.pth"
    records = _run(tmp_path, src)  # finishing at all: no rank waits for tensors
    assert records[1]["reads"] == []
    assert "error" in records[0] and "error" in records[1], records
    assert "rank 0 could not read it" in records[1]["error"]
    assert str(src) in records[1]["error"]
    # rank 0's own message travels to the others
    assert records[0]["error"].split(": ", 1)[-1][:40] in records[1]["error"]


def _segmenter_worker(out_dir: str, src: str) -> None:
    import torch.distributed as dist

    import finetune.seg_model as seg_model
    from finetune.seg_config import SegmentationConfig
    from launch.config import load_config
    from tests.test_finetune_segmentation import TINY

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 1:
        # what a rank reading a live run's checkpoint mid-publish may see: not a
        # segmenter (a trunk init, which would enter the rank-0 read's broadcasts alone)
        seg_model._segmenter_tag_dir = lambda path: None
        seg_model._legacy_segmenter_file = lambda path: False
    torch.manual_seed(100 + rank)
    model = seg_model.build_segmentor(load_config(SegmentationConfig, None, TINY), src)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)


def test_every_rank_takes_rank_zeros_view_of_a_whole_segmenter_init(tmp_path):
    """A stage-2 init is a whole segmenter or a trunk as rank 0 finds it: a rank whose own
    look found a trunk init (a live run's ``latest`` moving) loads the whole segmenter
    too, instead of waiting alone in a broadcast (finetune.seg_model.build_segmentor)."""
    from finetune.seg_config import SegmentationConfig
    from finetune.seg_model import build_segmentor
    from launch.config import load_config
    from tests.test_finetune_segmentation import TINY

    torch.manual_seed(0)
    want = build_segmentor(load_config(SegmentationConfig, None, TINY)).state_dict()
    src = tmp_path / "last.pt"  # a segmentation run's pre-DeepSpeed checkpoint
    torch.save({"model": want, "step": 6}, src)
    out = tmp_path / "ranks"
    out.mkdir()
    run_file_function(__file__, "_segmenter_worker", 2, str(out), str(src), timeout=180)
    for rank in range(2):
        got = torch.load(out / f"rank{rank}.pt")
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (rank, key)


def _segmenter_look_fails_worker(out_dir: str, src: str) -> None:
    import torch.distributed as dist

    import finetune.seg_model as seg_model
    from finetune.seg_config import SegmentationConfig
    from launch.config import load_config
    from models import CheckpointError
    from tests.test_finetune_segmentation import TINY

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:  # a live run's prune removed the state file between two reads, say
        def gone(path):
            raise FileNotFoundError(f"{path}/trainer_state.json")
        seg_model._segmenter_tag_dir = gone
    record = {}
    try:
        seg_model.build_segmentor(load_config(SegmentationConfig, None, TINY), src)
    except CheckpointError as err:
        record["error"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)


def test_rank_zeros_failed_look_at_a_segmenter_init_fails_every_rank(tmp_path):
    """Rank 0 alone looks at what ``--init`` is; when that look fails, every rank fails
    with its message (none waits in the broadcast of an answer that never comes)."""
    out = tmp_path / "ranks"
    out.mkdir()
    run_file_function(__file__, "_segmenter_look_fails_worker", 2, str(out),
                      str(tmp_path / "run"), timeout=180)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for record in records:
        assert "rank 0 could not tell" in record.get("error", ""), records
        assert "trainer_state.json" in record["error"]


def test_a_lone_process_s_failed_look_is_the_same_refusal(tmp_path, monkeypatch):
    """One GPU, no process group: the failed look is the CheckpointError the ranks of a job
    raise (a one-line refusal of the command), not a FileNotFoundError traceback."""
    import finetune.seg_model as seg_model
    from models import CheckpointError

    def gone(path):
        raise FileNotFoundError(f"{path}/trainer_state.json")

    monkeypatch.setattr(seg_model, "_segmenter_tag_dir", gone)
    with pytest.raises(CheckpointError, match="rank 0 could not tell.*trainer_state.json"):
        seg_model._whole_init(str(tmp_path / "run"))
    assert seg_model._whole_init(None) == (False, None)  # no --init: nothing looked at


def _agreed_init_worker(out_dir: str, src: str) -> None:
    import torch.distributed as dist

    from finetune.init import agreed_init

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # rank 1's start saw a checkpoint (published by a job still ending) and dropped --init;
    # rank 0's, a moment before, did not
    agreed = agreed_init(src if rank == 0 else None)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"init": agreed}))
    dist.barrier()
    os._exit(0)


def test_every_rank_loads_init_as_rank_zeros_start_decided(tmp_path):
    """Whether a start loads --init is decided per rank before the process group exists
    (launch/commands/finetune.py drops it where the run resumes); rank 0's decision is
    every rank's, so all enter the init's collective read or none does."""
    out = tmp_path / "ranks"
    out.mkdir()
    run_file_function(__file__, "_agreed_init_worker", 2, str(out),
                      str(tmp_path / "backbone.pth"), timeout=120)
    got = [json.loads((out / f"rank{r}.json").read_text())["init"] for r in range(2)]
    assert got == [str(tmp_path / "backbone.pth")] * 2
