"""Every rank deals from the same shard lists, or none starts (data/loader.py
``check_same_lists``).

Each rank expands its ``.txt`` shard lists itself. A list rewritten while a job's ranks
start (shards appended by an ingestion job), or nodes that see different copies of it,
made ranks deal the epochs over different unit counts: some shards read by two slots and
others by none, silently, until a resume refused the changed list. Two real gloo ranks
here, rank 1's list holding one shard more: both refuse with the same line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from s3_server import good_samples, write_tar

from tests.pretrain_utils import free_port

pytestmark = [pytest.mark.distributed]


def _pretrain_start(rank: int, root: str, other_numpy: bool) -> None:
    """Pre-training's loader (pretrain/data), rank 1's node seeing a list with one shard
    more, or, with ``other_numpy``, the same list on a numpy that permutes otherwise."""
    from data.config import S3Config
    from pretrain.data import DataConfig, SourceConfig, build_loader
    from runtime.dist import all_gather_objects

    shards = sorted(Path(root).glob("s*.tar"))
    listed = Path(root, f"seen-by-rank{rank}.txt")  # what this rank's node sees of the list
    listed.write_text("".join(f"{s}\n" for s in shards[:3 + (0 if other_numpy else rank)]))
    cfg = DataConfig(sources=[SourceConfig("laion", str(listed))], image_size=8, batch_size=1,
                     workers=0, shuffle_buffer=0, context_length=8, seed=1,
                     s3=S3Config(prefetch_bytes=0))
    loader = build_loader(cfg, rank, 2)
    if other_numpy and rank == 1:  # what a node image with another numpy records
        loader._state.permutations = ["9.9.9", "0123456789abcdef"]
    loader.check_same_lists(all_gather_objects)


def _stream_start(rank: int, root: str, other_numpy: bool) -> None:
    """Streamed classification's start (finetune/cls_stream.py StreamingShards), rank 1's
    node seeing a list with one shard more."""
    from finetune.cls_stream import StreamingShards

    shards = sorted(Path(root).glob("s*.tar"))
    listed = Path(root, f"cls-seen-by-rank{rank}.txt")
    listed.write_text("".join(f"{s}\n" for s in shards[:3 + rank]))
    StreamingShards([str(listed)], lambda img: img, num_samples=8, batch_size=2,
                    rank=rank, world=2)


STARTS = {"pretrain": _pretrain_start, "stream": _stream_start}


def _rank(rank: int, port: int, root: str, start: str, other_numpy: bool) -> None:
    """One gloo rank: its start's outcome (started, or the error) into ``rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        STARTS[start](rank, root, other_numpy)
        outcome = {"started": True}
    except Exception as err:  # noqa: BLE001 - recorded for the test
        outcome = {"type": type(err).__name__, "message": str(err)}
    Path(root, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.barrier()
    os._exit(0)


def _outcomes(root: Path, start: str = "pretrain", other_numpy: bool = False) -> list[dict]:
    for i in range(4):
        write_tar(root / f"s{i}.tar", good_samples(f"s{i}-", 2, size=8))
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(root), start, other_numpy))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_that_expanded_different_shard_lists_refuse_together(tmp_path):
    outcomes = _outcomes(tmp_path)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0]["type"] == "StorageAccessError"
    message = outcomes[0]["message"]
    assert message.startswith("data source 'laion': the ranks read different shard lists: "
                              "rank 0 lists 3 shards"), message
    assert "rank 1 4 (" in message and "1 of 2 ranks differ" in message



def test_ranks_on_numpys_that_permute_differently_refuse_together(tmp_path):
    """numpy keeps PCG64's stream stable, not Generator.permutation's algorithm (NEP 19):
    nodes on two numpy versions would deal other orders of one list."""
    outcomes = _outcomes(tmp_path, other_numpy=True)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0]["type"] == "StorageAccessError"
    assert "rank 1 numpy 9.9.9" in outcomes[0]["message"]


def test_streamed_classification_ranks_with_different_lists_refuse_together(tmp_path):
    """The same check where streamed classification builds its loader."""
    outcomes = _outcomes(tmp_path, "stream")
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0]["type"] == "StorageAccessError"
    assert "the ranks read different shard lists: rank 0 lists 3 shards" in (
        outcomes[0]["message"])
