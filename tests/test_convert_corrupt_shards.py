"""A damaged DeepSpeed rank file (truncated by an interrupted copy or a full disk) in a
ZeRO checkpoint is refused in one line naming it, exit 2, by `internimage convert` and by
`internimage finetune --init`, which leaves no run directory (and no .config.yaml.pending)
behind. Before, both ended in torch's traceback ``PytorchStreamReader failed reading zip
archive``, naming no file; a damaged .pth or .safetensors was already refused so."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.pretrain_utils import pretrain_cmd, run_forked

TAG = "step_0000003"


@pytest.fixture(scope="module")
def step_dir(cache, tmp_path_factory) -> Path:
    """A tiny 1-rank pre-training run's ZeRO-3 checkpoint (a model and an optimizer file)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    run_forked(pretrain_cmd(1, out, "--max-steps", "3", "--checkpoint-every", "3"), cache)
    return out / "checkpoints" / TAG


def _damaged(step_dir: Path, dest: Path, kind: str) -> tuple[Path, Path]:
    """A copy of ``step_dir`` at ``dest`` with its rank-0 ``kind`` (model/optim) file cut
    to 1000 bytes; (the copy, that file)."""
    shutil.copytree(step_dir, dest)
    damaged = dest / f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt"
    os.truncate(damaged, 1000)
    return dest, damaged


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "optim"])
def test_convert_names_the_damaged_rank_file(step_dir, tmp_path, capsys, kind):
    from launch.cli import main

    copy, damaged = _damaged(step_dir, tmp_path / TAG, kind)
    dst = tmp_path / "out" / "x.safetensors"
    assert main(["convert", str(copy), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"internimage convert: cannot read {damaged} "), err
    assert "PytorchStreamReader failed reading zip archive" in err
    assert not dst.exists()


@pytest.mark.slow
def test_finetune_init_names_the_damaged_rank_file_and_leaves_nothing(step_dir, tmp_path,
                                                                       cache):
    """The rank file DeepSpeed's zero_to_fp32 reads (the optimizer's, with the fp32
    weights) is read once the run has started; the refused start removes what it made."""
    copy, damaged = _damaged(step_dir, tmp_path / TAG, "optim")
    out = tmp_path / "nest" / "run"
    proc = run_forked([sys.executable, "-m", "launch.cli", "finetune", "classification",
                       "--output-dir", str(out), "--init", str(copy), "run.max_steps=1",
                       "run.num_workers=0", "run.threads=1", "run.progress=false",
                       "run.tensorboard=false", f"data.cache_dir={cache}"], cache,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"internimage finetune: cannot read {damaged} ")
    assert not (tmp_path / "nest").exists()  # no run dir, no .config.yaml.pending
