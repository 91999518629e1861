"""16-bit pre-training with real processes: 2 gloo ranks, DeepSpeed ZeRO-3 (issue #12
item 2: bf16, the H recipe's precision, crashed at the first forward with "expected scalar
type BFloat16 but found Float": DeepSpeed casts parameters, not buffers such as the T..XL
head's BatchNorm statistics). The first run goes through torchrun; the others fork their
ranks from tests/rank_launcher.py's forkserver (``run_forked``: the same argv and
environment, no fresh interpreter's imports)."""

from __future__ import annotations

import math

import pytest

from tests.pretrain_utils import losses, pretrain_cmd, run_forked

pytestmark = [pytest.mark.distributed]


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


def _assert_trains(out, steps: int) -> None:
    loss = losses(out)
    assert sorted(loss) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in loss.values()), loss
    values = list(loss.values())
    assert sum(values[-2:]) < sum(values[:2]), loss  # falling


def test_bf16_pretraining_on_two_ranks_with_zero3(tmp_path, cache):
    out = tmp_path / "bf16"
    run_forked(pretrain_cmd(2, out, "--max-steps", "6", "engine.precision=bf16"), cache)
    _assert_trains(out, 6)


def test_bf16_without_zero_init_casts_the_buffers_too(tmp_path, cache):
    # ZeRO-2 builds the model plainly (fp32 buffers, cast by DeepSpeed's data_types config
    # only); under ZeRO-3, zero.Init builds it in bf16 already.
    out = tmp_path / "bf16_zero2"
    run_forked(pretrain_cmd(1, out, "--max-steps", "2", "engine.precision=bf16",
                            "engine.zero_stage=2"), cache)
    loss = losses(out)
    assert sorted(loss) == [1, 2] and all(math.isfinite(v) for v in loss.values()), loss


def test_fp16_pretraining_trains_or_is_refused_before_any_compute(tmp_path, cache):
    out = tmp_path / "fp16"
    # DeepSpeed's fp16 loss scaler starts at 2**16 by default; tiny models overflow there
    # and their first steps are skipped (DeepSpeed's docs: dynamic loss scaling). A smaller
    # start keeps every step of this short run.
    scale = tmp_path / "fp16_scale.json"
    scale.write_text('{"fp16": {"initial_scale_power": 8}}')
    proc = run_forked(pretrain_cmd(2, out, "--max-steps", "6", "engine.precision=fp16",
                                   f"engine.deepspeed_config={scale}"), cache, check=False)
    if _fp16_supported():
        assert proc.returncode == 0, proc.stderr[-3000:]
        _assert_trains(out, 6)
        return
    # DeepSpeed's CPU accelerator offers fp16 only with oneDNN fp16 kernels (AVX512-FP16 /
    # AMX-FP16); DeepSpeed itself would refuse inside deepspeed.initialize ("Type fp16 is
    # not supported on your device."). Ours refuses first, naming the key, with no step run.
    assert proc.returncode != 0
    assert "engine.precision=fp16" in proc.stderr
    assert "does not support fp16 on this machine" in proc.stderr
    assert not (out / "metrics.jsonl").exists()
