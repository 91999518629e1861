"""A preset of one task given to another command: the refusal says which command the file
is for (its top-level keys tell), where it only named the first unknown key. Each case is
a shipped preset (configs/) given to a command it is not for."""

from __future__ import annotations

import pytest

from launch.cli import main
from tests.pretrain_utils import REPO

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("command, preset, meant, key", [
    (["finetune", "classification"], "finetune/seg_upernet_internimage_t_512_160k_ade20k.yaml",
     "internimage finetune segmentation", "aux_weight"),
    (["finetune", "segmentation"], "finetune/det_mask_rcnn_internimage_t_fpn_1x_coco.yaml",
     "internimage finetune detection", "detector"),
    (["finetune", "detection"], "pretrain/internimage_h_m3i.yaml",
     "internimage pretrain", "engine"),
    (["pretrain"], "finetune/cls_internimage_t_1k_224.yaml",
     "internimage finetune classification", "aug"),
])
def test_another_tasks_preset_is_named_as_such(command, preset, meant, key, capsys):
    path = CONFIGS / preset
    assert main([*command, "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"internimage {command[0]}: config error: "
                                                   "unknown key "), err
    assert err.endswith(f" ({path} looks like a config of `{meant}`: its top-level key "
                        f"'{key}' is that task's alone)\n"), err


def test_an_unknown_key_of_no_other_task_gets_no_hint(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("optimm: {lr: 0.1}\n")
    assert main(["finetune", "classification", "--config", str(config), "--dry-run"]) == 2
    assert "looks like a config" not in capsys.readouterr().err
