"""The pure-PyTorch DCNv3: exact semantics, gradients, precision, memory, argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ops.dcnv3.reference as reference
from ops.dcnv3 import DCNv3, dcnv3, output_size
from tests.dcnv3_naive import (
    BORDER_PARAMS,
    FRESH_LAYER_GRAD_OFFSET_X9,
    FRESH_LAYER_PARAMS,
    border_problem,
    dcnv3_naive,
    fresh_layer_problem,
)

# (N, H, W, groups, group_channels, kernel, stride, padding, dilation, offset_scale, offset_std)
CASES = [
    (2, 5, 7, 2, 3, 3, 1, 1, 1, 1.0, 1.0),
    (1, 7, 6, 1, 4, 3, 2, 1, 1, 1.0, 1.5),  # stride 2, odd/even sizes
    (1, 6, 7, 3, 2, 3, 1, 2, 2, 1.0, 1.0),  # dilation 2
    (1, 6, 5, 2, 2, 5, 1, 2, 1, 1.0, 1.0),  # kernel 5
    (2, 5, 5, 2, 3, 3, 1, 1, 1, 2.0, 1.0),  # offset_scale 2
    (1, 4, 5, 2, 2, 3, 1, 1, 1, 1.0, 6.0),  # many samples far outside the image
]


def _inputs(case, dtype=torch.float64, seed=None):
    n, h, w, g, gc, k, s, p, d, _, std = case
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    ho, wo = output_size(h, k, s, p, d), output_size(w, k, s, p, d)
    x = torch.randn(n, h, w, g * gc, generator=gen, dtype=dtype)
    offset = torch.randn(n, ho, wo, g * k * k * 2, generator=gen, dtype=dtype) * std
    logits = torch.randn(n, ho, wo, g, k * k, generator=gen, dtype=dtype)
    mask = logits.softmax(-1).reshape(n, ho, wo, g * k * k)
    return x, offset, mask


def _kw(case):
    _, _, _, g, _, k, s, p, d, scale, _ = case
    return dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g, offset_scale=scale)


@pytest.mark.parametrize("case", CASES)
def test_matches_naive_loop_implementation(case):
    x, offset, mask = _inputs(case)
    kw = _kw(case)
    got = dcnv3(x, offset, mask, backend="reference", **kw)
    want = dcnv3_naive(x, offset, mask, kw["kernel_size"], kw["stride"], kw["padding"],
                       kw["dilation"], kw["groups"], kw["offset_scale"])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    x, offset, mask = (t.requires_grad_() for t in _inputs(case))
    kw = _kw(case)
    # Keep offsets away from integer pixel positions, where bilinear weights have kinks.
    with torch.no_grad():
        offset += 0.37 * (offset.frac().abs() < 0.05)
    # fast_mode compares random projections v^T J u of the analytic and numerical
    # Jacobians (torch.autograd.gradcheck docs) instead of one forward per input element
    # (thousands here, 30-60 s per case). It scales atol by sum(u)*sum(v) (~1e3 here), so
    # the tolerances are tight: float64 central differences agree to ~1e-10, and a
    # gradient off by a factor 1.0001 fails.
    assert torch.autograd.gradcheck(
        lambda a, b, c: dcnv3(a, b, c, backend="reference", **kw), (x, offset, mask),
        eps=1e-6, atol=1e-9, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_border_rule_matches_released_kernel(dtype):
    """Locations -1, -0.5, 0, size-1, size-0.5, size (and inf/NaN) on each axis: output and
    every gradient equal the released CUDA kernel's, hand-computed in tests/dcnv3_naive.py
    (a point is skipped unless -1 < loc < size; at integers the derivative looks right)."""
    (x, offset, mask), want = border_problem(dtype)
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    out = dcnv3(*leaves, **BORDER_PARAMS, backend="reference")
    got = (out, *torch.autograd.grad(out.sum(), leaves))
    for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    # The loop implementation the random-input tests compare with follows the same rule.
    plain = dcnv3_naive(x.detach(), offset.detach(), mask.detach(), 1, 3, 0, 1, 1, 1.0)
    torch.testing.assert_close(plain, want[0], rtol=0, atol=1e-12)


def test_fresh_layer_border_offset_gradient_matches_released_kernel():
    """Zero offsets with padding 1 put the corner outputs' outer grid points at exactly -1
    and 3 (= size); the released kernel gives those points no offset gradient."""
    x, offset, mask = (t.requires_grad_() for t in fresh_layer_problem())
    out = dcnv3(x, offset, mask, **FRESH_LAYER_PARAMS, backend="reference")
    grad_offset = torch.autograd.grad(out.sum(), offset)[0].view(3, 3, 9, 2)
    for (i, j), rows in FRESH_LAYER_GRAD_OFFSET_X9.items():
        want = torch.tensor(rows, dtype=torch.float64) / 9
        torch.testing.assert_close(grad_offset[i, j], want, rtol=0, atol=1e-12)


def test_bf16_forward_within_bf16_tolerance():
    case = (2, 9, 11, 4, 8, 3, 1, 1, 1, 1.0, 1.5)
    x, offset, mask = _inputs(case)
    kw = _kw(case)
    exact = dcnv3(x, offset, mask, **kw)
    low = dcnv3(x.bfloat16(), offset.bfloat16(), mask.bfloat16(), **kw)
    assert low.dtype == torch.bfloat16
    # Inputs are rounded to bf16 (rel. 2**-8) and so is the output: a few ulps in norm.
    rel = (low.double() - exact).norm() / exact.norm()
    assert rel < 2e-2, rel


def test_chunked_batch_gives_identical_values_and_grads(monkeypatch):
    case = (5, 6, 6, 2, 4, 3, 1, 1, 1, 1.0, 1.0)
    x, offset, mask = (t.requires_grad_() for t in _inputs(case, torch.float32))
    kw = _kw(case)
    out_full = dcnv3(x, offset, mask, **kw)
    grads_full = torch.autograd.grad(out_full.square().sum(), (x, offset, mask))
    per_sample = reference._CORNERS * 6 * 6 * 9 * 8  # gathered corner values per sample
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * per_sample)  # 3 chunks of <= 2
    out_chunk = dcnv3(x, offset, mask, **kw)
    grads_chunk = torch.autograd.grad(out_chunk.square().sum(), (x, offset, mask))
    torch.testing.assert_close(out_chunk, out_full)
    for a, b in zip(grads_chunk, grads_full):
        torch.testing.assert_close(a, b)


def test_backward_keeps_no_sampled_values():
    """Autograd must keep only the op's inputs, never the K-times-larger sampled values."""
    case = (2, 8, 8, 2, 8, 3, 1, 1, 1, 1.0, 1.0)
    x, offset, mask = (t.requires_grad_() for t in _inputs(case, torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        dcnv3(x, offset, mask, **_kw(case))
    assert sum(saved) <= x.numel() + offset.numel() + mask.numel()


def test_meta_device_saves_what_a_real_call_saves_and_gives_shaped_grads():
    """Memory plans run the model on the meta device: the op must keep exactly the tensors
    a CPU call keeps (so the plan is right) and give gradients of the inputs' shapes."""
    case = (3, 9, 7, 2, 8, 3, 2, 1, 1, 1.0, 1.0)

    def run(device):
        inputs = [t.to(device).requires_grad_() for t in _inputs(case, torch.float32)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = dcnv3(*inputs, **_kw(case))
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        return out.shape, saved, [g.shape for g in grads], [t.shape for t in inputs]

    cpu, meta = run("cpu"), run("meta")
    assert meta[:2] == cpu[:2]
    assert meta[2] == meta[3]


def test_zero_offsets_uniform_mask_is_a_box_filter():
    """A fresh layer (zero offsets, uniform weights) averages the regular 3x3 grid."""
    x = torch.randn(2, 7, 9, 6, dtype=torch.float64)
    offset = torch.zeros(2, 7, 9, 3 * 9 * 2, dtype=torch.float64)
    mask = torch.full((2, 7, 9, 3 * 9), 1 / 9, dtype=torch.float64)
    got = dcnv3(x, offset, mask, groups=3)
    want = F.avg_pool2d(x.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1))


def test_point_order_is_x_major():
    """Point k = kx*3 + ky: point 1 is kx=0 (x-1), ky=1 (y+0), the left neighbour."""
    x = torch.arange(25, dtype=torch.float64).view(1, 5, 5, 1)
    offset = torch.zeros(1, 5, 5, 18, dtype=torch.float64)
    mask = torch.zeros(1, 5, 5, 9, dtype=torch.float64)
    mask[..., 1] = 1.0
    out = dcnv3(x, offset, mask, groups=1)
    assert out[0, 2, 2, 0] == x[0, 2, 1, 0]  # row 2, column 1: one step left in x


@pytest.mark.parametrize("bad, message", [
    (lambda x, o, m: (x[0], o, m), "4-D"),
    (lambda x, o, m: (x, o[..., :-2], m), "offset must have shape"),
    (lambda x, o, m: (x, o, m[..., :-1]), "mask must have shape"),
    (lambda x, o, m: (x, o.float(), m), "share a dtype"),
    (lambda x, o, m: (x[..., :-1], o, m), "divisible by groups"),
])
def test_bad_arguments_fail_clearly(bad, message):
    x, offset, mask = _inputs((1, 4, 4, 2, 2, 3, 1, 1, 1, 1.0, 1.0))
    with pytest.raises((ValueError, TypeError), match=message):
        dcnv3(*bad(x, offset, mask), groups=2)


def test_unknown_backend_names_the_choices():
    x, offset, mask = _inputs((1, 4, 4, 1, 2, 3, 1, 1, 1, 1.0, 1.0))
    with pytest.raises(ValueError, match="available"):
        dcnv3(x, offset, mask, groups=1, backend="cuda-magic")


def test_module_fresh_layer_and_center_feature_scale():
    torch.manual_seed(0)
    layer = DCNv3(16, group=2, center_feature_scale=True).double()
    x = torch.randn(2, 6, 5, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    # Fresh layer: gate = sigmoid(0) = 1/2 blend of box-filtered and projected input.
    proj = layer.input_proj(x)
    box = F.avg_pool2d(proj.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, layer.output_proj(0.5 * box + 0.5 * proj))
    out.sum().backward()
    assert layer.offset.weight.grad is not None and layer.offset.weight.grad.abs().sum() > 0
    assert layer.mask.weight.grad.abs().sum() > 0


# --- The fused CPU formulation (ops/dcnv3/cpu_fused.py) -----------------------------------


def _fused(*args, **kw):
    from ops.dcnv3.cpu_fused import dcnv3_fused

    p = dict(kernel_size=3, stride=1, padding=1, dilation=1, offset_scale=1.0) | kw
    return dcnv3_fused(*args, p["kernel_size"], p["stride"], p["padding"], p["dilation"],
                       p["groups"], p["offset_scale"])


@pytest.mark.parametrize("case", CASES[1:4] + CASES[5:])
def test_fused_formulation_matches_naive_loop_and_its_gradients(case):
    x, offset, mask = _inputs(case, seed=11)
    kw = _kw(case)
    want = dcnv3_naive(x, offset, mask, kw["kernel_size"], kw["stride"], kw["padding"],
                       kw["dilation"], kw["groups"], kw["offset_scale"])
    torch.testing.assert_close(_fused(x, offset, mask, **kw), want, rtol=1e-10, atol=1e-10)
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    with torch.no_grad():
        offset += 0.37 * (offset.frac().abs() < 0.05)  # away from kinks, as gradcheck above
    assert torch.autograd.gradcheck(lambda a, b, c: _fused(a, b, c, **kw), leaves, eps=1e-6,
                                    atol=1e-9, rtol=1e-6, fast_mode=True)


def test_fused_formulation_follows_the_released_kernel_at_the_border():
    """The same hand-computed released-kernel values as the reference must meet
    (tests/dcnv3_naive.py: -1 < loc < size, one-sided derivative at integers)."""
    (x, offset, mask), want = border_problem(torch.float64)
    leaves = [t.requires_grad_() for t in (x, offset, mask)]
    out = _fused(*leaves, **BORDER_PARAMS)
    got = (out, *torch.autograd.grad(out.sum(), leaves))
    for name, a, b in zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    x, offset, mask = (t.requires_grad_() for t in fresh_layer_problem())
    out = _fused(x, offset, mask, **FRESH_LAYER_PARAMS)
    grad_offset = torch.autograd.grad(out.sum(), offset)[0].view(3, 3, 9, 2)
    for (i, j), rows in FRESH_LAYER_GRAD_OFFSET_X9.items():
        torch.testing.assert_close(grad_offset[i, j], torch.tensor(rows, dtype=torch.float64) / 9,
                                   rtol=0, atol=1e-12)


@pytest.fixture
def cpu_fused(monkeypatch):
    """ops.dcnv3.cpu_fused with a fresh compile state, compiled by Dynamo with the
    "eager" backend: the same tracing with dynamic shapes, without Inductor's C++ build
    (a minute on 2 cores; benchmarks/dcnv3_cpu.py checks Inductor's results)."""
    import ops.dcnv3.cpu_fused as module

    torch._dynamo.reset()
    monkeypatch.setattr(module, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(module, "_compiled", None)
    monkeypatch.setattr(module, "_compile_failed", False)
    monkeypatch.setattr(module, "_compiled_ran", False)
    yield module
    torch._dynamo.reset()


@pytest.mark.slow  # ~30 s on 2 busy cores: Dynamo traces five steps with dynamic shapes
def test_compiled_backend_equals_reference_with_and_without_grad(cpu_fused):
    case = (2, 6, 7, 2, 4, 3, 1, 1, 1, 1.0, 2.0)
    x, offset, mask = _inputs(case, torch.float32, seed=12)
    kw = _kw(case)
    results = []
    for backend in ("compiled", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
        out = dcnv3(*leaves, **kw, backend=backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
        with torch.no_grad():
            results[-1] += (dcnv3(x, offset, mask, **kw, backend=backend),)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_compiles_large_layers_and_stays_correct_without_a_compiler(
        cpu_fused, monkeypatch, caplog):
    """auto on CPU: small layers run the eager reference (no compile); a layer of
    COMPILE_MIN_SAMPLES or more takes the compiled op, and so does every layer after it;
    where compiling fails (no C++ compiler), one warning and the reference's results."""
    case = (2, 6, 7, 2, 4, 3, 1, 1, 1, 1.0, 2.0)
    x, offset, mask = _inputs(case, torch.float32, seed=13)
    kw = _kw(case)
    want = dcnv3(x, offset, mask, **kw, backend="reference")
    calls = []

    def compiler(fails: bool):
        """Stand-in for the compiled kernels: records each call (its first step)."""
        def loop(name):
            def run(*args):
                if name == "geometry":  # the first step of every call
                    calls.append(fails)
                if fails:
                    raise RuntimeError("InductorError: no working C++ compiler found")
                return getattr(cpu_fused.EAGER, name)(*args)
            return run
        return lambda: cpu_fused.Kernels(*map(loop, cpu_fused.Kernels._fields))

    monkeypatch.setattr(cpu_fused, "_compiled_kernels", compiler(fails=False))
    torch.testing.assert_close(dcnv3(x, offset, mask, **kw), want)
    assert calls == []  # 2*6*7*8*9 sampled values: below the threshold, not compiled yet
    monkeypatch.setattr(cpu_fused, "COMPILE_MIN_SAMPLES", 2 * 6 * 7 * 8 * 9)
    torch.testing.assert_close(dcnv3(x, offset, mask, **kw), want)
    monkeypatch.setattr(cpu_fused, "COMPILE_MIN_SAMPLES", 1 << 40)
    torch.testing.assert_close(dcnv3(x[:1], offset[:1], mask[:1], **kw), want[:1])
    assert calls == [False, False]  # the large layer, then the small one: compiled already

    monkeypatch.setattr(cpu_fused, "_compiled_ran", False)
    monkeypatch.setattr(cpu_fused, "COMPILE_MIN_SAMPLES", 1)
    monkeypatch.setattr(cpu_fused, "_compiled_kernels", compiler(fails=True))
    with caplog.at_level("WARNING", logger="ops.dcnv3.cpu_fused"):
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
            out = dcnv3(*leaves, **kw)
            torch.testing.assert_close(out, want)
            out.sum().backward()
    assert calls == [False, False, True]
    assert sum("compiling the fused CPU op failed" in r.message for r in caplog.records) == 1


def test_meta_tensors_through_compiled_never_reach_the_compiler(cpu_fused, monkeypatch):
    """A memory plan on the meta device with ``backend="compiled"`` must not hand meta
    tensors to the compiler: Inductor cannot build them, and that failure would switch the
    compiled op off for the rest of the process (every later CPU layer in the reference)."""
    def no_compiler():
        raise AssertionError("meta tensors reached the compiler")

    monkeypatch.setattr(cpu_fused, "_compiled_kernels", no_compiler)
    case = (2, 6, 7, 2, 4, 3, 1, 1, 1, 1.0, 2.0)
    inputs = [t.to("meta").requires_grad_() for t in _inputs(case, torch.float32)]
    out = dcnv3(*inputs, **_kw(case), backend="compiled")
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert out.shape == inputs[0].shape  # stride 1, padding 1
    assert [g.shape for g in grads] == [t.shape for t in inputs]
    assert not cpu_fused._compile_failed


@pytest.mark.slow  # ~15 s: Dynamo traces the fused op's loops
def test_auto_inside_a_fullgraph_compile_on_cpu_equals_the_reference(cpu_fused):
    """A user's ``torch.compile(model, fullgraph=True)`` on CPU: a small layer (below
    COMPILE_MIN_SAMPLES, which outside a compile runs the eager reference) must trace,
    and give the reference's output and gradients."""
    case = (2, 6, 7, 2, 4, 3, 1, 1, 1, 1.0, 2.0)
    x, offset, mask = _inputs(case, torch.float32, seed=14)
    kw = _kw(case)

    def layer(*leaves):
        return dcnv3(*leaves, **kw)

    results = []
    for fn in (torch.compile(layer, fullgraph=True, backend="eager"),
               lambda *leaves: dcnv3(*leaves, **kw, backend="reference")):
        leaves = [t.clone().requires_grad_() for t in (x, offset, mask)]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
