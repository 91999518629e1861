"""DCNv3 reference backend on CPU: forward+backward time and peak memory per layer shape.

Shapes are the DCNv3 layers of InternImage-T at 224px (one per stage). Each measurement
runs in a fresh subprocess so that the peak resident memory it reports (ru_maxrss minus
the resident size once inputs exist) belongs to that layer alone; ``kept_for_backward``
is what autograd holds from the forward until the backward, the memory each layer adds to
a whole network's activations. ``naive`` is plain
autograd through ``grid_sample`` (every sampled value kept for backward, as the released
PyTorch fallback does), shown for comparison with the lean ``reference`` backend.

    python benchmarks/dcnv3_cpu.py [--batch 8] [--repeats 3] [--impl reference naive]
Prints one JSON object per line and a final summary line.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch

# InternImage-T at 224px: (stage, channels, groups, spatial size).
T_224_LAYERS = [(i, 64 * 2**i, 4 * 2**i, 56 // 2**i) for i in range(4)]


def _inputs(batch: int, channels: int, groups: int, size: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size, size, channels, generator=gen)
    offset = torch.randn(batch, size, size, groups * 18, generator=gen)
    mask = torch.randn(batch, size, size, groups, 9, generator=gen).softmax(-1).flatten(3)
    return [t.requires_grad_() for t in (x, offset, mask)]


def measure(impl: str, batch: int, channels: int, groups: int, size: int, repeats: int) -> dict:
    """Time forward and forward+backward; peak extra memory of one forward+backward."""
    from ops.dcnv3 import dcnv3
    from ops.dcnv3.reference import _sample_chunk

    def run(x, offset, mask):
        if impl == "naive":
            return _sample_chunk(x, offset, mask, 3, 1, 1, 1, groups, 1.0)
        return dcnv3(x, offset, mask, groups=groups, backend="reference")

    x, offset, mask = _inputs(batch, channels, groups, size)
    saved = []  # what autograd holds between forward and backward: the cost per layer in a net
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t):
        run(x, offset, mask)
    base_rss = psutil.Process().memory_info().rss
    out = run(x, offset, mask)  # warm-up, and the peak-memory sample
    out.backward(torch.ones_like(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    fwd, fwd_bwd = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            run(x, offset, mask)
        t1 = time.perf_counter()
        out = run(x, offset, mask)
        out.backward(torch.ones_like(out))
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        fwd_bwd.append(t2 - t1)
    sampled_bytes = batch * size * size * 9 * channels * 4
    return {"impl": impl, "batch": batch, "channels": channels, "groups": groups,
            "size": size, "forward_ms": round(1e3 * statistics.median(fwd), 2),
            "forward_backward_ms": round(1e3 * statistics.median(fwd_bwd), 2),
            "peak_extra_mib": round(max(peak, 0) / 2**20, 1),
            "kept_for_backward_mib": round(sum(saved) / 2**20, 1),
            "sampled_values_mib": round(sampled_bytes / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", nargs="+", default=["reference", "naive"],
                        choices=["reference", "naive"])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, in its own process
        impl, *nums = args.child
        batch, channels, groups, size = map(int, nums)
        print(json.dumps(measure(impl, batch, channels, groups, size, args.repeats)))
        return
    rows = []
    for impl in args.impl:
        for stage, channels, groups, size in T_224_LAYERS:
            cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", impl,
                   str(args.batch), str(channels), str(groups), str(size)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1])
            row["stage"] = stage
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"summary": "dcnv3_cpu", "model": "internimage_t", "resolution": 224,
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine(), "rows": len(rows)}))


if __name__ == "__main__":
    main()
