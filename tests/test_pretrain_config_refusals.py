"""Pre-training values that cannot train are refused at the start in one line naming the
key (exit 2, no traceback, nothing written), instead of failing after the run started:
source weights that make the mix draw ``inf``, source URLs that name no shard, AdamW
settings torch refuses only once the model is built (or an infinite lr, which ran until
the loss was non-finite), and a precision this machine's accelerator lacks."""

from __future__ import annotations

import json
import sys

import pytest

from tests.pretrain_utils import TINY, run_forked


def _sources(*sources: dict) -> str:
    return "data.sources=" + json.dumps([{"image_key": "jpg", **s} for s in sources])


@pytest.mark.parametrize("override, message", [
    # the mix draws u x sum(weights): inf put every draw on one source
    ("data.sources=[{name: a, urls: builtin:digits/train, image_key: jpg, weight: .inf}]",
     "sources.a.weight: must be finite and > 0, got inf"),
    (_sources({"name": "a", "urls": "x.tar", "weight": 1e308},
              {"name": "b", "urls": "y.tar", "weight": 1e308}),
     "data.sources: the sum of the source weights must be finite"),
    # URLs that expand to none: refused only once the run had started, with a traceback
    (_sources({"name": "a", "urls": "::"}), "sources.a.urls: every entry must name"),
    (_sources({"name": "a", "urls": ["", " "]}), "sources.a.urls: every entry must name"),
    (_sources({"name": "a", "urls": ["x.tar", " :: "]}), "sources.a.urls: every entry"),
    # torch's AdamW refused these after the model was built ("Invalid beta parameter")
    ("optim.betas=[0.9,1.5]", "optim.betas: needs two values, each in [0, 1)"),
    ("optim.betas=[-0.1,0.9]", "optim.betas: needs two values, each in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "optim.betas: needs two values, each in [0, 1)"),
    ("optim.eps=-1", "optim.eps: must be finite and > 0"),
    ("optim.eps=0", "optim.eps: must be finite and > 0"),
    ("optim.eps=.inf", "optim.eps: must be finite and > 0"),
    # an infinite lr trained until the loss was non-finite
    ("optim.lr=inf", "optim.lr: must be finite and > 0, got inf"),
    ("optim.lr=.nan", "optim.lr: must be finite and > 0"),
])
def test_a_value_that_cannot_train_is_refused_in_one_line(override, message, tmp_path,
                                                          capsys):
    from launch.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--output-dir", str(out), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internimage pretrain: config error: ")
    assert message in lines[0]
    assert not out.exists()


def test_values_that_train_still_load():
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, DEMO_CONFIG, [
        _sources({"name": "a", "urls": "x.tar::", "weight": 1e300},
                 {"name": "b", "urls": ["y.tar", "z.txt"], "weight": 0.5}),
        "optim.betas=[0.0,0.999]", "optim.eps=1e-8", "optim.lr=1e-4"])
    assert [s.weight for s in cfg.data.sources] == [1e300, 0.5]
    assert cfg.optim.betas == (0.0, 0.999)


# DeepSpeed's CPU accelerator has fp16 only with oneDNN fp16 kernels: made unsupported here
# whatever this machine's CPU, as on most
NO_FP16 = """
import sys
from deepspeed.accelerator import get_accelerator
get_accelerator().is_fp16_supported = lambda: False
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_precision_the_accelerator_lacks_is_refused_in_one_line(tmp_path, cache):
    # refused by pretrain/engine.py check_precision once the process is up (it came as a
    # [rank0] traceback, exit 1, leaving the staged .config.yaml.pending behind)
    out = tmp_path / "run"
    proc = run_forked([sys.executable, "-c", NO_FP16, "pretrain", "--output-dir", str(out),
                       *TINY, "engine.precision=fp16"], cache, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("internimage pretrain:")]
    assert errors == ["internimage pretrain: engine.precision=fp16: DeepSpeed's cpu "
                      "accelerator does not support fp16 on this machine; use "
                      "engine.precision=bf16 or fp32"], proc.stderr[-3000:]
    assert not [p for p in out.rglob("*") if p.is_file()]  # no config, staged or not


@pytest.mark.parametrize("argv, env, message", [
    (["--gpus", "0"], {}, "--gpus 0: must be >= 1"),  # planned for 8 GPUs
    (["--gpus", "-2"], {}, "--gpus -2: must be >= 1"),  # printed a negative global batch
    ([], {"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be >= 1"),  # ZeroDivisionError
])
def test_a_dry_run_for_no_gpus_is_refused_in_one_line(argv, env, message, capsys, monkeypatch):
    from launch.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["pretrain", "--dry-run", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_source_whose_keys_match_nothing_ends_the_run_in_one_line(tmp_path, cache):
    """A wrong text_key re-read the demo shards for ever at step 0, nothing logged (QA:
    killed by `timeout` after 150 s); now the run ends once the source delivered
    data.loader.MAX_SKIPPED_IN_A_ROW samples in a row without a usable one."""
    out = tmp_path / "run"
    wrong = "data.sources=[{name: digits, urls: builtin:digits/train, text_key: caption}]"
    proc = run_forked([sys.executable, "-m", "launch.cli", "pretrain", "--output-dir", str(out),
                       *TINY, wrong], cache, check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("internimage pretrain:")]
    assert len(errors) == 1 and "source 'digits'" in errors[0], proc.stderr[-3000:]
    assert "were all skipped (missing_caption: 10000)" in errors[0]
