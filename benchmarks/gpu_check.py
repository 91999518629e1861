"""One-command check of the DCNv3 Triton kernels on one GPU: correctness, speed, memory.

    python benchmarks/gpu_check.py --out DIR            # one H100/H200, meant for < 8 min
    python benchmarks/gpu_check.py --out DIR --smoke    # no GPU: Triton interpreter, tiny shapes

Needs torch and triton only (plus this repository's ops/ and models/; no DeepSpeed, no
network). DIR/gpu_check.json is rewritten after every row of every phase, so a run cut
short keeps what it measured. Phases, in order:

1. ``env``: device, versions, device-to-device copy bandwidth (the roofline).
2. ``correctness``: output and all three gradients of the Triton op (plain weights, and
   logits with the fused softmax) against the float64 reference on the same rounded
   inputs, at InternImage-H layer shapes (stage 1 at batch 2, stage 4 at batch 16) with
   zero, random and far-outside offsets, in fp32 and bf16. Each relative error is
   bounded by a multiple of the reference backend's own error at the same precision
   (the flash-attention habit): ``ok`` when triton <= 2 x reference + 1e-6.
3. ``speed``: forward and forward+backward of the four H stages at batch 16
   (``triton.testing.do_bench``, median, L2 flushed), bf16 with fused softmax (what the
   model runs) and fp32 with weights, zero and random offsets; each time also as a
   fraction of the copy bandwidth under the ideal-traffic model of dcnv3_gpu.py; and
   forward+backward replayed from a CUDA graph (``forward_backward_graph_ms``: the GPU's
   time without the host's, which bounds the small stage-4 layer).
4. ``memory``: peak CUDA memory of one H stage-1 block forward+backward (bf16, batch 16),
   triton vs reference.
5. ``released``: the released CUDA op (``import DCNv3``), when importable: its error
   against float64 and its fp32 times at the same shapes, and our speed-up over it.

A time budget (``--budget-s``) skips the remaining rows, recorded as skipped, so the run
ends in time. Compiles: the kernels are specialised per dtype and softmax flag only
(shape arguments are generic), so the whole run compiles the configs the autotuner is
offered (``offered_configs``: forward 4, and 4 more unrolled for 16-bit inputs;
backward 3 looped and 3 unrolled) for each of the 4 variants: 48 kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

H_MODEL = "internimage_h_640"
OFFSET_KINDS = ("zero", "random", "far")
VARIANTS = ("weights", "softmax")
OUTPUTS = ("output", "grad_input", "grad_offset", "grad_mask")
# (name, stage index, batch): InternImage-H stage 1 and stage 4 (issue #15).
CORRECTNESS_SHAPES = (("h_stage1_batch2", 0, 2), ("h_stage4_batch16", 3, 16))
SPEED_VARIANTS = (("bfloat16", "softmax"), ("float32", "weights"))
SPEED_BATCH = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, Triton interpreter, tiny stand-ins for the H shapes")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new rows after this many seconds")
    parser.add_argument("--phases", default="env,correctness,speed,memory,released",
                        help="comma-separated subset of the phases, in any order")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="correctness dtypes (float32, bfloat16, float16)")
    parser.add_argument("--offsets", default=",".join(OFFSET_KINDS),
                        help=f"correctness offset kinds, from {OFFSET_KINDS}")
    parser.add_argument("--stages", default="1,2,3,4",
                        help="H stages (1-4) timed by the speed and released phases")
    parser.add_argument("--released-build", type=Path, default=None,
                        help="build dir of benchmarks/build_released_dcnv3.py (may still be "
                             "building: waited for, within the time budget)")
    return parser.parse_args(argv)


class Report:
    """The JSON report, rewritten (atomically) after every change."""

    def __init__(self, out_dir: Path, deadline: float):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu_check.json"
        self.deadline = deadline
        self.t0 = time.monotonic()
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "phases": {}}

    def phase(self, name: str) -> dict:
        return self.data["phases"].setdefault(name, {"rows": []})

    def add(self, phase: str, row: dict) -> None:
        self.phase(phase)["rows"].append(row)
        self.save()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


# --- shapes and inputs -------------------------------------------------------------------


def h_row(stage: int, batch: int, smoke: bool) -> dict:
    """The H layer row of dcnv3_gpu.py; with ``smoke`` a tiny stand-in that keeps H's 32
    channels per group and 3x3 kernel (2 groups, 5x5 or 3x3 positions, batch <= 2)."""
    from dcnv3_gpu import layer_row

    row = layer_row(H_MODEL, stage, batch)
    if not smoke:
        return row
    batch, size, groups = min(batch, 2), (5 if stage == 0 else 3), 2
    c, k = groups * row["group_channels"], row["kernel_size"] ** 2
    return dict(row, batch=batch, channels=c, groups=groups,
                input_shape=[batch, size, size, c], output_shape=[batch, size, size, c],
                offset_shape=[batch, size, size, groups * k * 2],
                mask_shape=[batch, size, size, groups * k])


def make_case(row: dict, offsets: str, device: str, seed: int = 0) -> dict:
    """float64 input, offsets of one kind, mask logits and upstream gradient."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float64)

    size = row["input_shape"][1]
    if offsets == "zero":  # a fresh layer: the regular grid, every sample on a pixel
        off = torch.zeros(row["offset_shape"], device=device, dtype=torch.float64)
    elif offsets == "random":  # a few pixels, as trained offsets
        off = 2 * randn(row["offset_shape"])
    elif offsets == "far":  # half the offsets put their point well outside the image
        off = 2 * randn(row["offset_shape"])
        far = torch.rand(off.shape, generator=gen, device=device) < 0.5
        sign = torch.where(randn(off.shape) > 0, 1.0, -1.0).double()
        off = torch.where(far, sign * (2 * size + 8 * torch.rand(
            off.shape, generator=gen, device=device, dtype=torch.float64)), off)
    else:
        raise ValueError(f"unknown offsets kind {offsets!r}; choose from {OFFSET_KINDS}")
    return {"x": randn(row["input_shape"]), "offset": off,
            "logits": 2 * randn(row["mask_shape"]), "grad_out": randn(row["output_shape"])}


