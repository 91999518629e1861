"""A 16-bit run without ZeRO converts (and inits a next stage) from its fp32 masters.

At ZeRO stage 0 in bf16, DeepSpeed (0.19) wraps the optimizer in ``FP16_UnfusedOptimizer``
(engine.py ``_do_optimizer_sanity_check``: bf16 weights with bf16 gradient accumulation
and no ZeRO -> ``DDP_BFLOAT16``), which keeps the fp32 masters in ``fp32_groups`` with no
names; the module's weights in ``mp_rank_00_model_states.pt`` are their bf16 copies.
Classification with ``run.precision=bf16`` at its default ``run.zero_stage=0`` runs this
way, and pre-training at ``engine.zero_stage=0`` in bf16 (detection and segmentation
autocast over fp32 weights instead).

Run as a script (``python tests/test_master_weights.py OUT_DIR PRECISION``) this file is
one rank training a small module a few steps at ZeRO-0 and saving through
``runtime.checkpoint.save_checkpoint``; it also writes the optimizer's own fp32 masters by
name (``masters.pt``), the truth the conversion is checked against.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TAG = "step_0000005"


def _rank_main(out_dir: str, precision: str) -> None:
    sys.path.insert(0, str(REPO))
    import deepspeed
    from torch import nn

    from runtime.checkpoint import save_checkpoint
    from runtime.dist import init_distributed
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    info = init_distributed()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    net[2].bias.requires_grad_(False)  # a frozen weight: no master, the module's copy
    params = [p for p in net.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=torch.optim.AdamW(params, lr=1e-4),
        config=deepspeed_config(DeepSpeedSpec(micro_batch=4, precision=precision)),
        dist_init_required=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for _ in range(5):  # steps of 1e-4: well under a bf16 ulp of these weights
        loss = engine(torch.randn(4, 8, dtype=dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    save_checkpoint(engine, Path(out_dir), 5, {}, {}, info, keep_last=2)
    if precision == "bf16":
        optimizer = engine.optimizer
        masters = {engine.param_names[p]: m.detach().clone()
                   for g16, g32 in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for p, m in zip(g16, g32)}
    else:
        masters = {n: p.detach().clone() for n, p in engine.module.named_parameters()
                   if p.requires_grad}
    torch.save({"masters": masters, "optimizer": type(engine.optimizer).__name__,
                "module": {k: v.clone() for k, v in engine.module.state_dict().items()}},
               Path(out_dir, "truth.pt"))


def _train(out: Path, precision: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env |= {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    from tests.pretrain_utils import free_port

    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run([sys.executable, __file__, str(out), precision], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "truth.pt")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bf16_zero0")
    return out / TAG, _train(out, "bf16")


def test_bf16_zero0_converts_from_the_fp32_masters(bf16_run):
    from finetune.convert import read_zero_checkpoint

    step_dir, truth = bf16_run
    assert truth["optimizer"] == "FP16_UnfusedOptimizer"
    state, meta = read_zero_checkpoint(step_dir)
    assert meta["zero_stage"] == "0"
    masters, module = truth["masters"], truth["module"]
    assert set(masters) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight"}
    # the bf16 copies are off their masters: otherwise this test could not fail
    assert any(not torch.equal(module[k].float(), m) for k, m in masters.items())
    for name, master in masters.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], master), name
    # what has no master comes from the module: buffers and the frozen bias
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "2.bias"):
        assert torch.equal(state[name], module[name].float() if module[name].is_floating_point()
                           else module[name]), name


def test_a_checkpoint_without_the_names_converts_from_its_bf16_weights_and_says_so(
        bf16_run, tmp_path, caplog):
    import shutil

    from finetune.convert import read_zero_checkpoint
    from runtime.master_weights import MASTER_NAMES

    step_dir, truth = bf16_run
    old = tmp_path / "checkpoints" / TAG
    shutil.copytree(step_dir, old)
    model_file = old / "mp_rank_00_model_states.pt"
    states = torch.load(model_file, weights_only=False)
    del states[MASTER_NAMES]  # as saved before the names were recorded
    torch.save(states, model_file)
    with caplog.at_level(logging.WARNING, logger="finetune.convert"):
        state, _ = read_zero_checkpoint(old)
    assert "16-bit weights" in caplog.text and "no names for its fp32" in caplog.text
    assert torch.equal(state["0.weight"], truth["module"]["0.weight"].float())


def test_fp32_zero0_saves_no_names_and_converts_its_weights(tmp_path):
    from finetune.convert import read_zero_checkpoint
    from runtime.master_weights import MASTER_NAMES

    truth = _train(tmp_path, "fp32")
    states = torch.load(tmp_path / TAG / "mp_rank_00_model_states.pt", weights_only=False)
    assert MASTER_NAMES not in states
    state, _ = read_zero_checkpoint(tmp_path / TAG)
    for name, weight in truth["masters"].items():
        assert torch.equal(state[name], weight), name


def test_flat_master_groups_of_fp16_optimizer_pair_with_their_names():
    """``FP16_Optimizer`` (the fused one, fp16 runs) keeps one flat fp32 tensor per group
    (fused_optimizer.py: ``_flatten_dense_tensors`` of the group's parameters in order)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from torch import nn

    from runtime.master_weights import master_names, read_master_weights

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).to(torch.bfloat16)
    inner = torch.optim.AdamW([{"params": [net[0].weight, net[1].bias]},
                               {"params": [net[0].bias, net[1].weight]}],
                              lr=0.0)  # its set-up takes a step: this one moves nothing
    optimizer = FP16_Optimizer(inner, low_precision_dtype=torch.bfloat16)

    class Engine:  # what master_names reads of a DeepSpeed engine
        param_names = {p: n for n, p in net.named_parameters()}

        def __init__(self):
            self.optimizer = optimizer

        @staticmethod
        def zero_optimization():
            return False

    names = master_names(Engine())
    assert names == [["0.weight", "1.bias"], ["0.bias", "1.weight"]]
    module = {k: v.clone() for k, v in net.state_dict().items()}
    masters = read_master_weights({"module": module, "optimizer": optimizer.state_dict(),
                                   "fp32_master_names": names})
    # untrained, each master is its (random, distinct) weight in fp32: a wrong pairing or
    # split of the flat groups could not match
    assert set(masters) == set(module)
    for name, weight in module.items():
        assert torch.equal(masters[name], weight.float()), name


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
