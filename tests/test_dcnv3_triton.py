"""The Triton DCNv3 backend against the pure-PyTorch reference.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1),
which is slow: shapes stay tiny but cover odd sizes, stride/dilation/padding, kernel 5,
offset_scale != 1, 1..8 groups of 4..64 channels (also non powers of two), samples far
outside the image and samples exactly on pixel centres. Every output the kernels must
fully write is allocated NaN-filled (``POISON_OUTPUTS``), so an unwritten element fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ops.dcnv3 import DCNv3, available_backends, dcnv3, output_size, triton_backend  # noqa: E402, I001
from ops.dcnv3 import triton_kernels  # noqa: E402
from ops.dcnv3.triton_backend import dcnv3_softmax  # noqa: E402
from tests.dcnv3_naive import (  # noqa: E402
    BORDER_PARAMS,
    FRESH_LAYER_GRAD_OFFSET_X9,
    FRESH_LAYER_PARAMS,
    border_problem,
    fresh_layer_problem,
)

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)


def _case(n, h, w, groups, gc, ks=3, stride=1, pad=1, dil=1, scale=1.0):
    return dict(n=n, h=h, w=w, groups=groups, gc=gc, ks=ks, stride=stride, pad=pad,
                dil=dil, scale=scale)


CASES = [
    _case(2, 7, 9, 1, 4),
    _case(1, 9, 7, 3, 8, ks=5, stride=2, pad=2, dil=2, scale=2.0),
    _case(1, 5, 11, 8, 32, stride=2, pad=1, dil=2, scale=0.5),
    _case(2, 6, 5, 5, 6, pad=0),
    _case(1, 8, 6, 2, 20, ks=5, pad=2),
    # The tile layouts of triton_kernels.tile_constants: 16 channels (InternImage-T..XL)
    # are one tile; 32 (H) and 64 are one tile in the backward and 16-bit forwards, two
    # chunks in 4-byte forwards (20 channels at kernel 5, above, are always one tile:
    # K = 25 needs 32 lanes; test_both_tile_layouts_match_reference runs each layout in
    # both kernels).
    _case(1, 5, 6, 2, 16),
    _case(1, 4, 5, 1, 64, stride=2),
]


def _make(case, dtype=torch.float64, device=DEVICE, seed=0, far=True):
    """Fresh random input, offsets (some far outside the image) and softmax weights."""
    gen = torch.Generator().manual_seed(seed)
    c = case["groups"] * case["gc"]
    k = case["ks"] ** 2
    ho = output_size(case["h"], case["ks"], case["stride"], case["pad"], case["dil"])
    wo = output_size(case["w"], case["ks"], case["stride"], case["pad"], case["dil"])
    x = torch.randn(case["n"], case["h"], case["w"], c, generator=gen, dtype=torch.float64)
    off = 2.5 * torch.randn(case["n"], ho, wo, case["groups"] * k * 2, generator=gen,
                            dtype=torch.float64)
    if far:  # a few samples land far away (both signs; 3e4 still fits in fp16)
        flat = off.view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[: max(2, flat.numel() // 20)]
        flat[idx] = 3e4 * torch.sign(torch.randn(idx.numel(), generator=gen, dtype=flat.dtype))
    logits = torch.randn(case["n"], ho, wo, case["groups"], k, generator=gen,
                         dtype=torch.float64)
    mask = F.softmax(logits, -1).reshape(case["n"], ho, wo, case["groups"] * k)
    go = torch.randn(case["n"], ho, wo, c, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, off, mask, go)]


def _params(case):
    return dict(kernel_size=case["ks"], stride=case["stride"], padding=case["pad"],
                dilation=case["dil"], groups=case["groups"], offset_scale=case["scale"])


def _run(backend, case, x, off, mask, go):
    """Output and (grad_input, grad_offset, grad_mask) of ``dcnv3`` on ``backend``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, off, mask)]
    out = dcnv3(*leaves, **_params(case), backend=backend)
    grads = torch.autograd.grad(out, leaves, go)
    return out.detach(), grads


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_close(got, want, tol, what=""):
    names = ("output", "grad_input", "grad_offset", "grad_mask")
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"{what} {name}: NaN (unwritten element?)"
        err = _rel(a, b)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol}"


