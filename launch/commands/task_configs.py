"""Which command a config file is for, told by its top-level sections: a preset of one
task given to another command failed on the first section the other does not know
(``unknown key 'aux_weight'``), not saying the file is a segmentation config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml


def _config_classes() -> dict[str, type]:
    """The command line of each task -> its config class (imported when asked)."""
    from finetune.classification import ClassificationConfig
    from finetune.det_config import DetectionConfig
    from finetune.seg_config import SegmentationConfig
    from pretrain.config import PretrainConfig

    return {"internimage pretrain": PretrainConfig,
            "internimage finetune classification": ClassificationConfig,
            "internimage finetune detection": DetectionConfig,
            "internimage finetune segmentation": SegmentationConfig}


def _sections(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def other_task_hint(path: str | Path | None, own: str) -> str:
    """``" (PATH looks like a config of `COMMAND`: its top-level key KEY is that task's
    alone)"``
    when the config file at ``path`` has a top-level section that only another task's
    config has (``own``: this command, a key of the table above); ``""`` otherwise (no
    file, unreadable, or nothing that tells)."""
    if path is None:
        return ""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(data, dict):
        return ""
    classes = _config_classes()
    mine = _sections(classes[own])
    for command, cls in classes.items():
        if command == own:
            continue
        others = set().union(*(_sections(c) for n, c in classes.items() if n != command))
        telling = sorted((set(data) & _sections(cls)) - mine - others)
        if telling:
            return (f" ({path} looks like a config of `{command}`: its top-level key "
                    f"'{telling[0]}' is that task's alone)")
    return ""
