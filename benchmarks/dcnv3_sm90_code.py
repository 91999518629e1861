"""What the DCNv3 Triton kernels compile to on an H100/H200 (sm_90), without a GPU.

Triton compiles for a named target on any machine: this script builds both kernels for
``GPUTarget("cuda", 90, 32)`` with the argument specialisation a real launch at an
InternImage layer shape gets (16-byte aligned pointers; C and GC divisible by 16; the
kernel's generic arguments left generic), disassembles the cubin (Triton's bundled
cuobjdump) and counts, in the whole kernel and inside the point loop:

- fences: PTX ``membar``/``fence``, SASS ``MEMBAR`` and ``ERRBAR``; L1 invalidations
  (SASS ``CCTL``);
- barriers: PTX ``bar.sync``/``barrier.sync``, SASS ``BAR.SYNC`` (layout conversions
  through shared memory need them);
- atomics: PTX ``atom``/``red`` and their ``.relaxed``/``.acq_rel`` qualifiers, SASS
  ``REDG``/``ATOMG``;
- registers per thread and spills (SASS ``STL``/``LDL``: local-memory stores and loads,
  ptxas's spill code; the cubin's resource usage gives the register count);
- instructions: static SASS instructions in the kernel and in the point loop, the warp
  instructions one launch at H stage 1 issues (the loop body runs K = 9 times, nothing
  else repeats; every warp of every program runs the whole body), and the time an H200
  needs just to issue them (132 SMs x 4 schedulers x one warp instruction per cycle at
  the 1.98 GHz boost clock). The H200 measurements of 2026-11-30 took 1.3-1.4x that
  time, so the forward is issue-bound: fewer instructions is the lever.

Run with ``TRITON_INTERPRET`` unset. Prints one JSON line per compiled variant.

    python benchmarks/dcnv3_sm90_code.py                      # both kernels, all configs
    python benchmarks/dcnv3_sm90_code.py --kernels bwd --configs 64x4,64x4u --group-channels 32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = {"fwd": ("dcnv3_fwd_kernel", 4), "bwd": ("dcnv3_bwd_kernel", 7)}
# (element type of the tensors, fused softmax): bf16 with logits is what the InternImage
# module runs under bf16 training; fp32 with normalised weights is the plain op.
VARIANTS = (("bf16", True), ("fp32", False))


def _signature(fn, n_ptr: int, elem: str, scalars: dict) -> tuple[dict, dict]:
    """Signature and divisibility attributes of a launch, following Triton's own rules:
    aligned pointers and ints divisible by 16 get ``tt.divisibility`` 16, an int equal to
    1 becomes a constant, unless the kernel marks the argument ``do_not_specialize``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, attrs, consts = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif i < n_ptr:
            # The backward accumulates grad_input in fp32 whatever the input dtype.
            sig[name] = "*fp32" if name == "grad_x_ptr" else "*" + elem
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            value = scalars[name]
            kind, spec = native_specialize_impl(BaseBackend, value, False,
                                                not param.do_not_specialize, True)
            if kind == "constexpr":
                sig[name] = "constexpr"
                consts[name] = value
            else:
                sig[name] = kind
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def h_layer_scalars(group_channels: int, groups: int = 10, size: int = 160,
                    batch: int = 16) -> dict:
    """Scalar kernel arguments at an InternImage layer (default: H stage 1, batch 16)."""
    from ops.dcnv3 import triton_kernels as kernels

    c = groups * group_channels
    scalars = kernels.launch_args((batch, size, size, c), (batch, size, size, 0), groups, 3,
                                  1, 1, 1, 1.0)
    names = ("P", "H", "W", "Ho", "Wo", "C", "G", "GC", "stride", "pad", "dilation",
             "offset_scale", "P_BUCKET")
    return dict(zip(names, scalars))


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def compile_sm90(kernel: str, elem: str, softmax: bool, block_p: int, num_warps: int,
                 group_channels: int, unroll: int = 0, arch: int = 90):
    """Compile one kernel variant for sm_90 (or another ``arch``, e.g. 70 for sm_70);
    returns Triton's CompiledKernel."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ops.dcnv3 import triton_kernels as kernels

    name, n_ptr = KERNELS[kernel]
    fn = getattr(kernels, name).fn  # the JITFunction under the autotuner
    scalars = h_layer_scalars(group_channels)
    sig, attrs, consts = _signature(fn, n_ptr, elem, scalars)
    dtype = getattr(torch, DTYPES[elem])
    consts.update(KS=3, SOFTMAX=softmax, ACC_F64=False, BLOCK_P=block_p, UNROLL=unroll,
                  **kernels.tile_constants(dtype, kernel == "bwd", group_channels, 3))
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": 1})


def _loop_span(lines: list[str], targets: list[tuple[int, int]]) -> list[str]:
    """Lines of the outermost loop, given (line of a branch, line it jumps to) pairs: from
    the earliest backward target to the last branch back to it."""
    back = [(dst, src) for src, dst in targets if dst < src]
    if not back:
        return []
    start = min(dst for dst, _ in back)
    end = max(src for dst, src in back if dst == start)
    return lines[start:end + 1]


def _ptx_loop(ptx: str) -> list[str]:
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    targets = [(i, labels[m.group(1)]) for i, line in enumerate(lines)
               if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line))
               and m.group(1) in labels]
    return _loop_span(lines, targets)


def _sass_loop(sass: str) -> list[str]:
    # cuobjdump prints "/*3920*/  @P2 BRA 0x1800 ;": branch targets are addresses.
    lines = sass.splitlines()
    address = {int(m.group(1), 16): i for i, line in enumerate(lines)
               if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/", line))}
    targets = [(i, address[int(m.group(1), 16)]) for i, line in enumerate(lines)
               if (m := re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", line))
               and int(m.group(1), 16) in address]
    return _loop_span(lines, targets)


def _count(text: str, patterns: dict[str, str]) -> dict[str, int]:
    return {name: len(re.findall(pat, text)) for name, pat in patterns.items()}


PTX_PATTERNS = {
    "fence": r"\b(?:membar|fence)\.",
    "bar_sync": r"\b(?:bar|barrier)\.sync\b",
    "atom": r"\batom\.",
    "red": r"\bred\.",
    "acq_rel": r"\b(?:atom|red)\.[\w.]*acq_rel",
    "relaxed": r"\b(?:atom|red)\.[\w.]*relaxed",
}
SASS_PATTERNS = {
    "MEMBAR": r"\bMEMBAR\b",
    "ERRBAR": r"\bERRBAR\b",
    "CCTL": r"\bCCTL\b",
    "BAR_SYNC": r"\bBAR\.SYNC\b",
    "REDG": r"\bREDG\b",
    "ATOMG": r"\bATOMG\b",
    "STL": r"\bSTL\b",
    "LDL": r"\bLDL\b",
}


def _sass_and_registers(cubin: bytes) -> tuple[str, int]:
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True,
                              text=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", path], check=True,
                               capture_output=True, text=True).stdout
    return sass, int(re.search(r"REG:(\d+)", usage).group(1))


# H200: 132 SMs, 4 warp schedulers each issuing one warp instruction per cycle, 1.98 GHz.
H200_ISSUE_PER_S = 132 * 4 * 1.98e9


def _instructions(lines: list[str]) -> int:
    return sum(1 for line in lines
               if (m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line))
               and m.group(1) != "NOP")


def issue_estimate(sass: str, kernel_loop: list[str], block_p: int, num_warps: int,
                   group_channels: int, points: int = 9) -> dict:
    """Warp instructions of one launch at H stage 1 (batch 16) and their issue time."""
    static = _instructions(sass.splitlines())
    loop = _instructions(kernel_loop)
    per_warp = static - loop + points * loop
    scalars = h_layer_scalars(group_channels)
    programs = -(-scalars["P"] // block_p) * scalars["G"]
    warp_instructions = programs * num_warps * per_warp
    return {"instructions": static, "loop_instructions": loop,
            "warp_instructions_h_stage1": warp_instructions,
            "issue_ms_h200": round(warp_instructions / H200_ISSUE_PER_S * 1e3, 3)}


def inspect(kernel: str, elem: str, softmax: bool, block_p: int, num_warps: int,
            group_channels: int, unroll: int = 0, arch: int = 90) -> dict:
    """Fence, barrier, atomic and spill counts of one compiled variant (see module doc)."""
    compiled = compile_sm90(kernel, elem, softmax, block_p, num_warps, group_channels,
                            unroll, arch)
    ptx = compiled.asm["ptx"]
    sass, registers = _sass_and_registers(compiled.asm["cubin"])
    ptx_loop = "\n".join(_ptx_loop(ptx))
    sass_loop_lines = _sass_loop(sass)
    sass_loop = "\n".join(sass_loop_lines)
    import triton

    return {
        "triton": triton.__version__, "arch": arch,
        "kernel": kernel, "dtype": elem, "softmax": softmax, "BLOCK_P": block_p,
        "num_warps": num_warps, "unroll": unroll, "group_channels": group_channels,
        "registers": registers,
        "ptx": _count(ptx, PTX_PATTERNS), "ptx_loop": _count(ptx_loop, PTX_PATTERNS),
        "sass": _count(sass, SASS_PATTERNS), "sass_loop": _count(sass_loop, SASS_PATTERNS),
        "loop_found": bool(ptx_loop) and bool(sass_loop),
        **issue_estimate(sass, sass_loop_lines, block_p, num_warps, group_channels),
    }


def compiled_ptx(kernel: str, elem: str, softmax: bool, block_p: int, num_warps: int,
                 group_channels: int, unroll: int = 0, arch: int = 90) -> dict:
    """One variant compiled for ``arch`` (ptxas ran: a cubin exists), its PTX counts."""
    import triton

    compiled = compile_sm90(kernel, elem, softmax, block_p, num_warps, group_channels,
                            unroll, arch)
    return {"triton": triton.__version__, "arch": arch, "kernel": kernel, "dtype": elem,
            "softmax": softmax, "BLOCK_P": block_p, "num_warps": num_warps,
            "unroll": unroll, "group_channels": group_channels,
            "cubin_bytes": len(compiled.asm["cubin"]),
            "ptx": _count(compiled.asm["ptx"], PTX_PATTERNS)}


def _offered(kernels, kernel: str, elem: str, widest: bool) -> list[str]:
    """The configs the autotuner is offered for ``kernel`` on ``elem`` inputs, as
    ``BLOCK_PxNUM_WARPS[u]``; with ``widest`` only the (BLOCK_P, num_warps) with the
    most positions per warp (ties included)."""
    import torch

    offered = kernels.offered_configs(kernel, getattr(torch, DTYPES[elem]))
    if widest:
        most = max(c[0] // c[1] for c in offered)
        offered = [c for c in offered if c[0] // c[1] == most]
    return [f"{b}x{w}{'u' * u}" for b, w, u in offered]


def main(argv: list[str] | None = None) -> int:
    """Compile the requested variants and print one JSON line each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    from ops.dcnv3 import triton_kernels as kernels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="fwd,bwd", help="comma-separated: fwd, bwd")
    parser.add_argument("--configs", default=None,
                        help="BLOCK_PxNUM_WARPS[u] (u: point loop unrolled), comma-separated "
                             "(default: what the autotuner is offered for the kernel and "
                             "dtype)")
    parser.add_argument("--group-channels", default="32",
                        help="comma-separated (InternImage-H: 32, T..XL: 16)")
    parser.add_argument("--variants", default="bf16:softmax,fp32:weights",
                        help="dtype:softmax|weights, comma-separated")
    parser.add_argument("--widest", action="store_true",
                        help="of the offered configs, only those (BLOCK_P, num_warps) "
                             "with the most positions per warp, looped and unrolled (the "
                             "most registers: the others run the same code on fewer rows "
                             "per thread)")
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability to compile for, as a number (90: sm_90; "
                             "70: sm_70, the oldest the backward compiles for)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile (ptxas included) and count PTX only: no SASS, which "
                             "the bundled cuobjdump cannot disassemble for every --arch "
                             "(CUDA 13's has no sm_70)")
    args = parser.parse_args(argv)
    variants = [(v.split(":")[0], v.split(":")[1] == "softmax")
                for v in args.variants.split(",")]
    for kernel in args.kernels.split(","):
        for gc in map(int, args.group_channels.split(",")):
            for elem, softmax in variants:
                configs = (args.configs.split(",") if args.configs else
                           _offered(kernels, kernel, elem, args.widest))
                for cfg in configs:
                    unroll = int(cfg.endswith("u"))
                    block_p, warps = map(int, cfg.rstrip("u").split("x"))
                    if args.compile_only:
                        row = compiled_ptx(kernel, elem, softmax, block_p, warps, gc,
                                           unroll, args.arch)
                    else:
                        row = inspect(kernel, elem, softmax, block_p, warps, gc, unroll,
                                      args.arch)
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
