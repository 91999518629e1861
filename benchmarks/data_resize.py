"""Cost of resuming the data pipeline on another number of ranks, at the H recipe's scale.

Every rank of the resumed run reads every old rank's saved data state (each old rank's
``rank_states/NNNNN.json``) and re-deals what the old slots left (data/loader.py ->
``data.redeal.resized_state``). Built here without I/O: ``--old-ranks`` x ``--workers``
saved slots, each inside its first unit of each source and inside a shuffle block (the
block's end saved, as today's states do: each block is handed to a new slot whole,
data/adopted.py; ``--legacy``: states saved before, without it), the sources shaped like
the H preset's (Laion-400M 41,408 shards, YFCC-15M 1,500, CC12M 1,243), and ``--missing``
shards of each source met (and dropped) by the old slots. Prints one JSON line: the
saved state's size, one rank's re-deal time, memory peak (tracemalloc) and new state
size, and the re-deal of all slots.

    python benchmarks/data_resize.py --old-ranks 512 --new-ranks 448 --missing 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.epochs import extra_offsets, first_slot, parts_per_shard, slot_units  # noqa: E402
from data.redeal import SourceSpec, redeal, resized_state  # noqa: E402
from data.state import PipelineState, url_list_digest  # noqa: E402
from data.stream import SourceCursor  # noqa: E402

SOURCES = (("laion400m", 41_408), ("yfcc15m", 1_500), ("cc12m", 1_243))


def saved_states(specs: list[SourceSpec], ranks: int, workers: int, missing: int,
                 legacy: bool = False) -> list[dict]:
    """Every old rank's data state: each slot's block started 20 samples into its first
    unit of every source and ended 60 samples further (``end``, unless ``legacy``); each
    missing shard in the dropped list of the slot it was dealt to."""
    nslots = ranks * workers
    units = [len(s.urls) * parts_per_shard(len(s.urls), nslots) for s in specs]
    offsets, stride = extra_offsets(units, nslots)

    def cursor(i: int, spec: SourceSpec, slot: int, samples: int = 20) -> dict:
        parts = parts_per_shard(len(spec.urls), nslots)
        first = int(slot_units(units[i], nslots, slot, 0, spec.name, 0, True,
                               first_slot(nslots, 0, offsets[i], stride))[0])
        url = spec.urls[first // parts]
        key = url if parts == 1 else f"{url}#{first % parts}/{parts}"
        dropped = [spec.urls[j] for j in range(missing) if j % nslots == slot]
        return SourceCursor(epoch=0, position=1, unit=key, offset=512 * 2 * samples,
                            samples=samples, dropped=dropped, count_epoch=0).to_dict()

    out = []
    for rank in range(ranks):
        positions = {w: {"block": 7, "emitted": 100, "draws": 5000, "index": 5000,
                         "lead": None, "size": 5000,
                         "sources": [cursor(i, s, rank * workers + w)
                                     for i, s in enumerate(specs)],
                         "end": None if legacy else [cursor(i, s, rank * workers + w, 80)
                                                     for i, s in enumerate(specs)]}
                     for w in range(workers)}
        out.append(PipelineState(0, rank, ranks, workers, [s.name for s in specs],
                                 positions=positions,
                                 shard_lists=[url_list_digest(s.urls) for s in specs]).to_dict())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ranks", type=int, default=512)
    parser.add_argument("--new-ranks", type=int, default=448)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--missing", type=int, default=0, help="missing shards per source")
    parser.add_argument("--legacy", action="store_true",
                        help="states saved before the block's end was kept")
    args = parser.parse_args()
    specs = [SourceSpec(name, [f"s3://{name}/{i:06d}.tar" for i in range(n)])
             for name, n in SOURCES]
    # as every rank reads them back from the old ranks' JSON state files
    saved = json.loads(json.dumps(saved_states(specs, args.old_ranks, args.workers,
                                               args.missing, args.legacy)))
    start = time.perf_counter()
    mine = resized_state(saved, specs, 1, args.new_ranks, args.workers, 0)
    one_rank_s = time.perf_counter() - start
    tracemalloc.start()
    resized_state(saved, specs, 1, args.new_ranks, args.workers, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    start = time.perf_counter()
    everyone = redeal(saved, specs, args.new_ranks, args.workers, 0)
    all_s = time.perf_counter() - start
    positions = [everyone.positions[s] for s in range(args.new_ranks * args.workers)]
    print(json.dumps({
        "old_slots": args.old_ranks * args.workers, "new_slots": args.new_ranks * args.workers,
        "missing_per_source": args.missing, "legacy": args.legacy,
        "saved_state_bytes_all_ranks": len(json.dumps(saved)),
        "one_rank_redeal_s": round(one_rank_s, 2),
        "one_rank_peak_mib": round(peak / 2**20, 1),
        "one_rank_new_state_bytes": len(json.dumps(mine.to_dict())),
        "all_slots_redeal_s": round(all_s, 2),
        "adopted_blocks": everyone.adopted, "repeated_samples": everyone.repeated,
        "new_state_bytes_all_ranks": len(json.dumps(positions)),
        "max_dropped_keys_per_cursor": max(len(c["dropped"]) for p in positions
                                           for c in p["sources"]),
    }))


if __name__ == "__main__":
    main()
