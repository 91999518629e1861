"""Launch-config sweep of the DCNv3 Triton kernels at InternImage-H shapes (one GPU).

    python benchmarks/dcnv3_sweep.py --out DIR [--budget-s 240]

For the forward and the backward kernel, times every (point loop, BLOCK_P, num_warps,
num_stages) combination directly (the autotuner bypassed) on H stage 1 and stage 4 at
batch 16, bf16 with fused softmax (what the model runs), and checks each variant's
outputs against the shipped kernel's. The point loop is either the shipped ``range(K)``
(a runtime loop) or ``tl.static_range(K)`` (fully unrolled, so all 4K corner loads of a
block can be in flight at once): the second variant is made from the shipped source by
that one textual change, in a temporary module. DIR/dcnv3_sweep.json is rewritten after
every row; rows past the time budget are not run. The best rows say which configs the
autotuner should offer (see ``GPU_CONFIGS`` in ops/dcnv3/triton_kernels.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SHAPES = (("h_stage1", 0), ("h_stage4", 3))
BATCH = 16
LOOPS = ("range", "static_range")
BLOCK_P = (32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2)


def kernel_module(loop: str):
    """The shipped kernels module, or a copy whose point loops are ``tl.static_range``."""
    import ops.dcnv3.triton_kernels as shipped

    if loop == "range":
        return shipped
    source = Path(shipped.__file__).read_text()
    assert source.count("for k in range(K):") == 2, "point loops changed: update the sweep"
    source = source.replace("for k in range(K):", "for k in tl.static_range(K):")
    path = Path(tempfile.mkdtemp()) / "dcnv3_kernels_static.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dcnv3_kernels_static", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(stage: int):
    """bf16 input, random offsets, mask logits and an upstream gradient at an H stage."""
    import torch
    from dcnv3_gpu import layer_row

    row = layer_row("internimage_h_640", stage, BATCH)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, w, c = row["input_shape"]
    k = row["kernel_size"] ** 2
    g = row["groups"]
    x = torch.randn(n, h, w, c, device="cuda", generator=gen).bfloat16()
    offset = (torch.randn(n, h, w, g * k * 2, device="cuda", generator=gen) * 2).bfloat16()
    mask = torch.randn(n, h, w, g * k, device="cuda", generator=gen).bfloat16()
    grad = torch.randn(n, h, w, c, device="cuda", generator=gen).bfloat16()
    return row, x, offset, mask, grad


def launchers(module, row, x, offset, mask, grad):
    """forward(config) and backward(config) launching the un-tuned kernels."""
    import torch

    ks, groups = row["kernel_size"], row["groups"]
    scalars = module.launch_args(x.shape, offset.shape, groups, ks, 1, ks // 2, 1, 1.0)
    grid = lambda bp: (-(-scalars[0] // bp) * groups,)  # noqa: E731
    out = torch.empty_like(x)
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    goff, gmask = torch.empty_like(offset), torch.empty_like(mask)
    common = dict(KS=ks, SOFTMAX=True, ACC_F64=False)

    def forward(bp, warps, stages):
        module.dcnv3_fwd_kernel.fn[grid(bp)](
            x, offset, mask, out, *scalars, **common, BLOCK_P=bp,
            **module.tile_constants(x.dtype, False, scalars[7], ks), num_warps=warps,
            num_stages=stages)
        return (out,)

    def backward(bp, warps, stages):
        gx.zero_()
        module.dcnv3_bwd_kernel.fn[grid(bp)](
            x, offset, mask, grad, gx, goff, gmask, *scalars, **common, BLOCK_P=bp,
            **module.tile_constants(x.dtype, True, scalars[7], ks), num_warps=warps,
            num_stages=stages)
        return gx, goff, gmask

    return forward, backward


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; print the best config per (kernel, shape)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args(argv)
    import torch
    from triton.testing import do_bench

    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"rows": [], "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    path = args.out / "dcnv3_sweep.json"
    modules = {loop: kernel_module(loop) for loop in LOOPS}
    for (shape, stage), kernel in itertools.product(SHAPES, ("forward", "backward")):
        if time.monotonic() > deadline:
            break
        row, *tensors = inputs(stage)
        runs = {loop: dict(zip(("forward", "backward"), launchers(m, row, *tensors)))
                for loop, m in modules.items()}
        truth = [t.float().clone() for t in runs["range"][kernel](64, 4, 1)]
        for loop, bp, warps, stages in itertools.product(LOOPS, BLOCK_P, WARPS, STAGES):
            entry = {"kernel": kernel, "shape": shape, "loop": loop, "BLOCK_P": bp,
                     "num_warps": warps, "num_stages": stages}
            if time.monotonic() > deadline:
                break
            fn = runs[loop][kernel]
            try:
                got = fn(bp, warps, stages)
                entry["max_rel_diff"] = max(
                    float((g.float() - t).abs().max() / t.abs().max().clamp_min(1e-12))
                    for g, t in zip(got, truth))
                entry["ms"] = do_bench(functools.partial(fn, bp, warps, stages), warmup=10, rep=40)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory / registers
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            report["rows"].append(entry)
            path.write_text(json.dumps(report, indent=1) + "\n")
    best = {}
    for r in report["rows"]:
        if "ms" in r and r["max_rel_diff"] < 1e-2:
            key = f"{r['kernel']}/{r['shape']}"
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    report["best"] = best
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(best, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
