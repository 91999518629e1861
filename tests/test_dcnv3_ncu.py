"""benchmarks/dcnv3_ncu.py without a GPU: the launches it profiles (its child, on CPU under
Triton's interpreter), the ncu command line it builds, and its summary of ncu's CSV. A
stand-in ``ncu`` on PATH records its arguments, runs the child (``--smoke`` added: no
CUDA here) and answers ``--import ... --csv --page raw`` with a CSV laid out as ncu's raw
page is (a row of metric names, a row of units, one row per launch). What ncu measures is
for a GPU session (benchmarks/gpu_session.sh runs this script where ncu exists)."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.triton

STALLS = ("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
          "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
          "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio")

FAKE_NCU = f'''#!{sys.executable}
import csv, json, os, subprocess, sys
args = sys.argv[1:]
if "--import" in args:
    w = csv.writer(sys.stdout, quoting=csv.QUOTE_ALL)
    w.writerow(["ID", "Kernel Name", "gpu__time_duration.sum", *{STALLS!r}])
    w.writerow(["", "", "usecond", "inst", "inst", "inst"])
    for i in range(8):
        name = "dcnv3_fwd_kernel" if i % 2 == 0 else "dcnv3_bwd_kernel"
        w.writerow([str(i), name, f"{{1000 + i:,}}", "0.5", "{{}}".format(3 + i), "0"])
    sys.exit(0)
with open(os.environ["FAKE_NCU_ARGS"], "w") as f:
    json.dump(args, f)
app = args.index(next(a for a in args if a.endswith("dcnv3_ncu.py"))) - 1
open(args[args.index("-o") + 1] + ".ncu-rep", "w").close()
sys.exit(subprocess.run(args[app:] + ["--smoke"]).returncode)
'''


def test_profile_runs_the_child_under_ncu_and_ranks_each_launch_s_stalls(tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    ncu = bin_dir / "ncu"
    ncu.write_text(FAKE_NCU)
    ncu.chmod(ncu.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, FAKE_NCU_ARGS=str(tmp_path / "ncu_args.json"),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dcnv3_ncu.py"),
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    args = json.loads((tmp_path / "ncu_args.json").read_text())
    # the clocks left alone (the device README's method), only the profiled range, only
    # our kernels, the sections named in the script
    for pair in (["--clock-control", "none"], ["--profile-from-start", "off"],
                 ["-k", "regex:dcnv3_"], ["--section", "WarpStateStats"],
                 ["--section", "MemoryWorkloadAnalysis"]):
        assert any(args[i:i + 2] == pair for i in range(len(args))), (pair, args)
    cases = json.loads((out / "dcnv3_ncu_cases.json").read_text())
    assert [(c["stage"], c["dtype"]) for c in cases] == [
        (1, "bfloat16"), (1, "float32"), (4, "bfloat16"), (4, "float32")]
    with (out / "dcnv3_ncu.csv").open(newline="") as f:
        assert len(list(csv.reader(f))) == 2 + 8  # names, units, launches
    summary = json.loads((out / "dcnv3_ncu.json").read_text())
    assert len(summary) == 8  # a forward and a backward launch per case
    assert [e["kernel"] for e in summary[:2]] == ["dcnv3_fwd_kernel", "dcnv3_bwd_kernel"]
    assert summary[3]["case"] == cases[1] and summary[7]["case"] == cases[3]
    first = summary[0]
    assert first["metrics"]["gpu__time_duration.sum"] == 1000.0  # "1,000": ncu's grouping
    # largest stall first; a zero one left out
    assert list(first["stalls"]) == [STALLS[1], STALLS[0]]
    assert list(summary[1]["stalls"].values()) == [4.0, 0.5]
