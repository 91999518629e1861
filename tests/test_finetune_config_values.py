"""Out-of-range config values fail at load time, naming the dotted key and the range.

Each value here was accepted before (or failed only in the first forward / DataLoader /
set_num_threads, with a traceback not naming the key): a bad config must fail before any
compute, as the README's "Configuration" section promises.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.classification import ClassificationConfig
from finetune.det_config import DetectionConfig
from finetune.seg_config import SegmentationConfig
from launch.config import ConfigError, load_config
from ops.dcnv3 import available_backends
from pretrain.config import PretrainConfig

FINETUNE = (ClassificationConfig, SegmentationConfig, DetectionConfig)
# keys every fine-tuning task shares (BackboneConfig, OptimConfig, RunConfig)
SHARED_BAD = [
    ("model.dcn_backend", "foo", "auto|"),
    ("run.num_workers", -1, ">= 0"),
    ("run.threads", -1, ">= 0"),
    ("run.eval_every", -1, ">= 0"),
    ("run.checkpoint_every", -1, ">= 0"),
    ("optim.grad_clip", -1, ">= 0"),
    # torch's AdamW refused these only once built, after the model, with a traceback
    ("optim.betas", "[0.9,1.5]", "[0, 1)"),
    ("optim.betas", "[-0.1,0.999]", "[0, 1)"),
    ("optim.lr", ".inf", "finite and > 0"),  # trained until the loss was non-finite
]
BAD = [(cls, key, value, allowed) for cls in FINETUNE for key, value, allowed in SHARED_BAD]
BAD += [
    (ClassificationConfig, "aug.hflip", 2, "[0, 1]"),
    (ClassificationConfig, "aug.hflip", -0.1, "[0, 1]"),
    (ClassificationConfig, "aug.mix_prob", 5, "[0, 1]"),
    (ClassificationConfig, "aug.color_jitter", -1, ">= 0"),
    (ClassificationConfig, "aug.test_crop_pct", 0, "(0, 1]"),
    (ClassificationConfig, "aug.test_crop_pct", 1.5, "(0, 1]"),
    (SegmentationConfig, "data.hflip", 2, "[0, 1]"),
    (PretrainConfig, "model.dcn_backend", "foo", "auto|"),
    (PretrainConfig, "optim.grad_clip", -1, ">= 0"),
]


@pytest.mark.parametrize(("cls", "key", "value", "allowed"), BAD,
                         ids=[f"{c.__name__}-{k}={v}" for c, k, v, _ in BAD])
def test_bad_value_names_key_and_range(cls, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [f"{key}={value}"])
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert allowed in message, message


EDGES = [
    ["run.num_workers=0", "run.threads=0", "run.eval_every=0", "run.checkpoint_every=0",
     "optim.grad_clip=0"],
    *[[f"model.dcn_backend={name}"] for name in ("auto", *available_backends())],
]
CLS_EDGES = [["aug.hflip=0", "aug.mix_prob=0", "aug.color_jitter=0"],
             ["aug.hflip=1.0", "aug.mix_prob=1.0", "aug.test_crop_pct=1.0"],
             ["aug.test_crop_pct=0.875"]]
VALID = [(cls, o) for cls in FINETUNE for o in EDGES]
VALID += [(ClassificationConfig, o) for o in CLS_EDGES]
VALID += [(SegmentationConfig, ["data.hflip=0"]), (SegmentationConfig, ["data.hflip=1.0"]),
          (PretrainConfig, ["optim.grad_clip=0", "model.dcn_backend=reference"])]


@pytest.mark.parametrize(("cls", "overrides"), VALID,
                         ids=[f"{c.__name__}-{'-'.join(o)}" for c, o in VALID])
def test_edge_values_still_load(cls, overrides):
    load_config(cls, None, overrides)


def test_cli_refuses_unknown_backend_before_the_run_directory(tmp_path):
    # ``python -m`` from this checkout (the ``internimage`` script is whichever is installed)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "finetune", "classification", "--output-dir",
         str(out), "model.dcn_backend=foo"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "model.dcn_backend" in lines[0] and "'foo'" in lines[0], lines[0]
    assert not out.exists()