def _both(backend, case, tensors):
    out, grads = _run(backend, case, *tensors)
    return (out, *grads)


def _case_id(case):
    return "g{groups}c{gc}k{ks}s{stride}d{dil}".format(**case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_float64(case):
    tensors = _make(case)
    _assert_close(_both("triton", case, tensors), _both("reference", case, tensors), 1e-10,
                  "fp64")


@pytest.mark.parametrize("split", [False, True], ids=["one_tile", "two_chunks"])
@pytest.mark.parametrize("case", [CASES[2], _case(1, 6, 5, 3, 20), CASES[6]], ids=_case_id)
def test_both_tile_layouts_match_reference(monkeypatch, case, split):
    """Each tile layout (``tile_constants``' split: a group as one tile, or as two chunks
    handled by the same lanes) in both kernels, whichever the default takes, at 32
    channels (H), 20 (the second chunk partly masked) and 64."""
    constants = triton_kernels.tile_constants
    chosen = []

    def forced(*args, **kwargs):
        tiles = constants(*args, **kwargs, split=split)
        chosen.append(tiles["NCH"])
        return tiles

    monkeypatch.setattr(triton_kernels, "tile_constants", forced)
    tensors = _make(case)
    _assert_close(_both("triton", case, tensors), _both("reference", case, tensors), 1e-10,
                  f"split={split}")
    assert chosen and set(chosen) == {2 if split else 1}  # forward and backward launched


@pytest.mark.parametrize("case", CASES[1:3], ids=["k5s2d2", "g8c32"])
def test_float32_within_1e4_of_float64(case):
    tensors = _make(case, seed=1)
    want = _both("reference", case, tensors)
    got = _both("triton", case, [t.float() for t in tensors])
    _assert_close(got, want, 1e-4, "fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_error_at_most_twice_reference_error(dtype):
    # offset_scale 0.7: with a power-of-two scale, half-precision offsets put many samples
    # exactly on pixel lines, where the offset gradient is one-sided and the float64
    # reference may pick the other side; that would measure tie-breaking, not precision.
    case = _case(1, 9, 7, 3, 8, ks=5, stride=2, pad=2, dil=2, scale=0.7)
    low = _make(case, dtype=dtype, seed=2)
    exact = [t.double() for t in low]  # same (rounded) inputs, computed in float64
    want = _both("reference", case, exact)
    ref_low = _both("reference", case, low)
    tri_low = _both("triton", case, low)
    names = ("output", "grad_input", "grad_offset", "grad_mask")
    for name, t, r, w in zip(names, tri_low, ref_low, want):
        assert t.dtype == dtype and not torch.isnan(t).any()
        tri_err, ref_err = _rel(t, w), _rel(r, w)
        assert tri_err <= 2 * ref_err + 1e-6, f"{name}: triton {tri_err:.3g} vs ref {ref_err:.3g}"


def test_samples_exactly_on_pixel_centres():
    """Integer offsets with scale 1 put every sample on a pixel centre (many at -1 and at
    the size, where the released kernel skips the point), where the bilinear weights are
    0/1 and the offset gradient is one-sided (floor: the derivative from the right). The
    reference takes the same side, so all four results agree."""
    case = _case(2, 7, 8, 2, 4, pad=1)
    x, off, mask, go = _make(case, seed=3, far=False)
    off = off.round()
    got = _both("triton", case, (x, off, mask, go))
    want = _both("reference", case, (x, off, mask, go))
    _assert_close(got, want, 1e-10, "centres")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_border_rule_matches_released_kernel(dtype):
    """Locations -1, -0.5, 0, size-1, size-0.5, size (and inf/NaN) on each axis: output and
    every gradient equal the released CUDA kernel's, hand-computed in tests/dcnv3_naive.py
    (a point is skipped unless -1 < loc < size; at integers the derivative looks right)."""
    (x, offset, mask), want = border_problem(dtype, DEVICE)
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, **BORDER_PARAMS, backend="triton")
    got = (out, *torch.autograd.grad(out.sum(), leaves))
    for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fused_softmax", [False, True], ids=["weights", "logits"])
def test_fresh_layer_border_offset_gradient_matches_released_kernel(fused_softmax):
    """Zero offsets with padding 1 put the corner outputs' outer grid points at exactly -1
    and 3 (= size); the released kernel gives those points no offset gradient. With
    logits, zeros are the uniform 1/9 weights after the kernel's softmax."""
    x, offset, mask = (t.requires_grad_() for t in fresh_layer_problem(device=DEVICE))
    if fused_softmax:
        logits = torch.zeros_like(mask, requires_grad=True)
        out = dcnv3_softmax(x, offset, logits, **FRESH_LAYER_PARAMS)
    else:
        out = dcnv3(x, offset, mask, **FRESH_LAYER_PARAMS, backend="triton")
    grad_offset = torch.autograd.grad(out.sum(), offset)[0].view(3, 3, 9, 2).cpu()
    for (i, j), rows in FRESH_LAYER_GRAD_OFFSET_X9.items():
        want = torch.tensor(rows, dtype=torch.float64) / 9
        torch.testing.assert_close(grad_offset[i, j], want, rtol=0, atol=1e-12)


def test_fused_softmax_matches_softmax_then_reference():
    case = CASES[1]
    x, off, mask, go = _make(case, seed=4)
    k = case["ks"] ** 2
    logits = torch.randn(mask.shape, dtype=mask.dtype, device=mask.device) * 3

    def reference(x, off, logits):
        p = F.softmax(logits.unflatten(-1, (case["groups"], k)), -1).flatten(-2)
        return dcnv3(x, off, p, **_params(case), backend="reference")

    leaves = [t.clone().requires_grad_() for t in (x, off, logits)]
    want = reference(*leaves)
    want_grads = torch.autograd.grad(want, leaves, go)
    leaves = [t.clone().requires_grad_() for t in (x, off, logits)]
    got = dcnv3_softmax(*leaves, **_params(case))
    got_grads = torch.autograd.grad(got, leaves, go)
    _assert_close((got, *got_grads), (want, *want_grads), 1e-10, "softmax")


def test_module_uses_fused_softmax_and_matches_reference():
    torch.manual_seed(5)
    tri = DCNv3(24, group=3, offset_scale=2.0, backend="triton").to(DEVICE).double()
    for lin in (tri.offset, tri.mask):  # non-trivial offsets and weights
        torch.nn.init.normal_(lin.weight, std=0.5)
    ref = DCNv3(24, group=3, offset_scale=2.0, backend="reference").to(DEVICE).double()
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 5, 7, 24, dtype=torch.float64, device=DEVICE)
    outs = []
    for m in (tri, ref):
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    assert _rel(outs[0][0], outs[1][0]) < 1e-10
    for a, b in zip(outs[0][1], outs[1][1]):
        assert _rel(a, b) < 1e-9


