"""The wording of what a resume on another world size says: the counts data/redeal.py
takes out of the totals are named when there are any, not printed as ``[]``; a refusal
naming one rank says "1 rank", not "1 ranks" (pretrain/resize.py, runtime/checkpoint.py)."""

from __future__ import annotations

import logging

import pytest

from data.redeal import SourceSpec, resized_state
from data.state import PipelineState, url_list_digest
from data.stream import SourceCursor

SEED = 7


def _saved(specs: list[SourceSpec], skips: list[list]) -> list[dict]:
    """2 old ranks x 1 worker, each one unit into epoch 0, its block's skips ``skips``."""
    saved = []
    for rank in range(2):
        position = {"block": 1, "emitted": 3, "draws": 1, "index": 1, "lead": None,
                    "sources": [SourceCursor(epoch=0, position=1).to_dict() for _ in specs],
                    "skips": skips}
        saved.append(PipelineState(SEED, rank, 2, 1, [s.name for s in specs],
                                   positions={0: position},
                                   shard_lists=[url_list_digest(s.urls) for s in specs]
                                   ).to_dict())
    return saved


def _repeated_line(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if "samples repeated" in r.getMessage()]
    return line


def test_resize_without_recounted_skips_prints_no_empty_list(caplog):
    specs = [SourceSpec("a", [f"s3://b/a{i}.tar" for i in range(8)])]
    with caplog.at_level(logging.WARNING, logger="data.redeal"):
        resized_state(_saved(specs, []), specs, 0, 1, 1, SEED)
    line = _repeated_line(caplog)
    assert line == ("data: 6 samples repeated across the change (handed out from the old "
                    "workers' current shuffle blocks, which are read again)")


def test_resize_names_the_counts_taken_out_of_the_totals(caplog):
    specs = [SourceSpec("a", [f"s3://b/a{i}.tar" for i in range(8)])]
    with caplog.at_level(logging.WARNING, logger="data.redeal"):
        resized_state(_saved(specs, [["a", "decode_error", 2]]), specs, 0, 1, 1, SEED)
    assert _repeated_line(caplog).endswith(
        "which are read again; what they counted there (a decode_error: 4) is taken out of "
        "the totals, to be counted again)")


def test_refusals_say_one_rank_not_one_ranks(tmp_path):
    """A checkpoint saved by one rank: "resume with 1 rank" (it said "1 ranks")."""
    from pretrain.resize import check_resize
    from runtime.checkpoint import ResumeError, check_compatible, load_rank_state

    state = {"world_size": 1, "model_hash": "h", "rank_states": 1}
    with pytest.raises(ResumeError) as err:
        check_resize(state, 2, tmp_path, image_branch=True)
    assert str(err.value).endswith("resume with 1 rank")
    with pytest.raises(ResumeError) as err:
        check_compatible(state, "h", 2, tmp_path)
    assert "saved by 1 rank, this run has 2" in str(err.value)
    assert "resume with 1 rank," in str(err.value)
    with pytest.raises(ResumeError, match=r"missing \(saved by 1 rank\)"):
        load_rank_state(tmp_path, state, 0)
    with pytest.raises(ResumeError, match="resume with 2 ranks$"):
        check_resize(state | {"world_size": 2}, 1, tmp_path, image_branch=True)
