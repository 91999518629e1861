"""Launch-config sweep of the DCNv3 Triton kernels at InternImage-H shapes (one GPU).

    python benchmarks/dcnv3_sweep.py --out DIR [--budget-s 240]

For the forward and the backward kernel, times every (UNROLL, BLOCK_P, num_warps,
num_stages) combination directly (the autotuner bypassed) on H stage 1 and stage 4 at
batch 16, bf16 with fused softmax (what the model runs), and checks each variant's
outputs against the (64, 4, looped) config's. UNROLL=0 runs the K-point loop as a loop,
UNROLL=1 fully unrolled (so the corner loads of several points can be in flight at
once). DIR/dcnv3_sweep.json is rewritten after every row; rows past the time budget are
not run. The best rows say which configs the autotuner should offer (see
``GPU_CONFIGS`` and ``offered_configs`` in ops/dcnv3/triton_kernels.py).

    python benchmarks/dcnv3_sweep.py --out DIR --layouts [--budget-s 200]

times the two tile layouts of a 32-channel group (``tile_constants``' ``split``: two
16-lane chunks, or one 32-lane tile) against each other instead: backward first, then
forward, H stage 4 then stage 1, bf16 with fused softmax and fp32 with weights, over the
configs the autotuner is offered (``offered_configs``, num_stages 1). Each row's outputs
are checked against the first row of its (kernel, shape, dtype).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SHAPES = (("h_stage1", 0), ("h_stage4", 3))
BATCH = 16
UNROLLS = (0, 1)
BLOCK_P = (32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2)


def inputs(stage: int, dtype: str = "bfloat16"):
    """Input, random offsets, mask logits (bf16) or softmax weights (fp32) and an upstream
    gradient at an H stage, in ``dtype``."""
    import torch
    from dcnv3_gpu import layer_row

    row = layer_row("internimage_h_640", stage, BATCH)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, w, c = row["input_shape"]
    k = row["kernel_size"] ** 2
    g = row["groups"]
    dt = getattr(torch, dtype)
    x = torch.randn(n, h, w, c, device="cuda", generator=gen).to(dt)
    offset = (torch.randn(n, h, w, g * k * 2, device="cuda", generator=gen) * 2).to(dt)
    mask = torch.randn(n, h, w, g * k, device="cuda", generator=gen)
    if dtype == "float32":  # the op's plain-weights form
        mask = torch.softmax(mask.unflatten(-1, (g, k)), -1).flatten(-2)
    grad = torch.randn(n, h, w, c, device="cuda", generator=gen).to(dt)
    return row, x, offset, mask.to(dt), grad


def launchers(row, x, offset, mask, grad, split: bool | None = None):
    """forward(config) and backward(config) launching the un-tuned kernels, in the tile
    layout ``split`` (see ``tile_constants``); fused softmax for 16-bit inputs."""
    import torch

    from ops.dcnv3 import triton_kernels as module

    ks, groups = row["kernel_size"], row["groups"]
    scalars = module.launch_args(x.shape, offset.shape, groups, ks, 1, ks // 2, 1, 1.0)
    grid = lambda bp: (-(-scalars[0] // bp) * groups,)  # noqa: E731
    out = torch.empty_like(x)
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    goff, gmask = torch.empty_like(offset), torch.empty_like(mask)
    common = dict(KS=ks, SOFTMAX=x.dtype.itemsize == 2, ACC_F64=False)

    def forward(unroll, bp, warps, stages):
        module.dcnv3_fwd_kernel.fn[grid(bp)](
            x, offset, mask, out, *scalars, **common, BLOCK_P=bp, UNROLL=unroll,
            **module.tile_constants(x.dtype, False, scalars[7], ks, split),
            num_warps=warps, num_stages=stages)
        return (out,)

    def backward(unroll, bp, warps, stages):
        gx.zero_()
        module.dcnv3_bwd_kernel.fn[grid(bp)](
            x, offset, mask, grad, gx, goff, gmask, *scalars, **common, BLOCK_P=bp,
            UNROLL=unroll,
            **module.tile_constants(x.dtype, True, scalars[7], ks, split),
            num_warps=warps, num_stages=stages)
        return gx, goff, gmask

    return forward, backward


def _timed(fn, config: tuple, truth: list | None) -> dict:
    """One row: max relative difference of ``fn(*config)`` from ``truth`` (0 where it is
    the truth) and its median time; an error (out of registers, say) is recorded."""
    import functools

    from triton.testing import do_bench

    try:
        got = fn(*config)
        diff = 0.0 if truth is None else max(
            float((g.float() - t).abs().max() / t.abs().max().clamp_min(1e-12))
            for g, t in zip(got, truth))
        return {"max_rel_diff": diff,
                "ms": do_bench(functools.partial(fn, *config), warmup=10, rep=40)}
    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory / registers
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def layout_rows(deadline: float, report: dict, save) -> None:
    """The ``--layouts`` sweep (module docstring): split vs whole 32-channel tiles."""
    import torch

    from ops.dcnv3.triton_kernels import offered_configs

    for kernel, (shape, stage), dtype in itertools.product(
            ("backward", "forward"), (("h_stage4", 3), ("h_stage1", 0)),
            ("bfloat16", "float32")):
        if time.monotonic() > deadline:
            return
        tensors = inputs(stage, dtype)
        truth = None
        for split in (True, False):
            fn = dict(zip(("forward", "backward"), launchers(*tensors, split=split)))[kernel]
            short = "fwd" if kernel == "forward" else "bwd"
            for bp, warps, unroll in offered_configs(short, getattr(torch, dtype)):
                if time.monotonic() > deadline:
                    return
                config = (unroll, bp, warps, 1)
                entry = {"kernel": kernel, "shape": shape, "dtype": dtype, "split": split,
                         "unroll": unroll, "BLOCK_P": bp, "num_warps": warps,
                         **_timed(fn, config, truth)}
                if truth is None and "ms" in entry:
                    truth = [t.float().clone() for t in fn(*config)]
                report["rows"].append(entry)
                save()


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; print the best config per (kernel, shape)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--layouts", action="store_true",
                        help="time split vs whole 32-channel tiles (module docstring)")
    args = parser.parse_args(argv)
    import torch

    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"rows": [], "torch": torch.__version__, "device": torch.cuda.get_device_name()}
    path = args.out / ("dcnv3_layouts.json" if args.layouts else "dcnv3_sweep.json")

    def save():
        path.write_text(json.dumps(report, indent=1) + "\n")

    if args.layouts:
        layout_rows(deadline, report, save)
    for (shape, stage), kernel in itertools.product(
            () if args.layouts else SHAPES, ("forward", "backward")):
        if time.monotonic() > deadline:
            break
        row, *tensors = inputs(stage)
        fn = dict(zip(("forward", "backward"), launchers(row, *tensors)))[kernel]
        truth = [t.float().clone() for t in fn(0, 64, 4, 1)]
        for unroll, bp, warps, stages in itertools.product(UNROLLS, BLOCK_P, WARPS, STAGES):
            if time.monotonic() > deadline:
                break
            report["rows"].append({"kernel": kernel, "shape": shape, "unroll": unroll,
                                   "BLOCK_P": bp, "num_warps": warps, "num_stages": stages,
                                   **_timed(fn, (unroll, bp, warps, stages), truth)})
            save()
    best = {}
    for r in report["rows"]:
        if "ms" in r and r["max_rel_diff"] < 1e-2:
            key = "/".join(str(r[k]) for k in ("kernel", "shape", "dtype", "split") if k in r)
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    report["best"] = best
    save()
    print(json.dumps(best, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