def _weights(logits, groups: int):
    """Softmax over the K points of each group, in the logits' dtype."""
    import torch.nn.functional as F

    return F.softmax(logits.unflatten(-1, (groups, -1)), -1).flatten(-2)


def op_inputs(case: dict, variant: str, groups: int, dtype) -> list:
    """(input, offset, mask or logits, grad_out) rounded to ``dtype``: the op's own inputs.

    "weights": the op takes softmax-normalised weights (computed in float64, then rounded);
    "softmax": it takes the logits (the Triton kernel fuses the softmax).
    """
    third = case["logits"] if variant == "softmax" else _weights(case["logits"], groups)
    return [t.to(dtype) for t in (case["x"], case["offset"], third, case["grad_out"])]


def run_op(impl: str, variant: str, row: dict, x, offset, mask, grad_out) -> list:
    """Output and gradients (input, offset, mask or logits) of one implementation.

    ``impl``: "triton" or "reference". With ``variant`` "softmax", ``mask`` holds logits:
    the Triton kernel normalises them inside, the reference normalises them first (in
    their dtype, under autograd).
    """
    import torch
    from dcnv3_gpu import op_kwargs

    from ops.dcnv3 import dcnv3

    kw = op_kwargs(row)
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]
    if variant == "softmax" and impl == "triton":
        from ops.dcnv3.triton_backend import dcnv3_softmax

        out = dcnv3_softmax(*leaves, **kw)
    else:
        weights = _weights(leaves[2], row["groups"]) if variant == "softmax" else leaves[2]
        out = dcnv3(leaves[0], leaves[1], weights, **kw, backend=impl)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def rel_errors(got: list, want: list) -> dict:
    from dcnv3_gpu import rel_error

    return {name: rel_error(a, b) for name, a, b in zip(OUTPUTS, got, want)}


