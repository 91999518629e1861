"""Per-rank cost of the mixed inputs' image-text term: the full N x N matrix that every
rank used to build, against this rank's B rows scored against the N gathered columns
(``pretrain.objectives.infonce_rows``, open_clip's local loss).

N = global batch, B = images per rank (N / B ranks). The loss alone, on random unit
embeddings, two InfoNCE problems (mixed inputs: image A and image B rows), forward and
backward, fp32, one CPU thread:

    python benchmarks/contrastive_loss.py --batch-per-rank 32 --global 2048 4096 8192

Prints one JSON line per (N, formulation): FLOPs of the matrix products (torch's
FlopCounterMode), bytes saved for the backward (distinct storages, what a step retains
until its backward), and wall time. The gathers themselves are not run (one process):
their cost (N x E per rank) is the same for both formulations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pretrain.objectives import infonce_rows  # noqa: E402


def full_matrix(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What every rank computed before: the whole global batch's N x N problem."""
    logits = scale * image @ text.t()
    labels = torch.arange(logits.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _inputs(n: int, dim: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
            for _ in range(3)]  # image A rows, image B rows, texts


def _step(kind: str, n: int, b: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    image_a, image_b, text = tensors
    scale = torch.tensor(100.0)
    if kind == "full_matrix":
        return 0.5 * (full_matrix(image_a, text, scale) + full_matrix(image_b, text, scale))
    # rank 0's rows; every rank's cost is the same
    keep, all_keep = torch.ones(b, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    targets = torch.arange(b)
    total = image_a.new_zeros(())
    for rows in (image_a, image_b):
        total = total + infonce_rows(rows[:b], text[:b], rows, text, targets, keep, all_keep,
                                     scale)
    return total / (4.0 * b)  # rank 0's share: W / (2N) per problem, their mean


def measure(kind: str, n: int, b: int, dim: int, repeats: int) -> dict:
    """FLOPs, saved-for-backward bytes and median wall time of one forward + backward."""
    tensors = _inputs(n, dim, seed=n)
    # the embeddings are the model's, not the loss's: not counted
    inputs = {t.untyped_storage().data_ptr() for t in tensors}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with FlopCounterMode(display=False) as flops, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(kind, n, b, tensors).backward()
    retained = sum(saved.values())
    times = []
    for _ in range(repeats):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        _step(kind, n, b, tensors).backward()
        times.append(time.perf_counter() - start)
    return {"formulation": kind, "global_batch": n, "batch_per_rank": b, "ranks": n // b,
            "embed_dim": dim, "matmul_gflop": flops.get_total_flops() / 1e9,
            "saved_for_backward_mib": retained / 2**20,
            "seconds_fwd_bwd": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-per-rank", type=int, default=32)
    p.add_argument("--global", dest="global_batches", type=int, nargs="+",
                   default=[2048, 4096, 8192])
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for n in args.global_batches:
        for kind in ("full_matrix", "local_rows"):
            print(json.dumps(measure(kind, n, args.batch_per_rank, args.embed_dim,
                                     args.repeats)), flush=True)


if __name__ == "__main__":
    main()
