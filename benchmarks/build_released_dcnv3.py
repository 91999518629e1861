"""Build the released DCNv3 CUDA extension (``import DCNv3``) for a side-by-side benchmark.

    python benchmarks/build_released_dcnv3.py SRC BUILD_DIR

SRC is the ``src`` folder of OpenGVLab/InternImage's ``classification/ops_dcnv3`` (vision.cpp,
cpu/, cuda/), fetched by the person running the benchmark: this repository never contains
it. The extension is compiled with ``torch.utils.cpp_extension.load`` (what the released
``setup.py`` does through setuptools, without installing anything) for the visible GPU's
architecture (or ``TORCH_CUDA_ARCH_LIST``). The sources are compiled from a copy in BUILD_DIR
with one change: ``AT_DISPATCH_*(input.type(), ...)`` becomes ``input.scalar_type()``,
because current PyTorch no longer converts the deprecated type object to a scalar type
(the released files fail to compile against torch >= 2.x without it). On success BUILD_DIR
holds ``DCNv3*.so`` and a file ``done``; on failure a file ``failed`` with the error. ``gpu_check.py
--released-build BUILD_DIR`` waits for either, so the build can run beside the first phases.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import traceback
from pathlib import Path


def _wheel_includes() -> list[str]:
    """Header folders of NVIDIA's pip wheels (``nvidia/*/include``): where a CUDA toolkit
    lacks the library headers torch's CUDA headers include (cusparse.h, cublas_v2.h)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return [str(d) for root in roots for d in sorted(Path(root).glob("*/include"))]


def _patched_copy(src: Path, out: Path) -> Path:
    """Copy ``src`` to ``out/src`` with the dispatch argument modernised (see above)."""
    dst = out / "src"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for path in dst.rglob("*.cu"):
        text = path.read_text()
        path.write_text(re.sub(r"(AT_DISPATCH_\w+\(\s*\w+)\.type\(\)", r"\1.scalar_type()",
                               text))
    return dst


def build(src: Path, out: Path) -> None:
    """Compile the released sources in ``src`` into ``out`` (see the module docstring)."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    src = _patched_copy(src, out)
    # The toolkit's own headers first: a wheel's cuda_runtime_api.h ahead of them includes
    # crt/host_defines.h, which only the toolkit has (seen with the cu13 wheels); the
    # wheels' folders only fill in the library headers a slim toolkit lacks.
    toolkit = [str(Path(CUDA_HOME) / "include")] if CUDA_HOME else []

    sources = [src / "vision.cpp", *sorted((src / "cpu").glob("*.cpp")),
               *sorted((src / "cuda").glob("*.cu"))]
    missing = [str(p) for p in sources[:1] if not p.is_file()]
    if missing or len(sources) < 3:
        raise FileNotFoundError(f"released DCNv3 sources not found under {src}")
    load(name="DCNv3", sources=[str(p) for p in sources],
         extra_include_paths=[str(src), *toolkit, *_wheel_includes()],
         extra_cflags=["-O3", "-DWITH_CUDA"], extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
         build_directory=str(out), with_cuda=True, verbose=False)


def main(argv: list[str]) -> int:
    """Build, then leave ``done`` or ``failed`` in the build directory."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for marker in ("done", "failed"):  # a rebuild's waiters must not read a stale result
        (out / marker).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        build(src, out)
    except Exception:  # noqa: BLE001 - reported in the file the benchmark reads
        (out / "failed").write_text(traceback.format_exc()[-4000:])
        print(f"build_released_dcnv3: failed after {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        return 1
    (out / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
    print(f"build_released_dcnv3: built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
