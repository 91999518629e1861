"""Resume cost of the raw sample stream after 10^3 and after 10^6 samples (issue #14).

Synthetic shards (tiny one-member samples, so that 10^6 samples fit in ~1 GB of local
files; built once under ``--dir`` and reused) feed one source stream of one slot with the
default 1,000-sample shuffle block. The stream is run from the start (the full replay that
resume used to need, timed) and its state is saved after 10^3 and after 10^6 samples; each
state is then restored and timed up to the first sample it yields (median of ``--repeats``),
and the resumed samples are checked against the uninterrupted stream. Prints one JSON line.

    python benchmarks/data_resume.py [--dir /tmp/internimage_data_resume] [--samples 1000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.config import S3Config  # noqa: E402
from data.stats import SkipCounter  # noqa: E402
from data.stream import MixedStream, SourceCursor, SourceStream  # noqa: E402

PER_SHARD = 10_000


def build_shards(root: Path, shards: int) -> list[str]:
    """``shards`` tars of PER_SHARD one-member samples (``{shard}-{i}.cls``), reused when
    present (a ``.done`` marker is written last)."""
    root.mkdir(parents=True, exist_ok=True)
    urls = [str(root / f"{s:05d}.tar") for s in range(shards)]
    for s, url in enumerate(urls):
        if Path(url + ".done").exists():
            continue
        parts = []
        for i in range(PER_SHARD):  # header + data padded to 512 bytes, as tarfile writes
            data = str(i % 1000).encode()
            info = tarfile.TarInfo(f"{s:05d}-{i:05d}.cls")
            info.size = len(data)
            parts += [info.tobuf(tarfile.USTAR_FORMAT), data, bytes(-len(data) % 512)]
        parts.append(bytes(1024))  # end-of-archive marker
        Path(url).write_bytes(b"".join(parts))
        Path(url + ".done").write_text("")
    return urls


def make_stream(urls: list[str], counter: SkipCounter, state: dict | None) -> MixedStream:
    def make_sources(cursors: list[SourceCursor] | None) -> list[SourceStream]:
        return [SourceStream("synthetic", urls, slot=0, nslots=1, seed=0, s3=S3Config(),
                             counter=counter, cursor=cursors[0] if cursors else None)]

    return MixedStream(make_sources, [1.0], seed=0, slot=0, block_size=1000,
                       counter=counter, state=state)


def run_and_save(urls: list[str], points: list[int]) -> tuple[dict[int, tuple], float]:
    """Run from the start; at each point, the JSON state and the next sample's key."""
    stream = make_stream(urls, SkipCounter(), None)
    it = iter(stream)
    saved: dict[int, tuple] = {}
    start = time.perf_counter()
    n = 0
    for point in points:
        while n < point:
            next(it)
            n += 1
        state = json.loads(json.dumps(stream.state()))
        saved[point] = (state, next(it)[1]["__key__"])
        n += 1
    return saved, time.perf_counter() - start


def time_resume(urls: list[str], state: dict, expected_key: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, raw = next(iter(make_stream(urls, SkipCounter(), state)))
        times.append(time.perf_counter() - start)
        if raw["__key__"] != expected_key:
            raise AssertionError(f"resumed at {raw['__key__']}, expected {expected_key}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/internimage_data_resume")
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shards = -(-(args.samples + 2_000) // PER_SHARD)
    t0 = time.perf_counter()
    urls = build_shards(Path(args.dir), shards)
    build_s = time.perf_counter() - t0
    points = [1_000, args.samples]
    saved, replay_s = run_and_save(urls, points)
    result = {"shards": shards, "samples_per_shard": PER_SHARD, "shuffle_block": 1000,
              "build_or_reuse_s": round(build_s, 2),
              "replay_from_start_to_last_point_s": round(replay_s, 2)}
    for point in points:
        state, key = saved[point]
        result[f"resume_after_{point}_s"] = round(time_resume(urls, state, key,
                                                              args.repeats), 4)
        result[f"state_bytes_after_{point}"] = len(json.dumps(state))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
