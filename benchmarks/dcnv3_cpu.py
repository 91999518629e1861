"""DCNv3 on CPU: our backends next to the released PyTorch fallback's ``grid_sample`` way.

For InternImage-T's DCNv3 layer shapes at 224 px (one per stage; ``--stages``) this times
the forward and the forward+backward of each implementation and measures the peak
tensor memory of one forward+backward:

- ``auto``: what ``dcnv3(backend="auto")`` does on CPU (``compiled`` from
  ``cpu_fused.COMPILE_MIN_SAMPLES`` sampled values on, else ``reference``);
- ``reference``: the eager, memory-lean op (keeps only its inputs for backward);
- ``compiled``: the op fused by torch.compile (``ops/dcnv3/cpu_fused.py``);
- ``grid_sample``: the released pure-PyTorch fallback's formulation (OpenGVLab/InternImage
  ``dcnv3_core_pytorch``: zero-pad the input, ``F.grid_sample`` every point of every
  group, multiply by the mask, sum over the points), written out here; autograd keeps
  every sampled value for backward.

Timing: the implementations run in turn within each repetition (paired runs, so a
change in machine load hits them alike); medians over ``--repeats``; first-call seconds
(compiles) separately. Memory: the peak of live tensor bytes during one forward+backward
after warm-up, from the profiler's allocation trace (``Total Allocated``), above what
existed before the call; ``kept`` is what autograd holds from forward to backward.
``max_rel_diff_vs_reference`` compares output and gradients with the reference backend.
Prints one JSON object per row and a summary with the ratios auto / grid_sample.

    python benchmarks/dcnv3_cpu.py [--batch 4] [--threads 1] [--stages 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.dcnv3 import dcnv3  # noqa: E402
from ops.dcnv3.reference import sampling_locations  # noqa: E402

# InternImage-T at 224px: stage -> (channels, groups, spatial size); kernel 3, pad 1.
T_224_LAYERS = {i + 1: (64 * 2**i, 4 * 2**i, 56 // 2**i) for i in range(4)}
IMPLS = ("auto", "reference", "compiled", "grid_sample")


def grid_sample_dcnv3(x, offset, mask, kernel_size, stride, padding, dilation, groups,
                      offset_scale):
    """The released fallback's computation: grid_sample on the zero-padded input."""
    n, h, w, c = x.shape
    _, ho, wo, _ = offset.shape
    gc, k = c // groups, kernel_size * kernel_size
    padded = F.pad(x, (0, 0, padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    loc_x, loc_y = sampling_locations(x, offset, kernel_size, stride, padding, dilation,
                                       groups, offset_scale)
    # Pixel coordinates of the padded input, normalised for align_corners=False.
    grid = torch.stack(((2 * (loc_x + padding) + 1) / wp - 1,
                        (2 * (loc_y + padding) + 1) / hp - 1), -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * groups, ho * wo, k, 2)
    images = padded.view(n, hp * wp, groups, gc).permute(0, 2, 3, 1).reshape(
        n * groups, gc, hp, wp)
    sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (n*groups, gc, ho*wo, k)
    weights = mask.view(n, ho * wo, groups, k).permute(0, 2, 1, 3).reshape(
        n * groups, 1, ho * wo, k)
    out = (sampled * weights).sum(-1).view(n, c, ho * wo)
    return out.transpose(1, 2).reshape(n, ho, wo, c)


def implementation(name: str) -> Callable:
    if name == "grid_sample":
        return lambda x, o, m, groups: grid_sample_dcnv3(x, o, m, 3, 1, 1, 1, groups, 1.0)
    return lambda x, o, m, groups: dcnv3(x, o, m, groups=groups, backend=name)


def make_inputs(batch: int, channels: int, groups: int, size: int) -> list[torch.Tensor]:
    """Random input, offsets of a few pixels and softmax weights (fp32), as leaves."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size, size, channels, generator=gen)
    offset = 2 * torch.randn(batch, size, size, groups * 18, generator=gen)
    mask = torch.randn(batch, size, size, groups, 9, generator=gen).softmax(-1).flatten(3)
    return [t.requires_grad_() for t in (x, offset, mask)]


def peak_tensor_mib(fn: Callable[[], object]) -> float:
    """Peak live tensor memory during ``fn`` above the memory live before it (MiB)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    totals = [(e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
              if e.get("name") == "[memory]"]
    if not totals:
        return 0.0
    before = totals[0][0] - totals[0][1]  # live bytes just before the first (de)allocation
    return (max(t for t, _ in totals) - before) / 2**20


def kept_for_backward_mib(run: Callable[[], torch.Tensor]) -> float:
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values()) / 2**20


def measure_stage(stage: int, batch: int, repeats: int, impls: list[str]) -> list[dict]:
    """Rows for one layer shape: times (paired runs), peak memory, kept, max error."""
    channels, groups, size = T_224_LAYERS[stage]
    x, offset, mask = make_inputs(batch, channels, groups, size)
    fns = {name: implementation(name) for name in impls}
    rows = {name: {"impl": name, "stage": stage, "batch": batch, "channels": channels,
                   "groups": groups, "size": size} for name in impls}

    def forward_backward(fn):
        out = fn(x, offset, mask, groups)
        out.backward(torch.ones_like(out))
        return out

    def output_and_grads(fn):
        for t in (x, offset, mask):
            t.grad = None
        out = forward_backward(fn).detach()
        return [out] + [t.grad.clone() for t in (x, offset, mask)]

    want = output_and_grads(implementation("reference"))
    for name, fn in fns.items():  # first call: compiles and warm-up
        t0 = time.perf_counter()
        got = output_and_grads(fn)
        rows[name]["first_call_s"] = round(time.perf_counter() - t0, 2)
        # Largest difference from the reference over output and the three gradients,
        # relative to each one's largest magnitude.
        rows[name]["max_rel_diff_vs_reference"] = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(got, want))
    times = {name: ([], []) for name in impls}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(x, offset, mask, groups)
            t1 = time.perf_counter()
            forward_backward(fn)
            t2 = time.perf_counter()
            times[name][0].append(t1 - t0)
            times[name][1].append(t2 - t1)
    for name, fn in fns.items():
        fwd, fb = times[name]
        rows[name].update(
            forward_ms=round(1e3 * statistics.median(fwd), 1),
            forward_backward_ms=round(1e3 * statistics.median(fb), 1),
            peak_mib=round(peak_tensor_mib(lambda fn=fn: forward_backward(fn)), 1),
            kept_for_backward_mib=round(kept_for_backward_mib(
                lambda fn=fn: fn(x, offset, mask, groups)), 1))
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    """Measure the requested stages and print JSON rows and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stages", default="1", help="comma-separated, 1-4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"from {IMPLS}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    load_before = os.getloadavg()[0]
    summary = {"summary": "dcnv3_cpu", "model": "internimage_t", "resolution": 224,
               "batch": args.batch, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "load_average_before": load_before, "ratios": {}}
    for stage in map(int, args.stages.split(",")):
        rows = measure_stage(stage, args.batch, args.repeats, impls)
        for row in rows:
            print(json.dumps(row), flush=True)
        by = {r["impl"]: r for r in rows}
        if "grid_sample" in by:
            base = by["grid_sample"]
            summary["ratios"][f"stage{stage}"] = {
                name: {key: round(r[key] / base[key], 3) for key in
                       ("forward_ms", "forward_backward_ms", "peak_mib") if base[key]}
                for name, r in by.items() if name != "grid_sample"}
    summary["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
