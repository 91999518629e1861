"""Resume pre-training on another world size: model and optimizer through DeepSpeed's
universal checkpoint (the data side is :mod:`data.redeal`).

ZeRO-3 files hold each rank's flat partition, so a checkpoint written by N ranks cannot be
loaded by M directly. DeepSpeed's ``ds_to_universal`` turns a tag folder into one file per
parameter (fp32 weights and Adam moments), which ``load_checkpoint`` re-partitions for any
world size when the engine's config has ``"checkpoint": {"load_universal": true}``
(measured here: fp32 parameters and Adam moments bit-identical 2 -> 1 and 2 -> 3 ranks, step
and scheduler restored; /work/shared/design/REFERENCE.md). The universal path does not
restore module buffers or frozen parameters; the pre-training model trains every parameter,
and its buffers are deterministic functions of the config (rebuilt identically at init).

The conversion runs once, on rank 0, into ``checkpoints/<tag>_universal`` (written under a
temporary name and renamed, so a crash mid-conversion leaves nothing that looks complete);
a later resize from the same checkpoint reuses it. ``runtime.checkpoint.prune`` deletes it
once ``latest`` names another checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runtime.checkpoint import ResumeError
from runtime.dist import barrier

log = logging.getLogger(__name__)

SUFFIX = "_universal"


def convert_to_universal(ckpt_dir: Path) -> Path:
    """``ckpt_dir``'s universal form beside it (``<tag>_universal``), converted with
    DeepSpeed's ``ds_to_universal`` unless already there. Call on one process."""
    out = ckpt_dir.with_name(ckpt_dir.name + SUFFIX)
    if out.is_dir():
        return out
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}{SUFFIX}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    # its default worker counts: --num_extract_workers 1 with the default merge workers
    # hangs (REFERENCE.md)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(ckpt_dir), "--output_folder", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ResumeError(f"{ckpt_dir}: DeepSpeed's ds_to_universal failed "
                          f"({proc.returncode}):\n{proc.stderr[-2000:]}")
    tmp.rename(out)
    log.warning("converted %s to a universal checkpoint in %.1f s (%s)", ckpt_dir,
                time.perf_counter() - start, out)
    return out


def universal_tag(engine, ckpt_dir: Path, is_main: bool) -> str:
    """The tag to pass to ``engine.load_checkpoint`` to load ``ckpt_dir`` on this world
    size: rank 0 converts (every rank waits), and the engine is switched to DeepSpeed's
    universal loading (its ``checkpoint.load_universal`` config key, read at load time)."""
    if is_main:
        convert_to_universal(ckpt_dir)
    barrier()
    engine._config.load_universal_checkpoint = True
    return ckpt_dir.name + SUFFIX


def restore_buffers(module, ckpt_dir: Path) -> int:
    """Copy the module buffers saved by rank 0 in ``ckpt_dir`` into ``module`` (the
    universal load leaves them at their initial values); returns how many."""
    import torch

    files = sorted(ckpt_dir.glob("*rank_0_mp_rank_00_model_states.pt"))
    if not files:
        raise ResumeError(f"{ckpt_dir}: no rank-0 model states file to restore buffers from")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    buffers = dict(module.named_buffers())
    names = saved.get("buffer_names", [])
    missing = [n for n in names if n not in buffers]
    if missing:
        raise ResumeError(f"{ckpt_dir}: saved buffers {missing[:3]} are not in this model")
    with torch.no_grad():
        for name in names:
            buffers[name].copy_(saved["module"][name])
    return len(names)
