"""Where every task's demo data goes: ``$INTERNIMAGE_CACHE``, else
``$XDG_CACHE_HOME/internimage``, else ``~/.cache/internimage`` (README, "Demo data").
The fine-tuning demos wrote to ``~/.cache/internimage`` whatever the variables said (a
read-only or quota-limited home), where pre-training honoured them."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.classification import ClsDataConfig
from finetune.det_config import DetDataConfig
from finetune.seg_config import SegDataConfig
from pretrain.demo import cache_dir as pretrain_cache_dir

TASKS = [ClsDataConfig, DetDataConfig, SegDataConfig]


@pytest.mark.parametrize("data", TASKS)
def test_every_demo_writes_where_the_environment_says(data, tmp_path, monkeypatch):
    monkeypatch.delenv("INTERNIMAGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data().cache_dir == str(tmp_path / "xdg" / "internimage")
    assert pretrain_cache_dir() == tmp_path / "xdg" / "internimage"
    monkeypatch.setenv("INTERNIMAGE_CACHE", str(tmp_path / "cache"))
    assert data().cache_dir == str(tmp_path / "cache") == str(pretrain_cache_dir())
    monkeypatch.delenv("INTERNIMAGE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data().cache_dir == str(Path.home() / ".cache" / "internimage")
    # a path given in the config wins, ~ expanded
    assert data(cache_dir="~/elsewhere").cache_dir == str(Path.home() / "elsewhere")