def _compile_backend():
    # Inductor on CPU spends ~25 s compiling C++ here; aot_eager still runs Dynamo with
    # fullgraph, fake tensors and AOTAutograd over the custom ops, which is what matters.
    return "inductor" if DEVICE == "cuda" else "aot_eager"


def test_torch_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    case = CASES[3]
    x, off, mask, go = _make(case, dtype=torch.float32, seed=6)

    def fn(x, off, mask):
        return dcnv3(x * 2, off, mask, **_params(case), backend="triton").relu()

    compiled = torch.compile(fn, fullgraph=True, backend=_compile_backend())
    results = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, off, mask)]
        out = f(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, go)))
    _assert_close(results[1], results[0], 1e-6, "compile")

    torch.manual_seed(7)
    module = DCNv3(16, group=2, backend="triton").to(DEVICE)
    torch.nn.init.normal_(module.offset.weight, std=0.5)
    xm = torch.randn(1, 5, 6, 16, device=DEVICE)
    eager = module(xm)
    compiled_module = torch.compile(module, fullgraph=True, backend=_compile_backend())
    assert _rel(compiled_module(xm), eager) < 1e-6


def test_activation_checkpoint_gives_same_gradients():
    from torch.utils.checkpoint import checkpoint

    case = CASES[0]
    x, off, mask, go = _make(case, seed=8)

    def fn(x, off, mask):
        return dcnv3(x.tanh(), off, mask, **_params(case), backend="triton") * 3

    results = []
    for use_cp in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, off, mask)]
        out = checkpoint(fn, *leaves, use_reentrant=False) if use_cp else fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, go)))
    _assert_close(results[1], results[0], 1e-12, "checkpoint")


