"""How evenly streamed classification epochs read a set, at full scale, by the deal alone
(no I/O): ImageNet-22K (14,197,122 images in shards of 1,000) on 512 GPUs x 8 loader
workers, batch 32 per GPU, for a number of training epochs.

Two rules for where a training epoch starts in each slot's stream (``data.epochs`` deals
every data epoch's shards over the 4,096 slots, shares differing by one shard):

- ``restart``: every slot starts training epoch ``e`` at the start of its share of data
  epoch ``e`` (finetune/cls_stream.py before 50c3a5a): the end of the larger shares is
  never read, the start of the next data epoch's is read twice;
- ``continue``: the stream goes on where the last epoch stopped (now).

Prints JSON: per rule and epoch, the share of samples not read in that epoch and read
twice in it, and after the last epoch the spread of read counts over all samples.

    python benchmarks/stream_epochs.py [--epochs 4] [--gpus 512] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.epochs import extra_offsets, first_slot, slot_units  # noqa: E402

SAMPLES, SHARD = 14_197_122, 1_000


def shard_sizes() -> np.ndarray:
    n = -(-SAMPLES // SHARD)
    sizes = np.full(n, SHARD, dtype=np.int64)
    sizes[-1] = SAMPLES - SHARD * (n - 1)
    return sizes


def slot_quota(gpus: int, workers: int, batch: int) -> np.ndarray:
    """Samples each slot delivers per training epoch (batches dealt round-robin over a
    rank's workers)."""
    per_rank = SAMPLES // (batch * gpus)
    quota = np.array([len(range(w, per_rank, workers)) for w in range(workers)]) * batch
    return np.tile(quota, gpus)


def share(epoch: int, slot: int, nslots: int, sizes: np.ndarray, stride: int
          ) -> list[tuple[int, int]]:
    """(shard, samples) of a slot's share of a data epoch, in reading order."""
    start = first_slot(nslots, epoch, 0, stride)
    units = slot_units(len(sizes), nslots, slot, 0, "train", epoch, True, start)
    return [(int(u), int(sizes[u])) for u in units]


def run(rule: str, epochs: int, gpus: int, workers: int, batch: int) -> dict:
    sizes = shard_sizes()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    nslots = gpus * workers
    _, stride = extra_offsets([len(sizes)], nslots)
    quota = slot_quota(gpus, workers, batch)
    reads = np.zeros(SAMPLES, dtype=np.int16)
    # continue: (data epoch, index in the share, samples read of that unit) per slot
    where = [(0, 0, 0)] * nslots
    per_epoch = []
    for e in range(epochs):
        this = np.zeros(SAMPLES, dtype=np.int16)
        for slot in range(nslots):
            data_epoch, i, done = (e, 0, 0) if rule == "restart" else where[slot]
            units, left = share(data_epoch, slot, nslots, sizes, stride), int(quota[slot])
            while left:
                if i == len(units):
                    data_epoch, i, done = data_epoch + 1, 0, 0
                    units = share(data_epoch, slot, nslots, sizes, stride)
                    continue
                shard, size = units[i]
                take = min(left, size - done)
                this[offsets[shard] + done:offsets[shard] + done + take] += 1
                left -= take
                done += take
                if done == size:
                    i, done = i + 1, 0
            where[slot] = (data_epoch, i, done)
        reads += this
        per_epoch.append({"epoch": e, "unread": round(float((this == 0).mean()), 4),
                          "read_twice": round(float((this >= 2).mean()), 4)})
    low, high = int(reads.min()), int(reads.max())
    spread = {str(k): int((reads == k).sum()) for k in range(low, high + 1)}
    return {"rule": rule, "per_epoch": per_epoch, "reads_after_all": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=512)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    out = {"samples": SAMPLES, "shard": SHARD, "gpus": args.gpus, "workers": args.workers,
           "batch": args.batch, "epochs": args.epochs,
           "rules": [run(rule, args.epochs, args.gpus, args.workers, args.batch)
                     for rule in ("restart", "continue")]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
