"""DCNv3 on the GPU: Triton vs the pure-PyTorch reference vs the released CUDA op.

For every DCNv3 layer shape of InternImage-T at 224 px and InternImage-H at 640 px (or H
only: ``--models h``) this times the forward and the forward+backward with
``triton.testing.do_bench`` (median, L2 flushed between runs; the first call of each
shape absorbs Triton's autotuning), converts the times into achieved memory bandwidth
under an ideal-traffic model (each input read once, each output written once) and
relates that to a measured device-to-device copy bandwidth. Every backend's output and
gradients are compared with the reference backend at the same dtype (relative error).
It also records the peak memory of one whole InternImage-H block (DCNv3 + MLP branches,
forward+backward) per backend. Results go to JSON; a backend that fails is recorded
with its error, the rest still runs.

For a short, complete check on a borrowed GPU (correctness against float64, speed,
memory, the released op) use ``benchmarks/gpu_check.py`` instead.

Batch sizes: H uses 16 images per GPU (the DeepSpeed recipe in REFERENCE.md section 3).
T uses 128 images per GPU, the per-GPU batch of the released T classification config;
REFERENCE.md does not state it, so it is a flag (``--t-batch``).

``--dry-run`` needs no GPU: it builds every tensor on the meta device, runs the op (and its
backward) there to assert the output and gradient shapes, and prints the plan as JSON.

    python benchmarks/dcnv3_gpu.py --out benchmarks/dcnv3_gpu.json [--models h]
    python benchmarks/dcnv3_gpu.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ops.dcnv3 import dcnv3, output_size  # noqa: E402

KERNEL_SIZE = 3
MODELS = {
    # name: (base channels, groups per stage, input pixels, dw kernel, offset_scale)
    "internimage_t_224": (64, (4, 8, 16, 32), 224, 3, 1.0),
    "internimage_h_640": (320, (10, 20, 40, 80), 640, 5, 1.0),
}
MODEL_FLAGS = {"t": "internimage_t_224", "h": "internimage_h_640"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_shapes(t_batch: int, h_batch: int, models: tuple[str, ...] = tuple(MODELS)
                 ) -> list[dict]:
    """One entry per distinct DCNv3 layer shape (one per stage; stride 4 then /2)."""
    rows = []
    for model in models:
        batch = t_batch if model.startswith("internimage_t") else h_batch
        rows += [layer_row(model, stage, batch) for stage in range(len(MODELS[model][1]))]
    return rows


def layer_row(model: str, stage: int, batch: int) -> dict:
    """Shapes and arguments of the DCNv3 layer of ``model`` at ``stage`` for ``batch``."""
    base, groups, pixels, dw_kernel, offset_scale = MODELS[model]
    g = groups[stage]
    channels, size = base * 2**stage, pixels // 4 // 2**stage
    k = KERNEL_SIZE * KERNEL_SIZE
    ho = output_size(size, KERNEL_SIZE, 1, 1, 1)
    return dict(
        model=model, stage=stage, batch=batch, channels=channels, groups=g,
        group_channels=channels // g, kernel_size=KERNEL_SIZE, stride=1, padding=1,
        dilation=1, offset_scale=offset_scale, dw_kernel_size=dw_kernel,
        input_shape=[batch, size, size, channels],
        offset_shape=[batch, ho, ho, g * k * 2], mask_shape=[batch, ho, ho, g * k],
        output_shape=[batch, ho, ho, channels],
    )


def ideal_bytes(row: dict, element_size: int) -> dict:
    """Minimum DRAM traffic of forward and backward: every tensor touched exactly once."""
    numel = {name: _prod(row[f"{name}_shape"]) for name in ("input", "offset", "mask", "output")}
    fwd = (numel["input"] + numel["offset"] + numel["mask"] + numel["output"]) * element_size
    # backward reads input, offset, mask and grad_out, writes the three gradients.
    bwd = (2 * (numel["input"] + numel["offset"] + numel["mask"]) + numel["output"]) \
        * element_size
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}


def _prod(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def make_inputs(row: dict, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Random input/offsets (a few pixels of spread) and softmax weights for one layer."""
    x = torch.randn(row["input_shape"], dtype=dtype, device=device)
    off = torch.randn(row["offset_shape"], dtype=dtype, device=device) * 2
    logits = torch.randn(row["mask_shape"][:3] + [row["groups"], KERNEL_SIZE**2], device=device)
    mask = F.softmax(logits, -1).flatten(-2).to(dtype)
    return [x, off, mask]


def op_kwargs(row: dict) -> dict:
    """Keyword arguments of ``dcnv3`` for a layer row."""
    return dict(kernel_size=row["kernel_size"], stride=row["stride"], padding=row["padding"],
                dilation=row["dilation"], groups=row["groups"],
                offset_scale=row["offset_scale"])


