"""The M3I target encoder computes in the run's 16-bit type, with fp32 weights.

What a user relies on: in a bf16 run the EMA teacher's forward (2B views a step) runs in
bf16 like the online tower, not in fp32 (on an H100 ~67 dense fp32 TFLOPS against ~989
bf16: an fp32 teacher would dominate the step), while its weights stay fp32 (a bf16 EMA
with momentum near 1 would round most updates away) and the target it hands the loss is
fp32. This is Siamese Image Modeling's recipe, which our preset follows where M3I is
silent: the target encoder's weights are fp32 and it runs inside the training step's
autocast (OpenGVLab/Siamese-Image-Modeling, engine_pretrain.py line 75:
``torch.cuda.amp.autocast(enabled=(not args.fp32))`` around the model call; models_sim.py
lines 435-455, ``forward_sim``: the target encoder under ``no_grad`` inside that call, its
target cast ``.float()`` for the loss, line 460). fp32 runs stay fp32.

The teacher is built by ``pretrain.engine.build_teacher`` from the run's DeepSpeed config
(its precision's one source), in-process on the tiny demo tower under ZeRO-2 (a plain
module: no process group needed), and once under ZeRO-3 (the teacher a DeepSpeed engine of
its own with bf16 slices beside the fp32 average, F.linear replaced by DeepSpeed's
zero3_linear_wrap) on one rank
forked from tests/rank_launcher.py's forkserver: run as a script (``python
tests/test_m3i_teacher_precision.py OUT_DIR``) this file is that rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pretrain.engine import DTYPES

OVERRIDES = ["model.channels=8", "model.depths=[1,1,1,1]", "model.groups=[1,1,1,1]",
             "model.embed_dim=16", "text.width=16", "text.heads=2", "text.layers=1",
             "data.batch_size=2", "engine.zero_stage=2"]
REPO = Path(__file__).resolve().parents[1]


def _config(precision: str, *overrides: str):
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, DEMO_CONFIG,
                       [*OVERRIDES, f"engine.precision={precision}", *overrides])


def _teacher(precision: str, backend: str = "reference"):
    """The run's teacher as the trainer builds it, over a stand-in for the online engine
    (ZeRO-2 reads only its ``module`` and ``device``)."""
    from pretrain.ds_config import deepspeed_config
    from pretrain.engine import build_model, build_teacher

    cfg = _config(precision, f"model.dcn_backend={backend}")
    online = SimpleNamespace(module=build_model(cfg, num_tags=10), device=torch.device("cpu"))
    return build_teacher(cfg, online, deepspeed_config(cfg, cfg.data.batch_size))


def _images(dtype: torch.dtype) -> torch.Tensor:
    # the trainer hands the teacher the batch in the run's dtype (Trainer._batch_to_device)
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)


def _linear_dtypes(teacher, images: torch.Tensor) -> tuple[set, torch.Tensor]:
    """The (input dtype, output dtype) pairs every Linear of the teacher sees in one call,
    and the call's result."""
    seen: set[tuple[torch.dtype, torch.dtype]] = set()
    hooks = [m.register_forward_hook(lambda _m, args, out: seen.add((args[0].dtype, out.dtype)))
             for m in teacher.module.modules() if isinstance(m, nn.Linear)]
    try:
        target = teacher(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, target


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_teacher_computes_in_the_runs_precision_with_fp32_weights(precision, backend):
    """bf16 run: every Linear of the teacher (DCNv3's projections, the MLPs: most of
    InternImage's compute) takes and gives bf16, for both DCNv3 backends (the reference
    op and the Triton custom op, which autocast does not cast into: their offset and mask
    arrive in one dtype); fp32 run: fp32. Either way the weights and the target are fp32."""
    if backend == "triton":
        from ops.dcnv3.function import available_backends

        if "triton" not in available_backends():
            pytest.skip("the triton package is not installed")
    teacher = _teacher(precision, backend)
    seen, target = _linear_dtypes(teacher, _images(DTYPES[precision]))
    assert seen == {(DTYPES[precision], DTYPES[precision])}
    assert {p.dtype for p in teacher.module.parameters()} == {torch.float32}
    assert target.dtype == torch.float32 and not target.requires_grad
    assert torch.isfinite(target).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_teacher_computes_in_bf16_under_cudas_autocast_rules(monkeypatch, backend):
    """Two things differ on CUDA, emulated here on CPU. (1) CUDA's autocast runs
    layer_norm and softmax in fp32 (CPU's in bf16): the DCNv3 layer's offsets and mask
    then come from fp32 next to a bf16 input projection, while the op takes one dtype
    (ops/dcnv3/registry.py, check_inputs) and autocast does not cast into custom ops.
    (2) DeepSpeed's engine.forward (0.19.8, runtime/torch_autocast.py, autocast_if_enabled)
    switches off an autocast entered around it (``torch.is_autocast_enabled()`` reads
    CUDA's): the teacher must not rely on one."""
    if backend == "triton":
        from ops.dcnv3.function import available_backends

        if "triton" not in available_backends():
            pytest.skip("the triton package is not installed")
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax",
                        lambda *args, **kwargs: softmax(*args, **kwargs).float())
    teacher = _teacher("bf16", backend)
    fp32_norms = [m.register_forward_hook(lambda _m, _args, out: out.float())
                  for m in teacher.module.modules() if isinstance(m, nn.LayerNorm)]
    with torch.autocast(device_type="cpu", enabled=False):
        seen, target = _linear_dtypes(teacher, _images(torch.bfloat16))
    for hook in fp32_norms:
        hook.remove()
    assert {out for _, out in seen} == {torch.bfloat16}  # every Linear computed in bf16
    assert {inp for inp, _ in seen} == {torch.bfloat16, torch.float32}  # fp32 norms fed some
    assert target.dtype == torch.float32 and torch.isfinite(target).all()


