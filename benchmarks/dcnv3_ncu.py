"""The DCNv3 Triton kernels under Nsight Compute (ncu) on one GPU: where their time goes.

    python benchmarks/dcnv3_ncu.py --out DIR           # runs itself under ncu (< 2 min warm)
    python benchmarks/dcnv3_ncu.py --child --smoke     # the launches alone, on CPU (tests)

Why (issue #15, benchmarks/RESULTS.md 2026-12-04): the forward moves 14-22% of the copy
bandwidth at InternImage-H shapes, bf16 barely faster than fp32 with half the bytes, and
no launch config changes it much, so neither DRAM traffic nor instruction issue explains
its time; the suspect is the gathers' latency. Timing cannot tell; the stall reasons can.

The child process runs the op (the autotuned kernels, as the model does) at H stage 1 and
stage 4, batch 16, random offsets, bf16 with fused softmax and fp32 with weights:
forward+backward twice outside the profiled range (compiles and autotuning), then once
inside it (``torch.cuda.profiler.start``/``stop``, with ncu's ``--profile-from-start
off``); ncu keeps the launches of our two kernels only (``-k regex:dcnv3_``). Sections:
SpeedOfLight, MemoryWorkloadAnalysis, WarpStateStats, Occupancy, LaunchStats, with the
clocks left alone (``--clock-control none``). Writes to DIR: ``dcnv3_ncu.ncu-rep`` (open
it in Nsight Compute), ``dcnv3_ncu.csv`` (``--page raw``: one row per launch, one column
per metric), ``dcnv3_ncu_cases.json`` (the child's launches, in order) and
``dcnv3_ncu.json``: per launch its case, duration, DRAM throughput, occupancy and the
warp stall reasons, largest first. Run it after gpu_check.py in the same session: its
compiles are then in Triton's cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

STAGES = (0, 3)  # H stage 1 and stage 4
CASES = (("bfloat16", "softmax"), ("float32", "weights"))
BATCH = 16
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "WarpStateStats", "Occupancy",
            "LaunchStats")
# Raw-page metrics (by name fragment) worth a line in the summary; every column stays in
# the CSV.
SUMMARY_FRAGMENTS = ("gpu__time_duration", "dram__throughput", "dram__bytes",
                     "sm__warps_active", "sm__throughput", "lts__t_sector_hit_rate",
                     "l1tex__t_sector_hit_rate", "launch__registers_per_thread",
                     "launch__occupancy_limit", "smsp__issue_active",
                     "average_warp_latency_per_inst_issued")
STALL_FRAGMENT = "issue_stalled"


def child(smoke: bool) -> list[dict]:
    """The launches: per case, warm-up outside the profiled range, then one forward and
    one backward inside it. The cases in launch order (each gives a forward then a
    backward kernel launch)."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from dcnv3_gpu import DTYPES, op_kwargs
    from gpu_check import h_row, make_case, op_inputs

    from ops.dcnv3 import dcnv3
    from ops.dcnv3.triton_backend import dcnv3_softmax

    device = "cpu" if smoke else "cuda"
    cases, runs = [], []
    for stage in STAGES:
        row = h_row(stage, BATCH, smoke)
        for dtype_name, variant in CASES:
            tensors = op_inputs(make_case(row, "random", device, seed=1), variant,
                                row["groups"], DTYPES[dtype_name])
            leaves = [t.detach().clone().requires_grad_() for t in tensors[:3]]
            kw = op_kwargs(row)

            def step(leaves=leaves, grad=tensors[3], kw=kw, variant=variant) -> None:
                for t in leaves:
                    t.grad = None
                if variant == "softmax":
                    out = dcnv3_softmax(*leaves, **kw)
                else:
                    out = dcnv3(*leaves, **kw, backend="triton")
                out.backward(grad)

            for _ in range(1 if smoke else 2):  # compiles and autotuning, not profiled
                step()
            runs.append(step)
            cases.append({"stage": stage + 1, "batch": row["batch"], "dtype": dtype_name,
                          "variant": variant, "input_shape": row["input_shape"],
                          "groups": row["groups"], "configs": _chosen_configs()})
    if not smoke:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for step in runs:
        step()
    if not smoke:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return cases