def released_op() -> Callable | None:
    """The released CUDA extension (``import DCNv3``) wrapped for autograd, if importable.

    The extension's current signature (OpenGVLab/InternImage, classification/ops_dcnv3/
    functions/dcnv3_func.py) is ``dcnv3_forward(input, offset, mask, kernel_h, kernel_w,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
    offset_scale, im2col_step, remove_center)`` (16 arguments) and ``dcnv3_backward(...,
    offset_scale, grad_output, im2col_step, remove_center)`` (17); builds from before
    ``remove_center`` take one argument fewer. Both are tried (a wrong count raises
    TypeError before any work).
    """
    try:
        import DCNv3 as ext  # type: ignore[import-not-found]
    except ImportError:
        return None
    trailing: list[tuple] = [(0,), ()]  # remove_center=0, then the older signature

    def call(fn, *args):
        while True:
            try:
                return fn(*args, *trailing[0])
            except TypeError:
                if len(trailing) == 1:
                    raise
                trailing.pop(0)

    class Released(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, off, mask, ks, stride, pad, dil, groups, scale):
            # im2col_step = whole batch (it must divide the batch).
            ctx.args = (ks, ks, stride, stride, pad, pad, dil, dil, groups,
                        x.shape[-1] // groups, scale)
            ctx.im2col_step = x.shape[0]
            ctx.save_for_backward(x, off, mask)
            return call(ext.dcnv3_forward, x, off, mask, *ctx.args, ctx.im2col_step)

        @staticmethod
        def backward(ctx, grad):
            x, off, mask = ctx.saved_tensors
            gx, goff, gmask = call(ext.dcnv3_backward, x, off, mask, *ctx.args,
                                   grad.contiguous(), ctx.im2col_step)
            return gx, goff, gmask, *([None] * 6)

    def run(x, off, mask, kernel_size, stride, padding, dilation, groups, offset_scale):
        return Released.apply(x, off, mask, kernel_size, stride, padding, dilation, groups,
                              offset_scale)

    return run


def backends(dtype: torch.dtype) -> dict[str, Callable]:
    """name -> fn(x, off, mask, **op kwargs) for every backend usable at ``dtype``."""
    out: dict[str, Callable] = {
        "reference": lambda *t, **kw: dcnv3(*t, **kw, backend="reference"),
    }
    try:
        from ops.dcnv3.triton_backend import dcnv3_softmax

        out["triton"] = lambda *t, **kw: dcnv3(*t, **kw, backend="triton")
        # Same layer fed logits: the softmax runs inside the kernel (what the module uses).
        out["triton_fused_softmax"] = lambda x, off, logits, **kw: dcnv3_softmax(
            x, off, logits, **kw)
    except ImportError:
        pass
    released = released_op()
    if released is not None and dtype in (torch.float32, torch.float16):
        out["released_cuda"] = lambda *t, **kw: released(*t, **kw)
    return out


def cuda_time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: L2 flushed per run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, return_mode="median"))