# --- phases -------------------------------------------------------------------------------


def phase_env(report: Report, device: str) -> None:
    """Device, versions and the copy bandwidth every speed figure is related to."""
    import torch
    import triton

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
           "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "smoke": device != "cuda"}
    if device == "cuda":
        from dcnv3_gpu import copy_bandwidth_gbs

        env["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
        env["total_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    report.data["env"] = env
    report.save()


def phase_correctness(report: Report, device: str, smoke: bool, dtypes: list[str],
                      offsets: list[str]) -> None:
    """Triton vs float64 (and the reference at the same precision) at H shapes."""
    from dcnv3_gpu import DTYPES

    phase = report.phase("correctness")
    phase["rule"] = "ok when triton_error <= 2 * reference_error + 1e-6 for every output"
    for name, stage, batch in CORRECTNESS_SHAPES:
        row = h_row(stage, batch, smoke)
        for kind in offsets:
            case = make_case(row, kind, device)
            for variant in VARIANTS:
                for dtype_name in dtypes:
                    entry = {"shape": name, "input_shape": row["input_shape"],
                             "groups": row["groups"], "offsets": kind, "variant": variant,
                             "dtype": dtype_name}
                    if report.out_of_time():
                        report.add("correctness", dict(entry, skipped="time budget"))
                        continue
                    t0 = time.monotonic()
                    try:
                        entry.update(_check_case(row, case, variant, DTYPES[dtype_name]))
                    except Exception as exc:  # noqa: BLE001 - record, go on
                        entry.update(ok=False, error=_error(exc))
                    entry["seconds"] = round(time.monotonic() - t0, 2)
                    report.add("correctness", entry)
    rows = [r for r in phase["rows"] if "skipped" not in r]
    # None: nothing was checked (all rows skipped), which is not a pass.
    phase["all_ok"] = all(r.get("ok") for r in rows) if rows else None


def _check_case(row: dict, case: dict, variant: str, dtype) -> dict:
    low = op_inputs(case, variant, row["groups"], dtype)
    # float64 on the same rounded inputs: what an exact op would return for them.
    exact = run_op("reference", variant, row, *[t.double() for t in low])
    ref_low = run_op("reference", variant, row, *low)
    tri_low = run_op("triton", variant, row, *low)
    tri_err, ref_err = rel_errors(tri_low, exact), rel_errors(ref_low, exact)
    nan = any(bool(t.isnan().any()) for t in tri_low)
    ok = not nan and all(tri_err[k] <= 2 * ref_err[k] + 1e-6 for k in OUTPUTS)
    return {"ok": ok, "nan": nan, "triton_error": tri_err, "reference_error": ref_err}


def _timer(device: str) -> Callable[[Callable], float]:
    if device == "cuda":
        from dcnv3_gpu import cuda_time_ms

        return cuda_time_ms

    def cpu_time_ms(fn):  # smoke runs only check the plumbing: one run
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    return cpu_time_ms


def time_op(impl: Callable, row: dict, tensors: list, timer) -> dict:
    """First-call seconds (compiles, autotuning), then forward and forward+backward ms."""
    import torch
    from dcnv3_gpu import op_kwargs

    x, offset, mask, grad_out = tensors
    kw = op_kwargs(row)
    leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]

    def forward():
        with torch.no_grad():
            impl(x, offset, mask, **kw)

    def forward_backward():
        for t in leaves:
            t.grad = None
        impl(*leaves, **kw).backward(grad_out)

    t0 = time.monotonic()
    forward_backward()
    _sync()
    first = time.monotonic() - t0
    stats = {"first_call_s": round(first, 2), "forward_ms": timer(forward),
             "forward_backward_ms": timer(forward_backward)}
    if torch.cuda.is_available() and x.is_cuda:
        try:
            stats["forward_backward_graph_ms"] = timer(_graphed(forward_backward))
        except Exception as exc:  # noqa: BLE001 - recorded; the plain times stand
            stats["forward_backward_graph_error"] = _error(exc)
    return stats


def _graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph; its replay. The replay's time is the GPU's
    alone: the op's Python, autograd and the launches stay out (what a training step
    under CUDA graphs, e.g. torch.compile's "reduce-overhead", would see). Warmed up on
    a side stream first, as torch.cuda.graphs' documentation asks (autotuning done)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _speed_tensors(row: dict, dtype, offsets: str, variant: str, device: str) -> list:
    return op_inputs(make_case(row, offsets, device, seed=1), variant, row["groups"], dtype)


def _with_bandwidth(stats: dict, row: dict, element_size: int, copy_gbs: float | None) -> dict:
    from dcnv3_gpu import ideal_bytes

    traffic = ideal_bytes(row, element_size)
    for key, phase in (("forward", "forward"), ("forward_backward", "forward_backward")):
        gbs = traffic[phase] / stats[f"{key}_ms"] / 1e6
        stats[f"{key}_gbs"] = gbs
        if copy_gbs:
            stats[f"{key}_of_copy_bw"] = gbs / copy_gbs
    return stats


def phase_speed(report: Report, device: str, smoke: bool, stages: list[int]) -> None:
    """The four H stages at batch 16, zero and random offsets, two dtype/variants."""
    from dcnv3_gpu import DTYPES

    from ops.dcnv3 import dcnv3
    from ops.dcnv3.triton_backend import dcnv3_softmax

    impls = {"weights": lambda *t, **kw: dcnv3(*t, **kw, backend="triton"),
             "softmax": dcnv3_softmax}
    timer = _timer(device)
    copy_gbs = report.data.get("env", {}).get("copy_bandwidth_gbs")
    for stage in stages:
        row = h_row(stage, SPEED_BATCH, smoke)
        for dtype_name, variant in SPEED_VARIANTS:
            for kind in ("zero", "random"):
                entry = {"stage": stage + 1, "batch": row["batch"],
                         "input_shape": row["input_shape"], "groups": row["groups"],
                         "dtype": dtype_name, "variant": variant, "offsets": kind}
                if report.out_of_time():
                    report.add("speed", dict(entry, skipped="time budget"))
                    continue
                try:
                    dtype = DTYPES[dtype_name]
                    tensors = _speed_tensors(row, dtype, kind, variant, device)
                    stats = time_op(impls[variant], row, tensors, timer)
                    entry.update(_with_bandwidth(stats, row, dtype.itemsize, copy_gbs))
                except Exception as exc:  # noqa: BLE001
                    entry["error"] = _error(exc)
                report.add("speed", entry)
    report.phase("speed")["autotuned"] = _autotuned_configs()
    report.save()


def _autotuned_configs() -> dict:
    """The config the autotuner chose per key (empty under the interpreter)."""
    from ops.dcnv3 import triton_kernels

    out = {}
    for name in ("dcnv3_fwd_kernel", "dcnv3_bwd_kernel"):
        cache = getattr(getattr(triton_kernels, name), "cache", {}) or {}
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


def _h_block_builder():
    """models' InternImage-H block; without timm (which models/ imports) an equal block
    from ops.DCNv3 and torch.nn, H's layout per REFERENCE.md section 1 (res_post_norm:
    x + LN(DCN(LN(x))), x + LN(MLP(LN(x))), centre-feature gate, dw kernel 5)."""
    try:
        from dcnv3_gpu import h_block

        import models.intern_image  # noqa: F401

        return h_block, "models.intern_image.InternImageLayer"
    except ImportError:
        return _plain_h_block, "benchmarks/gpu_check.py plain block (timm not installed)"


def _plain_h_block(stage: int, backend: str, device):
    import torch
    from dcnv3_gpu import MODELS
    from torch import nn

    from ops.dcnv3 import DCNv3

    base, groups, _, dw_kernel, offset_scale = MODELS[H_MODEL]
    c = base * 2**stage

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
            self.post1, self.post2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
            self.dcn = DCNv3(c, dw_kernel_size=dw_kernel, group=groups[stage],
                             offset_scale=offset_scale, center_feature_scale=True,
                             backend=backend)
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

        def forward(self, x):
            x = x + self.post1(self.dcn(self.norm1(x)))
            return x + self.post2(self.mlp(self.norm2(x)))

    with torch.device(device):
        return Block()


def phase_memory(report: Report, device: str, smoke: bool) -> None:
    """Peak memory of one H stage-1 block forward+backward, bf16, batch 16."""
    import torch
    from dcnv3_gpu import block_peak_memory

    phase = report.phase("memory")
    if device != "cuda":
        phase["skipped"] = "peak memory is measured with the CUDA caching allocator"
        report.save()
        return
    build, phase["block"] = _h_block_builder()
    row = h_row(0, SPEED_BATCH, smoke)
    for backend in ("triton", "reference"):
        entry = {"stage": 1, "batch": row["batch"], "dtype": "bfloat16", "backend": backend}
        if report.out_of_time():
            report.add("memory", dict(entry, skipped="time budget"))
            continue
        try:
            entry.update(block_peak_memory(row, backend, torch.bfloat16, build))
        except Exception as exc:  # noqa: BLE001
            entry["error"] = _error(exc)
        report.add("memory", entry)


def wait_for_build(report: Report, build_dir: Path) -> None:
    """Make a build of the released op importable once it has finished (or record why not)."""
    phase = report.phase("released")
    while not ((build_dir / "done").exists() or (build_dir / "failed").exists()):
        if report.out_of_time():
            phase["build"] = "still building when the time budget ran out"
            return
        time.sleep(2)
    if (build_dir / "failed").exists():
        phase["build"] = "failed: " + (build_dir / "failed").read_text()[-1500:]
        return
    phase["build"] = f"built in {(build_dir / 'done').read_text().strip()} s"
    sys.path.insert(0, str(build_dir))


def phase_released(report: Report, device: str, smoke: bool, stages: list[int],
                   build_dir: Path | None = None) -> None:
    """The released CUDA op, when importable: error vs float64 and fp32 speed."""
    import torch
    from dcnv3_gpu import op_kwargs, released_op

    phase = report.phase("released")
    if build_dir is not None and device == "cuda":
        wait_for_build(report, build_dir)
    op = released_op() if device == "cuda" else None
    if op is None:
        phase["available"] = False
        phase["reason"] = "`import DCNv3` failed" if device == "cuda" else "needs CUDA"
        report.save()
        return
    phase["available"] = True
    name, stage, batch = CORRECTNESS_SHAPES[1]
    row = h_row(stage, batch, smoke)
    case = make_case(row, "random", device)
    try:
        low = op_inputs(case, "weights", row["groups"], torch.float32)
        exact = run_op("reference", "weights", row, *[t.double() for t in low])
        leaves = [t.clone().requires_grad_() for t in low[:3]]
        out = op(*leaves, **op_kwargs(row))
        got = [out.detach(), *torch.autograd.grad(out, leaves, low[3])]
        phase["error_vs_float64"] = {"shape": name, "dtype": "float32",
                                     **rel_errors(got, exact)}
    except Exception as exc:  # noqa: BLE001
        phase["error_vs_float64"] = {"error": _error(exc)}
    report.save()
    timer = _timer(device)
    ours = {(r["stage"], r["offsets"]): r for r in report.phase("speed")["rows"]
            if r.get("dtype") == "float32" and "forward_backward_ms" in r}
    for stage in stages:
        row = h_row(stage, SPEED_BATCH, smoke)
        for kind in ("zero", "random"):
            entry = {"stage": stage + 1, "batch": row["batch"], "dtype": "float32",
                     "offsets": kind}
            if report.out_of_time():
                report.add("released", dict(entry, skipped="time budget"))
                continue
            try:
                tensors = _speed_tensors(row, torch.float32, kind, "weights", device)
                entry.update(time_op(op, row, tensors, timer))
                mine = ours.get((stage + 1, kind))
                if mine:
                    entry["triton_speedup_forward"] = entry["forward_ms"] / mine["forward_ms"]
                    entry["triton_speedup_forward_backward"] = (
                        entry["forward_backward_ms"] / mine["forward_backward_ms"])
                    if "forward_backward_graph_ms" in entry and \
                            "forward_backward_graph_ms" in mine:  # both without host time
                        entry["triton_speedup_forward_backward_graph"] = (
                            entry["forward_backward_graph_ms"]
                            / mine["forward_backward_graph_ms"])
            except Exception as exc:  # noqa: BLE001
                entry["error"] = _error(exc)
            report.add("released", entry)


def _error(exc: BaseException) -> str:
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
    return f"{type(exc).__name__}: {exc}".splitlines()[0] + " | " + "".join(tail)[-600:]


def summarise(report: Report) -> None:
    """Issue #15's targets, from what was measured (None where not measured)."""
    phases = report.data["phases"]
    speed = [r for r in phases.get("speed", {}).get("rows", []) if "forward_ms" in r]
    released = [r for r in phases.get("released", {}).get("rows", [])
                if "triton_speedup_forward_backward" in r]
    bf16_fwd = [r["forward_of_copy_bw"] for r in speed
                if r["dtype"] == "bfloat16" and "forward_of_copy_bw" in r]
    report.data["summary"] = {
        "correctness_all_ok": phases.get("correctness", {}).get("all_ok"),
        "forward_of_copy_bw_bf16_min": min(bf16_fwd) if bf16_fwd else None,
        "target_forward_of_copy_bw": 0.7,
        "speedup_forward_backward_vs_released_min": (
            min(r["triton_speedup_forward_backward"] for r in released) if released else None),
        "target_speedup_forward_backward": 2.0,
        "speedup_forward_backward_graph_vs_released_min": min(
            (r["triton_speedup_forward_backward_graph"] for r in released
             if "triton_speedup_forward_backward_graph" in r), default=None),
        "elapsed_s": round(time.monotonic() - report.t0, 1),
    }
    report.save()


PHASES = {"env": phase_env, "correctness": phase_correctness, "speed": phase_speed,
          "memory": phase_memory, "released": phase_released}


def main(argv: list[str] | None = None) -> int:
    """Run the phases, saving the report after each row; exit 1 if correctness failed."""
    args = parse_args(argv)
    t0 = time.monotonic()
    if args.smoke:  # must precede the first import of triton
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --smoke to run the script on CPU)")
    phases = args.phases.split(",")
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"gpu_check: unknown phases {unknown}; choose from {list(PHASES)}")
    report = Report(args.out, t0 + args.budget_s)
    report.t0 = t0
    report.data["args"] = {k: str(v) for k, v in vars(args).items()}
    torch.manual_seed(0)
    stages = [int(s) - 1 for s in args.stages.split(",")]
    for name in PHASES:  # fixed order: speed feeds the released op's speed-ups
        if name not in phases:
            continue
        t_phase = time.monotonic()
        if name == "env":
            phase_env(report, device)
        elif name == "correctness":
            phase_correctness(report, device, args.smoke, args.dtypes.split(","),
                              args.offsets.split(","))
        elif name == "memory":
            phase_memory(report, device, args.smoke)
        elif name == "released":
            phase_released(report, device, args.smoke, stages, args.released_build)
        else:
            PHASES[name](report, device, args.smoke, stages)
        if name != "env":
            report.phase(name)["seconds"] = round(time.monotonic() - t_phase, 1)
        print(f"gpu_check: {name} done at {time.monotonic() - t0:.0f} s", file=sys.stderr)
    summarise(report)
    print(json.dumps(report.data["summary"], indent=2))
    return 1 if report.data["summary"]["correctness_all_ok"] is False else 0


if __name__ == "__main__":
    raise SystemExit(main())
