"""`internimage finetune ... --dry-run` runs the start's --init check: a checkpoint recording
another backbone than the config builds is refused in the same line (exit 2) as the real
start refuses it, before any plan is printed; one of the config's own variant plans. And
the dry run's GPU count: `--gpus N` as `pretrain --dry-run --gpus N`.

The checkpoints are stand-ins of `internimage convert` outputs: a ``.safetensors`` file whose
header records the backbone's ``variant`` (finetune/convert.py writes ``variant``, ``arch``,
``step``, ``config_hash`` there); the check reads that header only, never a tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from launch.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
L_384 = CONFIGS / "cls_internimage_l_22kto1k_384.yaml"


def _converted(path: Path, variant: str) -> Path:
    """A convert output's header naming ``variant`` (one tensor: the dry run reads none)."""
    save_file({"patch_embed.conv1.weight": torch.zeros(1)}, str(path),
              metadata={"variant": variant})
    return path


def _refusal(argv: list[str], capsys) -> str:
    """stderr of ``argv``, which must be refused: exit 2, one line, nothing on stdout."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, (out, err)
    return err


def test_a_t_checkpoint_for_the_l_22kto1k_config_is_refused_by_the_dry_run_as_by_the_start(
        tmp_path, capsys):
    """The user's case: the released L 22kto1k fine-tune (OpenGVLab/InternImage
    classification/configs/internimage_l_22kto1k_384.yaml: CHANNELS 160, DEPTHS
    [5, 5, 22, 5], the L trunk) given a T backbone: the dry run planned it."""
    t = _converted(tmp_path / "internimage_t.safetensors", "internimage_t")
    args = ["finetune", "classification", "--config", str(L_384), "--init", str(t)]
    planned = _refusal([*args, "--dry-run"], capsys)
    started = _refusal([*args, "--output-dir", str(tmp_path / "run")], capsys)
    assert planned == started == (
        f"internimage finetune: config error: init: {t} holds an internimage_t backbone but "
        "this run builds internimage_l; set model.name to the checkpoint's variant\n")
    assert not (tmp_path / "run").exists()

    l_ckpt = _converted(tmp_path / "internimage_l.safetensors", "internimage_l")
    assert main(["finetune", "classification", "--config", str(L_384), "--init", str(l_ckpt),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "internimage_l" in out and str(l_ckpt) in out


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_every_task_s_dry_run_refuses_another_backbone_as_its_start(task, tmp_path, capsys):
    """The demo configs build internimage_t: an S checkpoint is refused alike by the dry
    run and the start of each task (detection and segmentation: the trunk, their init)."""
    s = _converted(tmp_path / "internimage_s.safetensors", "internimage_s")
    planned = _refusal(["finetune", task, "--init", str(s), "--dry-run"], capsys)
    started = _refusal(["finetune", task, "--init", str(s), "--output-dir",
                        str(tmp_path / "run")], capsys)
    assert planned == started
    assert planned.startswith(f"internimage finetune: config error: init: {s} holds an "
                              "internimage_s backbone but this run builds internimage_t")
    t = _converted(tmp_path / "internimage_t.safetensors", "internimage_t")
    assert main(["finetune", task, "--init", str(t), "--dry-run"]) == 0
    assert "parameters" in capsys.readouterr().out


def _converted_arch(path: Path, variant: str, arch: dict) -> Path:
    """A convert output's header recording ``variant`` and the run's ``arch`` overrides."""
    import json

    save_file({"patch_embed.conv1.weight": torch.zeros(1)}, str(path),
              metadata={"variant": variant, "arch": json.dumps(arch, sort_keys=True)})
    return path


def test_a_checkpoint_of_another_width_is_refused_by_the_dry_run_as_by_the_start(
        tmp_path, capsys):
    """Each side records only what it overrides: the pre-training demo's T (channels 16,
    configs/pretrain/demo.yaml) into the released T recipe (the variant's 64 channels,
    set nowhere) was planned by the dry run and queued by submit, and refused only by the
    job's start, after its queue wait and the model's build (130 tensors of other
    shapes). Both sides are now resolved against the variant's spec."""
    demo = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}
    tiny = _converted_arch(tmp_path / "tiny.safetensors", "internimage_t", demo)
    released_t = CONFIGS / "cls_internimage_t_1k_224.yaml"
    args = ["finetune", "classification", "--config", str(released_t), "--init", str(tiny)]
    planned = _refusal([*args, "--dry-run"], capsys)
    started = _refusal([*args, "--output-dir", str(tmp_path / "run")], capsys)
    assert planned == started
    assert ("backbone architecture differs from the config: channels=16 (checkpoint) vs 64 "
            "(config: internimage_t default); depths=[1, 1, 2, 1] (checkpoint) vs "
            "(4, 4, 18, 4) (config: internimage_t default)") in planned, planned
    # the other way: the variant's own widths into the demo config (its tiny overrides)
    full = _converted_arch(tmp_path / "full.safetensors", "internimage_t", {})
    planned = _refusal(["finetune", "classification", "--init", str(full), "--dry-run"],
                       capsys)
    assert "channels=64 (checkpoint) vs 16 (config)" in planned, planned
    # the demo checkpoint into the demo config: the same network
    assert main(["finetune", "classification", "--init", str(tiny), "--dry-run"]) == 0
    capsys.readouterr()
    # a T trunk without layer scale into the released Mask R-CNN-T recipe (layer_scale
    # 1.0, its gammas started fresh as released): not a mismatch
    assert main(["finetune", "detection", "--config",
                 str(CONFIGS / "det_mask_rcnn_internimage_t_fpn_1x_coco.yaml"), "--init",
                 str(full), "--dry-run"]) == 0


def test_gpus_sets_the_dry_run_s_gpu_count(capsys, monkeypatch):
    """`--gpus N` plans for N processes, as pretrain's dry run. The detection preset's total
    batch on 8 GPUs is the released one: detection/configs/coco/
    mask_rcnn_internimage_t_fpn_3x_coco.py ``samples_per_gpu=2`` on 8 GPUs, the 16 images
    its lr 0.0001 is given for."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["finetune", "classification", "--dry-run", "--gpus", "4",
                 "run.batch_size=8"]) == 0
    plan = capsys.readouterr().out
    assert "32 on 4 GPUs" in plan and "on 8 GPUs" not in plan
    det = CONFIGS / "det_mask_rcnn_internimage_t_fpn_3x_coco.yaml"
    assert main(["finetune", "detection", "--config", str(det), "--dry-run", "--gpus",
                 "8"]) == 0
    assert "16 on 8 GPUs" in capsys.readouterr().out
    # refused as pretrain --dry-run refuses them (launch/commands/pretrain.py dry_run_gpus)
    assert _refusal(["finetune", "classification", "--dry-run", "--gpus", "0"], capsys) == (
        "internimage finetune: config error: --gpus 0: must be >= 1\n")
    monkeypatch.setenv("WORLD_SIZE", "0")  # was a traceback (plan_gpu_counts' ValueError)
    assert _refusal(["finetune", "classification", "--dry-run"], capsys) == (
        "internimage finetune: config error: WORLD_SIZE=0: must be >= 1\n")
    monkeypatch.delenv("WORLD_SIZE")
    # a start trains on the processes its launcher starts: --gpus there is a mistake
    assert "--gpus is for --dry-run" in _refusal(["finetune", "classification", "--gpus",
                                                  "8"], capsys)