def copy_bandwidth_gbs(gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the roofline."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _outputs(fn: Callable, leaves: list[torch.Tensor], grad_out: torch.Tensor, kw: dict):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def bench_layer(row: dict, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Forward and forward+backward times of every backend for one layer shape, and
    each backend's relative error against the reference backend at the same dtype."""
    x, off, mask = make_inputs(row, dtype, device)
    grad_out = torch.randn(row["output_shape"], dtype=dtype, device=device)
    kw = op_kwargs(row)
    traffic = ideal_bytes(row, x.element_size())
    results: dict[str, dict] = {}
    want = None
    for name, fn in backends(dtype).items():
        mask_in = mask.float().log().to(dtype) if name == "triton_fused_softmax" else mask
        leaves = [t.detach().clone().requires_grad_() for t in (x, off, mask_in)]

        def forward(fn=fn, mask_in=mask_in):
            with torch.no_grad():
                fn(x, off, mask_in, **kw)

        def forward_backward(fn=fn, leaves=leaves):
            for t in leaves:
                t.grad = None
            fn(*leaves, **kw).backward(grad_out)

        try:
            got = _outputs(fn, [x, off, mask_in], grad_out, kw)
            if name == "triton_fused_softmax":  # gradient w.r.t. logits -> w.r.t. weights
                got[3] = None
            fwd_ms = cuda_time_ms(forward)
            fb_ms = cuda_time_ms(forward_backward)
        except Exception as exc:  # noqa: BLE001 - one backend failing must not end the run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
            continue
        if name == "reference":
            want = got
        stats = {"forward_ms": fwd_ms, "forward_backward_ms": fb_ms,
                 "forward_gbs": traffic["forward"] / fwd_ms / 1e6,
                 "forward_backward_gbs": traffic["forward_backward"] / fb_ms / 1e6}
        if want is not None and name != "reference":
            stats["rel_error_vs_reference"] = {
                key: rel_error(a, b) for key, a, b in
                zip(("output", "grad_input", "grad_offset", "grad_mask"), got, want)
                if a is not None}
        results[name] = stats
    return {"ideal_bytes": traffic, "backends": results}


def h_block(stage: int, backend: str, device: str | torch.device) -> torch.nn.Module:
    """One InternImage-H block of ``stage`` (DCNv3 + MLP with H's norms and gate)."""
    from models.intern_image import InternImageLayer

    base, groups, _, dw_kernel, offset_scale = MODELS["internimage_h_640"]
    with torch.device(device):
        return InternImageLayer(base * 2**stage, groups[stage], dw_kernel_size=dw_kernel,
                                res_post_norm=True, center_feature_scale=True,
                                offset_scale=offset_scale, dcn_backend=backend)


def block_peak_memory(row: dict, backend: str, dtype: torch.dtype,
                      build: Callable = h_block) -> dict:
    """Peak CUDA memory above the parameters+input baseline for one block's fwd+bwd."""
    block = build(row["stage"], backend, "cuda").to(dtype)
    x = torch.randn(row["input_shape"], dtype=dtype, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    try:
        block(x).float().square().mean().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        result = {"peak_bytes": peak, "peak_gib": peak / 2**30}
    except torch.cuda.OutOfMemoryError as exc:
        result = {"error": str(exc).splitlines()[0]}
    del block, x
    torch.cuda.empty_cache()
    return result


def dry_run(rows: list[dict], dtypes: list[str]) -> dict:
    """Check every planned shape on the meta device (no GPU, no memory) and return the plan."""
    try:
        import ops.dcnv3.triton_backend  # noqa: F401

        backend = "triton"
    except ImportError:
        backend = "reference"
    for row in rows:
        leaves = [torch.empty(row[f"{n}_shape"], device="meta", requires_grad=True)
                  for n in ("input", "offset", "mask")]
        out = dcnv3(*leaves, **op_kwargs(row), backend=backend)
        assert list(out.shape) == row["output_shape"], (row, out.shape)
        out.sum().backward()
        for leaf in leaves:
            assert leaf.grad.shape == leaf.shape
    for row in rows:
        if row["model"] == "internimage_h_640":
            block = h_block(row["stage"], backend, "meta")
            out = block(torch.empty(row["input_shape"], device="meta"))
            assert list(out.shape) == row["input_shape"]
    return {
        "mode": "dry-run", "checked_on": f"meta device, backend {backend!r}",
        "dtypes": dtypes, "timing": "triton.testing.do_bench, median, L2 flushed",
        "bandwidth_model": "ideal traffic: each input read once, each output written once",
        "layers": [dict(row, ideal_bytes={d: ideal_bytes(row, DTYPES[d].itemsize)
                                          for d in dtypes}) for row in rows],
        "block_memory": [f"internimage_h_640 stage {r['stage']} block, fwd+bwd, batch "
                         f"{r['batch']}" for r in rows if r["model"] == "internimage_h_640"],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse flags, then either print the dry-run plan or run the GPU benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="check shapes on the meta device and print the plan (no GPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--models", default="t,h", help="comma-separated from t, h")
    parser.add_argument("--t-batch", type=int, default=128, help="InternImage-T batch per GPU")
    parser.add_argument("--h-batch", type=int, default=16, help="InternImage-H batch per GPU")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help=f"comma-separated, from {sorted(DTYPES)}")
    parser.add_argument("--skip-block-memory", action="store_true")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; allowed: {sorted(DTYPES)}")
    bad_models = [m for m in args.models.split(",") if m not in MODEL_FLAGS]
    if bad_models:
        parser.error(f"--models: unknown {bad_models}; allowed: {sorted(MODEL_FLAGS)}")
    models = tuple(MODEL_FLAGS[m] for m in args.models.split(","))
    rows = layer_shapes(args.t_batch, args.h_batch, models)

    if args.dry_run:
        report = dry_run(rows, dtypes)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (use --dry-run to check the plan on CPU)")
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "copy_bandwidth_gbs": copy_bandwidth_gbs(), "layers": [],
                  "block_memory": []}
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for row in rows:
                result = bench_layer(row, dtype)
                for stats in result["backends"].values():
                    for key in ("forward_gbs", "forward_backward_gbs"):
                        if key in stats:
                            stats[key.replace("_gbs", "_of_copy_bw")] = \
                                stats[key] / report["copy_bandwidth_gbs"]
                report["layers"].append(dict(row, dtype=dtype_name, **result))
                print(json.dumps({k: report["layers"][-1][k] for k in
                                  ("model", "stage", "dtype", "backends")}), file=sys.stderr)
                if args.out is not None:  # a timeout keeps what is done
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
            if args.skip_block_memory:
                continue
            for row in rows:
                if row["model"] != "internimage_h_640":
                    continue
                for backend in ("reference", "triton"):
                    report["block_memory"].append(dict(
                        stage=row["stage"], batch=row["batch"], dtype=dtype_name,
                        backend=backend, **block_peak_memory(row, backend, dtype)))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