def _chosen_configs() -> dict[str, str | None]:
    """The config each kernel's autotuner took for its last launch (this process tunes
    afresh: what gpu_check timed may differ); None under the interpreter."""
    from ops.dcnv3 import triton_kernels as kernels

    return {name: str(getattr(kernel, "best_config", None) or "") or None
            for name, kernel in (("fwd", kernels.dcnv3_fwd_kernel),
                                 ("bwd", kernels.dcnv3_bwd_kernel))}


def read_raw_csv(path: Path) -> list[dict[str, str]]:
    """ncu's ``--csv --page raw``: a header row of metric names, a row of their units
    (its ID field empty), then one row per profiled launch."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if (r.get("ID") or "").strip()]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summarise(launches: list[dict[str, str]], cases: list[dict]) -> list[dict]:
    """One entry per launch: its case (forward then backward per case, as launched), the
    summary metrics and the stall reasons, largest first."""
    out = []
    for i, launch in enumerate(launches):
        entry: dict = {"kernel": launch.get("Kernel Name", "?"),
                       "case": cases[i // 2] if i // 2 < len(cases) else None}
        metrics = {k: _number(v) for k, v in launch.items()
                   if any(f in k for f in SUMMARY_FRAGMENTS)}
        entry["metrics"] = {k: v for k, v in metrics.items() if v is not None}
        stalls = {k: _number(v) for k, v in launch.items() if STALL_FRAGMENT in k}
        entry["stalls"] = dict(sorted(((k, v) for k, v in stalls.items() if v),
                                      key=lambda kv: -kv[1]))
        out.append(entry)
    return out


def profile(out_dir: Path, ncu: str) -> int:
    """Run the child under ncu, export the CSV, write the summary; ncu's exit status."""
    report = out_dir / "dcnv3_ncu"
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off",
           "-k", "regex:dcnv3_", "--force-overwrite", "-o", str(report)]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, __file__, "--child", "--cases",
            str(out_dir / "dcnv3_ncu_cases.json")]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        return proc.returncode
    raw = out_dir / "dcnv3_ncu.csv"
    with raw.open("w") as f:
        exported = subprocess.run([ncu, "--import", f"{report}.ncu-rep", "--csv", "--page",
                                   "raw"], stdout=f)
    if exported.returncode != 0:
        return exported.returncode
    cases = json.loads((out_dir / "dcnv3_ncu_cases.json").read_text())
    launches = read_raw_csv(raw)
    if len(launches) != 2 * len(cases):  # e.g. a warning line before the CSV's header
        print(f"dcnv3_ncu: {raw} holds {len(launches)} launches, expected "
              f"{2 * len(cases)}: see it and the .ncu-rep", file=sys.stderr)
        return 4
    summary = summarise(launches, cases)
    (out_dir / "dcnv3_ncu.json").write_text(json.dumps(summary, indent=2) + "\n")
    for entry in summary:
        case = entry["case"] or {}
        top = list(entry["stalls"].items())[:4]
        print(f"{entry['kernel'][:40]} stage {case.get('stage')} {case.get('dtype')}: "
              f"{top}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="where the report, CSV and summary go")
    p.add_argument("--child", action="store_true", help="only run the launches (under ncu)")
    p.add_argument("--smoke", action="store_true", help="with --child: on CPU, tiny shapes")
    p.add_argument("--cases", type=Path, help="with --child: write the launch order here")
    args = p.parse_args(argv)
    if args.child:
        cases = child(args.smoke)
        if args.cases:
            args.cases.write_text(json.dumps(cases, indent=2) + "\n")
        return 0
    if args.out is None:
        p.error("--out is required (or --child)")
    ncu = shutil.which("ncu")
    if ncu is None:
        print("dcnv3_ncu: ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    return profile(args.out, ncu)


if __name__ == "__main__":
    sys.exit(main())
