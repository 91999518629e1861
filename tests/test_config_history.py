"""A resume whose config differs from the one the run last started with keeps the old one
(``RUN/config_history/``) and names the changed keys (runtime/config_history.py). A SLURM
job rereads the user's ``--config`` file at every requeue: an edit made since changed the
running run's settings without a word, and the replaced config.yaml lost the record of
what it had trained with."""

from __future__ import annotations

import logging
from pathlib import Path

from launch.config import dump_config, load_config
from pretrain.config import PretrainConfig
from runtime.checkpoint import publish_config, stage_config


def _start(run_dir, overrides):
    """What a start does with its config: staged, then published once its checks pass."""
    demo = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo.yaml"
    cfg = load_config(PretrainConfig, demo, overrides)
    stage_config(run_dir, lambda path: dump_config(cfg, path))
    publish_config(run_dir)


def test_a_changed_config_is_named_and_the_previous_one_kept(tmp_path, caplog):
    run = tmp_path / "run"
    secret = "data.s3.secret=NEVERWRITTENANYWHERE"
    _start(run, ["optim.lr=0.001", secret])
    first = (run / "config.yaml").read_text()
    with caplog.at_level(logging.WARNING, logger="runtime.config_history"):
        _start(run, ["optim.lr=0.001", secret])  # a plain resume: nothing kept, nothing said
        assert not (run / "config_history").exists() and not caplog.records
        _start(run, ["optim.lr=0.0005", "data.batch_size=16", secret])
    [kept] = (run / "config_history").iterdir()
    assert kept.read_text() == first  # what the run had started with
    [line] = [r.getMessage() for r in caplog.records]
    assert "differs from the one the run last started with in 2 key(s)" in line
    assert "data.batch_size: " in line and "optim.lr: 0.001 -> 0.0005" in line
    assert str(kept) in line
    # credentials reach neither the history nor the log (the dumps are redacted)
    assert "NEVERWRITTENANYWHERE" not in kept.read_text() + line
    assert "NEVERWRITTENANYWHERE" not in (run / "config.yaml").read_text()