def test_empty_batch():
    case = _case(0, 5, 5, 2, 4)
    tensors = _make(case, far=False)
    out, grads = _run("triton", case, *tensors)
    assert out.shape == (0, 5, 5, 8) and [g.shape for g in grads] == [t.shape for t in
                                                                        tensors[:3]]


def test_backend_registry_and_device_errors(monkeypatch):
    assert "triton" in available_backends()
    case = CASES[0]
    x, off, mask, _ = _make(case, dtype=torch.float32, device="cpu")
    # auto never picks Triton for CPU tensors (the interpreter is for tests only).
    auto = dcnv3(x, off, mask, **_params(case), backend="auto")
    torch.testing.assert_close(auto, dcnv3(x, off, mask, **_params(case), backend="reference"))
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        dcnv3(x, off, mask, **_params(case), backend="triton")
    with pytest.raises(ValueError, match="mask must have shape"):
        dcnv3_softmax(x, off, mask[..., :-1], **_params(case))


def test_benchmark_dry_run_plans_every_layer():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dcnv3_gpu.py"),
                           "--dry-run"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    layers = plan["layers"]
    assert {row["model"] for row in layers} == {"internimage_t_224", "internimage_h_640"}
    assert len(layers) == 8
    t_first = next(r for r in layers if r["model"] == "internimage_t_224")
    assert t_first["input_shape"][1:] == [56, 56, 64] and t_first["groups"] == 4


