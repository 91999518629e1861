"""Typed YAML configs with dotted overrides: what loads, and what fails with a named key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from launch.config import ConfigError, config_hash, dump_config, load_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    kind: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Run:
    model: str = "internimage_t"
    steps: int = 10
    bf16: bool = False
    urls: list[str] = field(default_factory=list)
    max_norm: float | None = None
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: internimage_s\noptim:\n  lr: 0.01\n  kind: sgd\n")
    cfg = load_config(Run, path, ["optim.lr=1e-4", "steps=5", "bf16=true", "urls=[a, b]",
                                  "optim.betas=[0.8, 0.9]"])
    assert cfg.model == "internimage_s" and cfg.steps == 5 and cfg.bf16 is True
    assert cfg.optim.lr == 1e-4 and cfg.optim.kind == "sgd" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.urls == ["a", "b"]


def test_int_accepted_for_float_and_none_for_optional():
    cfg = load_config(Run, None, ["optim.lr=1", "max_norm=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.max_norm is None


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["modle=x"], "unknown key 'modle'"),
    (["steps=many"], "steps: expected an integer"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["bf16=maybe"], "bf16: expected true/false"),
    (["optim.kind=lion"], "optim.kind: must be one of"),
    (["optim.betas=[1]"], "optim.betas: expected 2 items"),
    (["steps=0"], "steps must be >= 1"),
    (["nokey"], "not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Run, bad)


def test_dump_roundtrip_and_hash(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=0.5", "urls=[x]"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Run, tmp_path / "resolved.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Run, None, ["steps=11"])) != config_hash(cfg)
