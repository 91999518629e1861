"""The one DeepSpeed config builder (runtime/ds_config.py), read back by DeepSpeed's own
parser (``deepspeed.runtime.config.DeepSpeedConfig``): what a user sets is what the engine
runs with, for pre-training and classification alike."""

from __future__ import annotations

import json

import pytest
import torch

deepspeed_config_mod = pytest.importorskip("deepspeed.runtime.config")


def _parsed(config: dict):
    return deepspeed_config_mod.DeepSpeedConfig(config)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_stage_and_precision_reaches_the_engine(stage, precision):
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    config = deepspeed_config(DeepSpeedSpec(micro_batch=3, zero_stage=stage,
                                            precision=precision, grad_accum=4, grad_clip=2.5))
    ds = _parsed(config)
    # DeepSpeed config docs: train_batch_size = train_micro_batch_size_per_gpu x
    # gradient_accumulation_steps x number of GPUs (one process here)
    assert ds.train_batch_size == 3 * 4 * 1
    assert ds.gradient_accumulation_steps == 4
    assert ds.gradient_clipping == 2.5
    assert ds.zero_optimization_stage == stage
    # DeepSpeed docs, "data_types": buffers are cast to buffer_dtype; without it they stay
    # fp32 next to 16-bit weights and a BatchNorm's first forward fails
    assert (ds.bfloat16_config.enabled, ds.float16_config.enabled) == (
        precision == "bf16", precision == "fp16")
    assert ds.buffer_dtype == (None if precision == "fp32" else precision)
    # gradients are reduced across ranks in fp32 under bf16 (DeepSpeed's default there is
    # bf16; Megatron-LM --accumulate-allreduce-grads-in-fp32), fp16 keeps fp16
    want = {"fp32": torch.float32, "bf16": torch.float32, "fp16": torch.float16}[precision]
    assert ds.communication_data_type == want
    # a save whose ranks disagree on the tag fails on every rank (DeepSpeed's engine
    # compares the tag's hash over the ranks, _checkpoint_tag_validation, and by default
    # only warns): never rank 0's files alone published as a complete checkpoint
    assert ds.checkpoint_tag_validation_enabled and ds.checkpoint_tag_validation_fail


def test_user_json_overrides_key_by_key_and_errors_name_the_key(tmp_path):
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}}))
    config = deepspeed_config(DeepSpeedSpec(micro_batch=2, zero_stage=2,
                                            extra_json=str(extra), extra_json_key="x.ds"))
    ds = _parsed(config)
    assert ds.zero_config.reduce_bucket_size == 12345
    assert ds.zero_optimization_stage == 2  # merged, not replaced
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="x.ds: .*not valid JSON"):
        deepspeed_config(DeepSpeedSpec(micro_batch=2, extra_json=str(bad),
                                       extra_json_key="x.ds"))


def test_classification_bf16_casts_buffers_and_names_its_json_key(tmp_path):
    """Classification builds through the same function as pre-training: its bf16 engine
    gets DeepSpeed's buffer dtype too, and a broken JSON file names run.deepspeed_config."""
    from finetune.classification import ClassificationConfig
    from finetune.zero import deepspeed_config
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, ["run.zero_stage=3", "run.precision=bf16",
                                                   "run.batch_size=5", "optim.grad_clip=3.0"])
    ds = _parsed(deepspeed_config(cfg))
    assert (ds.zero_optimization_stage, ds.train_batch_size, ds.gradient_clipping) == (3, 5, 3.0)
    assert ds.bfloat16_config.enabled and ds.buffer_dtype == "bf16"
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    cfg.run.deepspeed_config = str(bad)
    with pytest.raises(ValueError, match="run.deepspeed_config"):
        deepspeed_config(cfg)


def _bf16_reduce_rank(_unused: str = "") -> None:
    """One of 2 ranks of a ZeRO-3 bf16 engine of one weight w (loss = w * x): rank 0's
    gradient is 1, rank 1's 2**-9, both exact in bf16. Their mean, 0.5 + 2**-10, needs 11
    significant bits: reduced in bf16 (8 bits) it rounds to 0.5, in fp32 it is exact."""
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from torch import nn

    from runtime.dist import init_distributed
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    info = init_distributed()
    net = nn.Linear(1, 1, bias=False)
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        config=deepspeed_config(DeepSpeedSpec(micro_batch=1, zero_stage=3, precision="bf16")),
        dist_init_required=False)
    x = torch.tensor([[1.0 if info.rank == 0 else 2.0**-9]], dtype=torch.bfloat16)
    engine.backward(engine(x).float().sum())
    grad = safe_get_full_grad(engine.module.weight)
    assert grad.dtype == torch.float32
    assert grad.item() == 0.5 + 2.0**-10, grad.item()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.distributed
def test_bf16_gradients_are_averaged_across_ranks_in_fp32():
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_bf16_reduce_rank", 2, "x", timeout=300)
