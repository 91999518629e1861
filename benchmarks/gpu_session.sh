#!/usr/bin/env bash
# Issue #15's GPU numbers in one device run (< 8 minutes on one H100/H200):
#
#   bash benchmarks/gpu_session.sh OUT [RELEASED_SRC]
#
# 1. with RELEASED_SRC (the `src` folder of OpenGVLab/InternImage's
#    classification/ops_dcnv3, fetched beforehand and carried to the machine: it has no
#    network), builds the released CUDA op in the background (build_released_dcnv3.py);
# 2. benchmarks/gpu_check.py: correctness, speed, memory, and the released op once built
#    (OUT/gpu_check.json, rewritten after every row);
# 3. where ncu (Nsight Compute) is on PATH, NCU is not 0 and time is left,
#    benchmarks/dcnv3_ncu.py: the kernels' stall reasons and memory metrics
#    (OUT/dcnv3_ncu.*; Triton's cache is warm from gpu_check by then), bounded by NCU_S
#    (default 120). NCU=0 where ncu cannot read the counters (gVisor machines: see the
#    device notes' KINDS.md);
# 4. with the time left, benchmarks/dcnv3_sweep.py (OUT/dcnv3_sweep.json).
# Logs go to OUT too. Budgets (seconds): CHECK_BUDGET_S (default 330) for gpu_check,
# TOTAL_S (default 450) for the whole script; GPU_CHECK_ARGS: more gpu_check flags
# (`--smoke` runs it on CPU, as the tests do). Exit status: gpu_check's (1 if a
# correctness row failed).
set -u
out=${1:?usage: gpu_session.sh OUT [RELEASED_SRC]}
src=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
released=()
if [ -n "$src" ]; then
    build=$(mktemp -d)
    python benchmarks/build_released_dcnv3.py "$src" "$build" > "$out/released_build.log" 2>&1 &
    released=(--released-build "$build")
fi
# shellcheck disable=SC2086  # GPU_CHECK_ARGS: flags, split on spaces
python benchmarks/gpu_check.py --out "$out" --budget-s "${CHECK_BUDGET_S:-330}" \
    "${released[@]}" ${GPU_CHECK_ARGS:-} > "$out/gpu_check.log" 2>&1
rc=$?
tail -n 40 "$out/gpu_check.log"
left=$(( ${TOTAL_S:-450} - ($(date +%s) - start) ))
if [ "${NCU:-1}" != 0 ] && command -v ncu > /dev/null && [ "$left" -gt 90 ]; then
    ncu_s=$(( left - 30 < ${NCU_S:-120} ? left - 30 : ${NCU_S:-120} ))
    timeout "$ncu_s" python benchmarks/dcnv3_ncu.py --out "$out" > "$out/dcnv3_ncu.log" 2>&1
    echo "dcnv3_ncu exit status $? (within ${ncu_s}s)"
    tail -n 20 "$out/dcnv3_ncu.log"
else
    echo "no ncu run (ncu on PATH: $(command -v ncu || echo none); ${left}s left)"
fi
left=$(( ${TOTAL_S:-450} - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
    python benchmarks/dcnv3_sweep.py --out "$out" --budget-s $(( left - 30 )) \
        > "$out/dcnv3_sweep.log" 2>&1
    tail -n 40 "$out/dcnv3_sweep.log"
else
    echo "no time left for the sweep (${left}s)"
fi
exit $rc