def test_the_runs_deepspeed_config_sets_the_teachers_compute_type():
    """One source: the online engine's DeepSpeed config (``engine.precision`` writes its
    bf16/fp16 sections); fp16 runs compute the teacher in fp16, as Siamese Image
    Modeling's default autocast does."""
    from pretrain.m3i.ema import teacher_autocast_dtype

    assert teacher_autocast_dtype({"bf16": {"enabled": True}, "fp16": {"enabled": False}}) \
        == torch.bfloat16
    assert teacher_autocast_dtype({"bf16": {"enabled": False}, "fp16": {"enabled": True}}) \
        == torch.float16
    assert teacher_autocast_dtype({"bf16": {"enabled": False}, "fp16": {"enabled": False}}) \
        is None
    assert _teacher("fp16").module.autocast_dtype == torch.float16


def test_bf16_target_is_the_fp32_target_within_bf16_rounding():
    """The bf16 teacher's target is not the fp32 computation bit for bit (it is computed in
    bf16) but stays within bf16's error of it: bf16 keeps 8 significant bits (unit
    roundoff 2**-9 ~ 2e-3), each Linear/conv rounds its inputs and output, and a dozen of
    them in a row leave ~1e-2 of the map's norm; an fp32 recomputation would agree to
    ~1e-6."""
    teacher = _teacher("bf16")
    images = _images(torch.bfloat16)
    target = teacher(images)
    with torch.no_grad():  # the same fp32 weights, computed in fp32
        exact = teacher.module.visual.forward_unpooled(images.float())
    error = float((target - exact).norm() / exact.norm())
    assert 1e-4 < error < 3e-2, error


def _rank_main(out_dir: str) -> None:
    """One rank: a bf16 ZeRO-3 engine and its teacher, as the trainer builds them; writes
    what the teacher's Linears saw and the dtypes of its slices and target."""
    sys.path.insert(0, str(REPO))
    from pretrain.engine import build_engine, build_model, build_teacher
    from runtime.dist import init_distributed

    init_distributed()
    cfg = _config("bf16", "engine.zero_stage=3", "model.dcn_backend=reference")
    engine, ds_config = build_engine(cfg, build_model(cfg, num_tags=10), steps=10)
    teacher = build_teacher(cfg, engine, ds_config)
    seen, target = _linear_dtypes(teacher, _images(torch.bfloat16))
    result = {"linears": sorted({f"{a}->{b}" for a, b in seen}),
              "slices": sorted({str(p.ds_tensor.dtype) for p in teacher.module.parameters()}),
              "average": sorted({str(v.dtype) for v in teacher.state_dict().values()}),
              "target": str(target.dtype), "finite": bool(torch.isfinite(target).all())}
    Path(out_dir, "zero3.json").write_text(json.dumps(result))
    engine.destroy()


@pytest.mark.distributed
def test_zero3_teacher_engine_computes_in_bf16_with_an_fp32_average(tmp_path):
    """The production path (InternImage-H runs ZeRO-3): the teacher is a DeepSpeed engine
    with bf16 slices (what its forward gathers) and the fp32 moving average beside them,
    and DeepSpeed's engine.forward would switch off an autocast entered around it
    (runtime/torch_autocast.py) on CUDA: the autocast is entered inside the encoder, and
    its Linears compute in bf16."""
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_rank_main", 1, str(tmp_path), timeout=240)
    result = json.loads((tmp_path / "zero3.json").read_text())
    assert result == {"linears": ["torch.bfloat16->torch.bfloat16"],
                      "slices": ["torch.bfloat16"], "average": ["torch.float32"],
                      "target": "torch.float32",
                      "finite": True}


if __name__ == "__main__":
    _rank_main(sys.argv[1])