def _gpu_check(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--out", str(tmp_path), "--smoke", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return proc, report


def test_gpu_check_smoke_run_checks_every_output_against_float64(tmp_path):
    """benchmarks/gpu_check.py on CPU (interpreter, tiny stand-ins for the H shapes):
    every correctness row compares output and the three gradients with float64 and
    passes the flash-attention rule (error <= 2x the reference's own error at the same
    precision); the report names the environment and what was not measured."""
    proc, report = _gpu_check(tmp_path, "--phases", "env,correctness,memory,released",
                              "--dtypes", "bfloat16", "--offsets", "far")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["env"]["smoke"] is True and report["env"]["triton"]
    rows = report["phases"]["correctness"]["rows"]
    assert {(r["shape"], r["variant"]) for r in rows} == {
        (s, v) for s in ("h_stage1_batch2", "h_stage4_batch16") for v in ("weights", "softmax")}
    for row in rows:
        assert row["ok"], row
        assert set(row["triton_error"]) == {"output", "grad_input", "grad_offset", "grad_mask"}
        assert 0 < row["triton_error"]["output"] < 2e-2  # bf16: a few ulps in norm
    assert report["phases"]["correctness"]["all_ok"] is True
    assert report["phases"]["memory"]["skipped"] and report["phases"]["released"]["reason"]
    assert report["summary"]["correctness_all_ok"] is True


def test_gpu_check_out_of_time_records_every_row_as_skipped(tmp_path):
    """A run that has no time left still writes its report: each row it did not start is
    listed as skipped, and nothing claims a pass."""
    proc, report = _gpu_check(tmp_path, "--budget-s", "0", "--stages", "1,4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    correctness = report["phases"]["correctness"]
    assert len(correctness["rows"]) == 2 * 3 * 2 * 2  # shapes x offsets x variants x dtypes
    assert all(r["skipped"] == "time budget" for r in correctness["rows"])
    assert correctness["all_ok"] is None and report["summary"]["correctness_all_ok"] is None
    speed = report["phases"]["speed"]["rows"]
    assert [r["stage"] for r in speed] == [1] * 4 + [4] * 4


def test_gpu_session_script_runs_check_and_released_build_and_keeps_the_logs(tmp_path):
    """benchmarks/gpu_session.sh, the one command a lent GPU runs: the released op's build
    starts beside gpu_check (here from a folder without the sources: the build fails and
    says so in its log; gpu_check records why the released phase has no numbers), the
    report and both logs land in OUT, and with no time left the sweep is not started."""
    out, src = tmp_path / "out", tmp_path / "no_sources"
    src.mkdir()
    env = dict(os.environ, GPU_CHECK_ARGS="--smoke --stages 1,4", CHECK_BUDGET_S="0",
               TOTAL_S="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # our python
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(out),
                           str(src)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no time left for the sweep" in proc.stdout
    assert {"gpu_check.json", "gpu_check.log", "released_build.log"} <= {
        p.name for p in out.iterdir()}
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["env"]["smoke"] is True
    assert all(r["skipped"] == "time budget"
               for r in report["phases"]["correctness"]["rows"])
    assert not (out / "dcnv3_sweep.json").exists()


def test_released_op_wrapper_uses_the_current_signature_and_the_old_one(monkeypatch):
    """The released extension's dcnv3_forward takes 16 arguments and dcnv3_backward 17,
    the last being remove_center (OpenGVLab/InternImage classification/ops_dcnv3/
    functions/dcnv3_func.py); builds from before remove_center take one fewer. The
    benchmark's wrapper must call either correctly (not crash with TypeError)."""
    import types

    sys.path.insert(0, str(REPO / "benchmarks"))
    from dcnv3_gpu import released_op

    x = torch.randn(2, 4, 4, 8)
    off, mask = torch.zeros(2, 4, 4, 2 * 9 * 2), torch.full((2, 4, 4, 2 * 9), 1 / 9)
    for n_forward in (16, 15):
        calls = []

        def forward(*args, n=n_forward, calls=calls):
            if len(args) != n:
                raise TypeError(f"dcnv3_forward(): incompatible function arguments ({len(args)})")
            calls.append(("forward", args[3:]))
            return torch.zeros_like(args[0])

        def backward(*args, n=n_forward + 1, calls=calls):
            if len(args) != n:
                raise TypeError("dcnv3_backward(): incompatible function arguments")
            calls.append(("backward", args[3:14], args[15:]))
            return [torch.zeros_like(t) for t in args[:3]]

        monkeypatch.setitem(sys.modules, "DCNv3",
                            types.SimpleNamespace(dcnv3_forward=forward, dcnv3_backward=backward))
        run = released_op()
        leaves = [t.clone().requires_grad_() for t in (x, off, mask)]
        out = run(*leaves, kernel_size=3, stride=1, padding=1, dilation=1, groups=2,
                  offset_scale=1.0)
        out.sum().backward()
        # kernel h/w, stride h/w, pad h/w, dilation h/w, group, group_channels, scale,
        # im2col_step (= batch), [remove_center = 0]
        args = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, 2) + ((0,) if n_forward == 16 else ())
        assert calls[0] == ("forward", args)
        assert calls[1][0] == "backward" and calls[1][1] == args[:11]
        assert calls[1][2] == args[11:]


# The Triton the GPU machine runs (torch 2.11's pin, /work/.library/device/README.md),
# installed beside ours by `make test` (Makefile: GPU_TRITON_DIR). Its compiler can lay
# out the same kernel differently: 3.6 put a strided offset load in a layout of its own
# and converted between layouts at every point of the loop, where 3.8 needed none.
GPU_TRITON_DIR = os.environ.get("GPU_TRITON_DIR", "")


def _code_script(*args: str, triton_dir: str = "") -> subprocess.CompletedProcess:
    """Run benchmarks/dcnv3_sm90_code.py (the kernels compiled for a GPU, by default an
    H100's sm_90, as a launch at an InternImage-H layer would compile them; no GPU
    needed). With ``triton_dir``, by the Triton installed there instead of ours."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_dir:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_dir,
                                                          env.get("PYTHONPATH")]))
        # its own cache: two compilers must not share compiled kernels
        env["TRITON_CACHE_DIR"] = str(Path(triton_dir) / "cache")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dcnv3_sm90_code.py"),
                           *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=env)
    if proc.returncode and ("ptxas" in proc.stderr or "cuobjdump" in proc.stderr) \
            and "not found" in proc.stderr:
        pytest.skip("Triton's bundled ptxas/cuobjdump is missing")
    return proc


def _sm90_code(*args: str, triton_dir: str = "") -> list[dict]:
    """Counts from benchmarks/dcnv3_sm90_code.py, one dict per compiled variant."""
    proc = _code_script(*args, triton_dir=triton_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module", params=["ours", "gpu_machine"])
def widest_sm90(request) -> list[dict]:
    """The offered configs (``offered_configs``: loop and unrolled, forward and
    backward, bf16 and fp32) that keep the most positions per thread, compiled for sm_90
    by this environment's Triton and by the GPU machine's; the other configs run the
    same code on fewer rows (compiling all of them takes minutes)."""
    triton_dir = ""
    if request.param == "gpu_machine":
        if not GPU_TRITON_DIR or not (Path(GPU_TRITON_DIR) / "triton").is_dir():
            pytest.skip("the GPU machine's Triton is not installed: run `make test` "
                        "(it installs it into GPU_TRITON_DIR)")
        triton_dir = GPU_TRITON_DIR
    rows = _sm90_code("--kernels", "fwd,bwd", "--variants", "bf16:softmax,fp32:weights",
                      "--widest", triton_dir=triton_dir)
    import triton

    versions = {r["triton"] for r in rows}
    if triton_dir:  # the other compiler did run
        assert versions and triton.__version__ not in versions, versions
    else:
        assert versions == {triton.__version__}
    return rows


def _where(row: dict) -> str:
    return (f"triton {row['triton']} {row['kernel']} {row['dtype']} "
            f"BLOCK_P={row['BLOCK_P']} num_warps={row['num_warps']} unroll={row['unroll']}")


def test_compiled_backward_atomics_are_relaxed_unfenced_and_nothing_spills(widest_sm90):
    """grad_input's atomic adds must not order memory: the released CUDA op uses plain
    ``atomicAdd``, which the CUDA C++ Programming Guide ("Atomic Functions") describes as
    not acting as a memory fence, i.e. PTX ``red``/``atom`` with ``.relaxed`` semantics
    (PTX ISA, "Memory Consistency Model": relaxed operations carry no ordering). An
    ``.acq_rel`` atomic (Triton's default) makes ptxas wrap each one in MEMBAR/ERRBAR
    and invalidate L1 (CCTL). Every autotuning config must also fit in registers: local
    memory loads/stores (LDL/STL) in the cubin are ptxas's spill code. None may sit in
    the point loop (9 trips) or in an unrolled kernel; outside the loop a value kept
    across it costs one store and one load per thread, which is allowed once: Triton
    3.8's ptxas keeps one in the split fp32 forward at 128x8, the fastest fp32 config
    on an H200 (Triton 3.6 keeps none)."""
    rows = widest_sm90
    offered = {(kernel, elem): triton_kernels.offered_configs(kernel, dtype)
               for kernel in ("fwd", "bwd")
               for elem, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    compiled = {(r["kernel"], r["dtype"], r["BLOCK_P"], r["num_warps"], r["unroll"])
                for r in rows}
    for (kernel, elem), configs in offered.items():
        # The widest configs (most positions per warp) hold the most per thread; both
        # the looped and the unrolled variant where offered.
        most = max(c[0] // c[1] for c in configs)
        assert {(kernel, elem, *c) for c in configs if c[0] // c[1] == most} == {
            c for c in compiled if c[:2] == (kernel, elem)}
    for row in rows:
        spills = row["sass_loop"] if not row["unroll"] else row["sass"]
        assert spills["STL"] == spills["LDL"] == 0, (_where(row), row["registers"])
        kept = 1 if (row["kernel"], row["dtype"], row["BLOCK_P"], row["num_warps"]) == (
            "fwd", "fp32", 128, 8) else 0  # the one value named above, outside the loop
        assert row["sass"]["STL"] <= kept and row["sass"]["LDL"] <= kept, (
            _where(row), row["sass"])
        assert row["registers"] <= 255
    for row in rows:
        if row["kernel"] != "bwd":
            continue
        atomics = row["ptx"]["atom"] + row["ptx"]["red"]
        assert atomics > 0, _where(row)
        assert row["ptx"]["relaxed"] == atomics and row["ptx"]["acq_rel"] == 0, (
            _where(row), row)
        assert row["ptx"]["fence"] == 0, (_where(row), row["ptx"])
        fences = {k: row["sass"][k] for k in ("MEMBAR", "ERRBAR", "CCTL")}
        assert fences == {"MEMBAR": 0, "ERRBAR": 0, "CCTL": 0}, (_where(row), fences)


def test_compiled_point_loops_have_no_barriers(widest_sm90):
    """A layout conversion between tiles goes through shared memory and needs ``bar.sync``
    (PTX ISA: barrier) on both sides; inside the K-point loop that would stall every
    step. The loop of both kernels, bf16 and fp32, must compile without any (the loop is
    found from its back-edge in PTX and in SASS; the unrolled variants have none)."""
    looped = [r for r in widest_sm90 if not r["unroll"]]
    assert {(r["kernel"], r["dtype"]) for r in looped} == {
        (k, d) for k in ("fwd", "bwd") for d in ("bf16", "fp32")}
    for row in looped:
        assert row["loop_found"], _where(row)
        assert row["ptx_loop"]["bar_sync"] == 0, (_where(row), row["ptx_loop"])
        assert row["sass_loop"]["BAR_SYNC"] == 0, (_where(row), row["sass_loop"])


def test_backward_compiles_from_the_oldest_gpu_auto_takes_triton_on_and_not_before():
    """ptxas refuses the backward's relaxed atomics below sm_70 (PTX ISA: ``.relaxed``
    needs sm_70; the forward would compile for sm_60, so a Pascal GPU failed at its first
    backward). ``triton_backend.MIN_CAPABILITY`` must be that bound: the backward compiles
    for it and not for the generation before (sm_60)."""
    block_p, warps, unroll = triton_kernels.offered_configs("bwd", torch.float32)[0]
    config = f"{block_p}x{warps}{'u' * unroll}"
    major, minor = triton_backend.MIN_CAPABILITY
    args = ("--kernels", "bwd", "--variants", "fp32:weights", "--configs", config,
            "--compile-only")
    [row] = _sm90_code(*args, "--arch", f"{major}{minor}")
    assert row["arch"] == major * 10 + minor and row["cubin_bytes"] > 0
    assert row["ptx"]["relaxed"] > 0
    older = _code_script(*args, "--arch", "60")
    assert older.returncode != 0
    assert "'.relaxed' requires .target sm_70" in older.stderr, older.stderr[-2000:]


@pytest.mark.parametrize("capability, expected", [((6, 1), "reference"), ((7, 0), "triton"),
                                                  ((9, 0), "triton")])
def test_auto_takes_triton_only_on_gpus_it_compiles_for(monkeypatch, capability, expected):
    """``auto`` on a GPU older than ``MIN_CAPABILITY`` (a P100 or GTX 10xx: 6.x) takes the
    reference op instead of crashing at the first backward; ``backend="triton"`` given
    on one says why it cannot run there."""
    from types import SimpleNamespace

    from ops.dcnv3.function import pick_backend
    from ops.dcnv3.reference import dcnv3_reference

    monkeypatch.setattr(triton_backend, "_capability", lambda index: capability)
    gpu = torch.device("cuda", 0)
    picked = pick_backend("auto", gpu)
    assert picked is (triton_backend.dcnv3_triton if expected == "triton"
                      else dcnv3_reference)
    if expected == "reference":
        with pytest.raises(RuntimeError, match=r"compute capability 7\.0 or newer; cuda:0 "
                           r"has 6\.1: use backend='reference'"):
            triton_backend._check_device(SimpleNamespace(device=gpu))


def test_autotuner_pruning_offers_unrolled_loops_only_where_they_fit():
    """The autotuner's pruning hook (Triton calls ``early_config_prune(configs,
    named_args)`` with the launch's arguments by name) keeps, for the launch's input
    dtype, exactly ``offered_configs``: the unrolled forward only for 16-bit inputs (it
    spills from 4-byte inputs on, see the sm_90 test above), the unrolled backward never
    (it spills at 64x4 and ran slower on an H200), the looped kernels always."""
    for kernel, unrolled_dtypes in (("fwd", {torch.bfloat16, torch.float16}), ("bwd", set())):
        configs = triton_kernels._configs(kernel, interpret=False)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            kept = triton_kernels.prune_configs(kernel, configs,
                                                {"x_ptr": torch.empty(0, dtype=dtype)})
            unroll = {c.kwargs["UNROLL"] for c in kept}
            assert unroll == ({0, 1} if dtype in unrolled_dtypes else {0}), (kernel, dtype)
            looped = {(c.kwargs["BLOCK_P"], c.num_warps) for c in kept
                      if c.kwargs["UNROLL"] == 0}
            assert looped == set(triton_kernels.GPU_CONFIGS[kernel]), (kernel, dtype)


def test_autotune_key_separates_internimage_h_stages():
    """InternImage-H has 32 channels per group in every stage (320 * 2**i channels in
    10 * 2**i groups, REFERENCE.md / the released H config) and a 640 px input at stride
    4 * 2**i, so group width and kernel size alone cannot tell stage 1 (160x160
    positions per image) from stage 4 (20x20, 64x fewer). The autotuning key must, as
    it must tell the fused-softmax variant from the plain one."""
    keys = set()
    names = triton_kernels.dcnv3_fwd_kernel.arg_names
    for stage in (0, 3):
        size, channels = 160 // 2**stage, 320 * 2**stage
        scalars = triton_kernels.launch_args((16, size, size, channels),
                                             (16, size, size, 0), 10 * 2**stage, 3, 1, 1,
                                             1, 1.0)
        args = dict(zip(names[4:], scalars))
        assert args["GC"] == 32
        for softmax in (False, True):
            args.update(KS=3, SOFTMAX=softmax)
            keys.add(tuple(args[k] for k in triton_kernels.dcnv3_fwd_kernel.keys))
    assert len(keys) == 4, keys


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_larger_shapes(dtype):
    case = _case(4, 56, 56, 4, 16, scale=0.7)  # 0.7: see test_half_error_at_most_twice...
    low = _make(case, dtype=dtype, seed=9)
    exact = [t.double() for t in low]
    want = _both("reference", case, exact)
    ref_low = _both("reference", case, low)
    tri_low = _both("triton", case, low)
    for t, r, w in zip(tri_low, ref_low, want):
        assert not torch.isnan(t).any()
        assert _rel(t, w) <= max(2 * _rel(r, w), 1e-4 if dtype == torch.float32 else 0.0)


@pytest.mark.gpu
def test_gpu_internimage_h_layer_fp64():
    case = _case(1, 40, 40, 40, 32, scale=1.0)
    tensors = _make(case, seed=10)
    _assert_close(_both("triton", case, tensors), _both("reference", case, tensors), 1e-10,
                  "H stage 3")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_skipped_points_weight_is_never_read(backend):
    """The released kernel samples a point only if -1 < loc < size and never reads the
    weight of one it skips (dcnv3_im2col_cuda.cuh: the weight is multiplied inside that
    branch): a NaN or inf weight there leaves output and gradients as a zero weight would."""
    torch.manual_seed(5)
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64, device=DEVICE)
    offset = torch.randn(2, 5, 6, 2 * 9 * 2, dtype=torch.float64, device=DEVICE)
    offset[..., 0] = 50.0         # group 0, point 0: x far right of the image: skipped
    offset[..., 9 * 2 + 9] = -50  # group 1, point 4: y far above: skipped
    mask = torch.rand(2, 5, 6, 2 * 9, dtype=torch.float64, device=DEVICE)
    go = torch.randn(2, 5, 6, 8, dtype=torch.float64, device=DEVICE)
    params = dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=2)

    def run(point_weights):
        m = mask.clone()
        m[..., 0], m[..., 9 + 4] = point_weights
        leaves = [t.clone().requires_grad_() for t in (x, offset, m)]
        out = dcnv3(*leaves, **params, backend=backend)
        return (out, *torch.autograd.grad(out, leaves, go))

    want = run((0.0, 0.0))
    for bad in (float("nan"), float("inf")):
        got = run((bad, -bad))
        for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12,
                                       msg=lambda m, n=name, v=bad: f"{v} {n}: {m}")
