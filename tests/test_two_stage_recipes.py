"""The two-stage Mask2Former recipes (stage 1 on Mapillary or COCO-Stuff-164k, stage 2 on
Cityscapes or ADE20K, as the released InternImage-H segmentation configs chain them):
stage 2's ``init`` must name what stage 1's run writes. Runs write
``checkpoints/step_*`` and ``latest`` (runtime/checkpoint.py); the presets named
``checkpoints/last.pt``, which no run writes, so stage 2 could not start as shipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "finetune"
PAIRS = [("seg_mask2former_internimage_h_896_80k_mapillary.yaml",
          "seg_mask2former_internimage_h_1024_80k_cityscapes.yaml"),
         ("seg_mask2former_internimage_h_896_80k_cocostuff164k.yaml",
          "seg_mask2former_internimage_h_896_80k_cocostuff2ade20k.yaml")]


@pytest.mark.parametrize("first, second", PAIRS)
def test_stage_two_inits_from_what_stage_one_writes(first, second, tmp_path, monkeypatch):
    from finetune.segmentation import SegmentationConfig
    from launch.config import load_config
    from runtime.checkpoint import LATEST, tag_for
    from runtime.checkpoint_path import resolve_checkpoint

    stage1 = load_config(SegmentationConfig, CONFIGS / first, [])
    stage2 = load_config(SegmentationConfig, CONFIGS / second, [])
    # stage 1's run, as a run lays it out, under the relative paths the presets use
    monkeypatch.chdir(tmp_path)
    ckpts = Path(stage1.run.output_dir) / "checkpoints"
    step = ckpts / tag_for(80000)
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpts / LATEST).write_text(step.name)
    resolved = resolve_checkpoint(stage2.init)
    assert resolved.is_zero and os.path.samefile(resolved.path, step)
