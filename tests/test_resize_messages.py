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
    from runtime.checkpoint import ResumeError, check_compatible, load_rank_state

    state = {"world_size": 1, "model_hash": "h", "rank_states": 1}
    with pytest.raises(ResumeError) as err:
        check_compatible(state, "h", 2, tmp_path)
    assert "saved by 1 rank, this run has 2" in str(err.value)
    assert "resume with 1 rank," in str(err.value)
    with pytest.raises(ResumeError, match=r"missing \(saved by 1 rank\)"):
        load_rank_state(tmp_path, state, 0)
    with pytest.raises(ResumeError, match="resume with 2 ranks,"):
        check_compatible(state | {"world_size": 2}, "h", 1, tmp_path)


def test_a_checkpoint_of_another_task_is_named_before_its_engine_or_model(tmp_path):
    """Each task's resume names the task a checkpoint was saved by (fine-tuning records
    ``task``; a pre-training state has none) before its ZeRO stage or model hash, whose
    advice misled; and how to go on: --init, or the command that resumes it."""
    from runtime.checkpoint import ResumeError, check_compatible

    # pre-training records no task, but always its samples_seen (pretrain/trainer.py)
    pretrain = {"world_size": 1, "model_hash": "p", "samples_seen": {},
                "engine": {"zero_stage": 3, "precision": "bf16"}}
    detection = {"world_size": 1, "model_hash": "d", "task": "detection",
                 "engine": {"zero_stage": 0, "precision": "fp32"}}
    cls_engine = {"zero_stage": 0, "precision": "fp32"}
    cases = [
        (pretrain, "classification", cls_engine,
         "is a checkpoint of a pre-training run, this is a classification run: to fine-tune "
         f"from its weights give it as --init (internimage finetune classification --init "
         f"{tmp_path}), not --resume"),
        (detection, "segmentation", cls_engine,
         "is a checkpoint of a detection run, this is a segmentation run: to fine-tune from "
         f"its backbone give it as --init (internimage finetune segmentation --init "
         f"{tmp_path}), or resume it with `internimage finetune detection --resume`"),
        (detection, "pretrain", {"zero_stage": 3, "precision": "bf16"},
         "is a checkpoint of a detection run, this is a pre-training run: resume it with "
         "`internimage finetune detection --resume`; pre-training resumes its own runs only"),
    ]
    for state, task, engine, message in cases:
        with pytest.raises(ResumeError) as err:
            check_compatible(state, "other", 1, tmp_path, engine=engine, task=task)
        assert str(err.value) == f"{tmp_path} {message}", str(err.value)
    # a classification state saved before ``task`` was kept (nor samples_seen): not taken
    # for pre-training's; its own task goes on to the model check
    old_classification = {"world_size": 1, "model_hash": "c", "batch": 32}
    with pytest.raises(ResumeError, match="different model"):
        check_compatible(old_classification, "other", 1, tmp_path, task="classification")
    with pytest.raises(ResumeError, match="is a checkpoint of a classification run, this is "
                       "a segmentation run"):
        check_compatible(old_classification, "other", 1, tmp_path, task="segmentation")
    # its own task: on to the engine's checks, with the task's own key
    with pytest.raises(ResumeError, match=r"resume with run\.zero_stage=0 as in the run's "
                       r"config\.yaml, or convert it \(internimage convert\) and --init"):
        check_compatible(detection, "d", 1, tmp_path, engine={"zero_stage": 3,
                                                              "precision": "fp32"},
                         task="detection")
