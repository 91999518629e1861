"""The streaming data pipeline: corrupt data is skipped and counted, sources mix by weight,
(rank, worker) slots never share a shard, and resume continues with the same samples."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from s3_server import good_samples, jpeg_bytes, write_tar

from data.config import S3Config
from data.loader import UnusableSourceError
from data.storage import redact_url
from pretrain.data import DataConfig, SourceConfig, build_loader
from pretrain.data.verify import verify_shards


def _cfg(sources, **kw) -> DataConfig:
    base = dict(sources=sources, image_size=16, batch_size=8, workers=0, shuffle_buffer=16,
                shuffle_initial=8, context_length=12, s3=S3Config(retries=1, backoff=0.01))
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[list[str], dict]:
    """Five shards with every kind of damage; returns URLs and the expected tally."""
    d = tmp_path_factory.mktemp("corrupt")
    big = jpeg_bytes(1, size=64)
    bad = [
        good_samples("ok", 1)[0],
        {"__key__": "trunc", "jpg": big[: len(big) * 6 // 10], "txt": "truncated jpeg"},
        {"__key__": "noise", "jpg": random.Random(0).randbytes(300), "txt": "random bytes"},
        {"__key__": "empty", "jpg": b"", "txt": "empty image"},
        {"__key__": "nocap", "jpg": jpeg_bytes(2)},
        {"__key__": "blankcap", "jpg": jpeg_bytes(3), "txt": "  \n"},
        {"__key__": "noimg", "txt": "caption without image"},
        good_samples("ok2", 1)[0],
    ]
    urls = [str(write_tar(d / "good.tar", good_samples("g", 5))),
            str(write_tar(d / "bad-samples.tar", bad))]
    (d / "random.tar").write_bytes(random.Random(1).randbytes(5000))
    urls.append(str(d / "random.tar"))
    full_path = write_tar(d / "full.tar", good_samples("t", 5, size=64))
    with tarfile.open(full_path) as tar:  # cut inside the 5th sample's image
        cut = tar.getmember("t0004.jpg").offset_data + 100
    full = full_path.read_bytes()
    (d / "truncated.tar").write_bytes(full[:cut])
    urls.append(str(d / "truncated.tar"))
    urls.append(str(d / "does-not-exist.tar"))
    # truncated.tar: 4 whole samples, then the 5th is cut inside its first member (counted
    # lost); random.tar is not a tar; does-not-exist.tar is missing.
    expected = {"samples": 5 + 2 + 4,
                "reasons": {"undecodable_image": 2, "empty_image": 1, "missing_caption": 2,
                            "missing_image": 1, "unreadable_shard": 1, "truncated_shard": 1,
                            "lost_samples": 1, "missing_shard": 1}}
    return urls, expected


def test_corrupt_samples_are_skipped_and_counted_by_reason(corrupt_shards):
    urls, expected = corrupt_shards
    report = verify_shards(urls, S3Config(retries=1, backoff=0.01), image_size=16)
    assert report["samples"] == expected["samples"]
    assert report["reasons"] == expected["reasons"]
    assert report["skipped"] == sum(expected["reasons"].values())
    assert report["shards"] == 5


def test_counts_are_aggregated_across_worker_processes(corrupt_shards):
    urls, expected = corrupt_shards
    cfg = _cfg([SourceConfig("mixed", urls, resampled=False)], workers=2, batch_size=3)
    loader = build_loader(cfg, rank=0, world_size=1, train=True)
    batches = [batch["keys"] for batch in loader]
    seen = [k for keys in batches for k in keys]
    # training batches are full; each worker's rest of the pass sits it out, counted
    assert {len(keys) for keys in batches} == {3}
    rest = loader.stats.events["pass_remainder"]
    assert 0 < rest < 2 * 3
    assert len(seen) == len(set(seen)) == expected["samples"] - rest
    assert dict(loader.stats.skipped) == expected["reasons"]
    assert loader.stats.samples == {"mixed": len(seen)}


def test_endless_batches_of_one_pass_sources_go_on_pass_after_pass_and_resume(tmp_path):
    """A run counted in steps draws from ``endless()``: with only one-pass sources, a
    plain iterator ended (pre-training died with a bare StopIteration after one pass).
    Each pass hands out every sample once, the next pass in another order, and a state
    saved inside the second pass resumes there exactly."""
    import itertools

    urls = [str(write_tar(tmp_path / f"o{i}.tar", good_samples(f"o{i}-", 6, size=8)))
            for i in range(3)]
    cfg = _cfg([SourceConfig("once", urls, resampled=False)], workers=2, batch_size=3)
    loader = build_loader(cfg, 0, 1, train=True)
    batches = loader.endless()
    keys = [b["keys"] for b in itertools.islice(batches, 8)]  # 6 batches a pass
    first, second = [k for b in keys[:6] for k in b], [k for b in keys[6:] for k in b]
    assert sorted(first) == sorted(f"o{i}.tar/o{i}-{j:04d}" for i in range(3)
                                   for j in range(6))
    assert len(second) == 6 and set(second) <= set(first)
    saved = json.loads(json.dumps(loader.state_dict()))
    later = [next(batches)["keys"] for _ in range(3)]
    second += [k for b in later for k in b]
    assert second != first[:len(second)]  # the next pass: another order
    resumed = build_loader(cfg, 0, 1, train=True, state=saved).endless()
    assert [next(resumed)["keys"] for _ in range(3)] == later
    with pytest.raises(UnusableSourceError, match=r"a whole pass over the data sources "
                       r"\(gone\) gave no batch"):
        next(build_loader(_cfg([SourceConfig("gone", str(tmp_path / "gone.tar"),
                                             resampled=False)]), 0, 1).endless())


def test_batch_format_tags_and_unknown_tags(tmp_path):
    vocab = tmp_path / "tags.txt"
    vocab.write_text("a\nb\nc\n")
    samples = good_samples("s", 6, tags=("a", "zzz"))
    samples[0]["json"] = json.dumps({"tags": []})
    samples[1]["json"] = json.dumps({"tags": ["c", "b"]})
    url = str(write_tar(tmp_path / "t.tar", samples))
    cfg = _cfg([SourceConfig("s", url, resampled=False)], tag_vocab=str(vocab), batch_size=6,
               shuffle_buffer=0)
    loader = build_loader(cfg, 0, 1, train=False)
    (batch,) = list(loader)
    assert batch["images"].shape == (6, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["tokens"].shape == (6, 12) and batch["tokens"].dtype == torch.long
    assert batch["tag_targets"].shape == (6, 3)
    assert batch["source_ids"].tolist() == [0] * 6
    assert batch["has_text"].all()
    assert batch["has_tags"].tolist() == [False, True, True, True, True, True]
    assert batch["tag_targets"][0].sum() == 0
    assert batch["tag_targets"][1].tolist() == [0, 1, 1]
    assert batch["tag_targets"][2].tolist() == [1, 0, 0]
    assert loader.stats.events["unknown_tags"] == 4


def _mixed_sources(tmp_path: Path) -> list[SourceConfig]:
    a = [str(write_tar(tmp_path / f"a{i}.tar", good_samples(f"a{i}-", 30, size=8)))
         for i in range(4)]
    b = [str(write_tar(tmp_path / f"b{i}.tar", good_samples(f"b{i}-", 30, size=8)))
         for i in range(4)]
    return [SourceConfig("a", a, weight=3.0), SourceConfig("b", b, weight=1.0)]


def test_sources_mix_by_weight(tmp_path):
    cfg = _cfg(_mixed_sources(tmp_path), batch_size=100, image_size=8)
    loader = build_loader(cfg, 0, 1)
    n = 4000
    counts = Counter()
    for batch in loader:
        counts.update(batch["source_ids"].tolist())
        if sum(counts.values()) >= n:
            break
    frac_b = counts[1] / n
    sd = (0.25 * 0.75 / n) ** 0.5
    assert abs(frac_b - 0.25) < 5 * sd, counts
    assert loader.stats.samples == {"a": counts[0], "b": counts[1]}


def test_every_shard_is_read_by_exactly_one_slot_per_epoch(tmp_path):
    # Issue #14: each epoch deals a permutation of the shards over all rank x worker slots,
    # so every shard is read once per epoch and shards change slot between epochs. 8 shards
    # of 12 samples over 2 ranks x 2 workers: a slot reads 2 shards (2 batches) per epoch.
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 12, size=8)))
            for i in range(8)]
    cfg = _cfg([SourceConfig("s", urls)], workers=2, batch_size=12, image_size=8,
               shuffle_buffer=0)
    reads: dict[int, Counter] = defaultdict(Counter)
    owner: dict[int, dict[str, tuple]] = defaultdict(dict)
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2)
        seen: Counter = Counter()
        for batch in loader:
            epoch = seen[batch["worker"]] // 2
            seen[batch["worker"]] += 1
            (shard,) = {key.split("/")[0] for key in batch["keys"]}  # one shard per batch
            reads[epoch][shard] += 1
            owner[epoch][shard] = (rank, batch["worker"])
            if min(seen[0], seen[1]) >= 6:
                break
    shards = {f"s{i}.tar" for i in range(8)}
    for epoch in range(3):
        assert reads[epoch] == {s: 1 for s in shards}, (epoch, reads[epoch])
    assert owner[0] != owner[1] or owner[1] != owner[2], "the dealing changes per epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_gives_the_same_following_batches(tmp_path, corrupt_shards, workers):
    sources = _mixed_sources(tmp_path)
    sources.append(SourceConfig("corrupt", corrupt_shards[0][:2], weight=1.0))
    cfg = _cfg(sources, workers=workers, batch_size=10, image_size=8, seed=7)
    before = 3 if workers else 4
    loader = build_loader(cfg, 0, 1)
    saved, expected = None, []
    for i, batch in enumerate(loader):
        if i == before - 1:
            saved = json.loads(json.dumps(loader.state_dict()))  # as stored in checkpoints
        elif i >= before:
            expected.append(batch)
        if len(expected) == 4:
            break
    resumed = build_loader(cfg, 0, 1, state=saved)
    got = []
    for batch in resumed:
        got.append(batch)
        if len(got) == 4:
            break
    for e, g in zip(expected, got, strict=True):
        assert e["keys"] == g["keys"]
        assert torch.equal(e["images"], g["images"])
        assert torch.equal(e["tokens"], g["tokens"])
        assert torch.equal(e["source_ids"], g["source_ids"])
    assert sum(resumed.stats.samples.values()) == sum(loader.stats.samples.values())
    assert resumed.stats.skipped == loader.stats.skipped


def test_state_from_another_layout_is_refused(tmp_path):
    cfg = _cfg(_mixed_sources(tmp_path))
    state = build_loader(cfg, 0, 1).state_dict()
    other = _cfg(_mixed_sources(tmp_path), workers=3)
    with pytest.raises(ValueError, match="workers"):
        build_loader(other, 0, 1, state=state)


def test_one_pass_training_resumes_from_any_batch_and_tiny_shares_are_named(tmp_path):
    """A checkpoint right after a pass's last full batch holds a position whose pass has
    only its rest left (which sits the pass out): resumed there, the loader raised
    "nothing readable" (on one rank, the others waiting in a collective). From every saved
    position, the resumed stream gives the uninterrupted one's batches. A pass whose
    slots each hold fewer than a batch says so, not "nothing readable"."""
    import itertools

    urls = [str(write_tar(tmp_path / f"o{i}.tar", good_samples(f"o{i}-", 7, size=8)))
            for i in range(3)]
    cfg = _cfg([SourceConfig("once", urls, resampled=False)], batch_size=4, workers=0,
               shuffle_buffer=4)
    loader = build_loader(cfg, 0, 1, train=True)
    batches, states, keys = loader.endless(), [], []
    for _ in range(8):  # 21 samples: 5 full batches a pass, 1 left out
        states.append(json.loads(json.dumps(loader.state_dict())))
        keys.append(next(batches)["keys"])
    assert [s["epoch"] for s in states] == [0] * 6 + [1] * 2  # 5 batches, then the rest
    for i, state in enumerate(states[:6]):
        resumed = build_loader(cfg, 0, 1, train=True, state=state).endless()
        assert [next(resumed)["keys"] for _ in range(2)] == keys[i:i + 2], i
    tiny = build_loader(_cfg([SourceConfig("once", urls, resampled=False)], batch_size=8,
                             workers=3), 0, 1, train=True)
    with pytest.raises(UnusableSourceError, match="fewer than data.batch_size=8 samples"):
        list(itertools.islice(tiny.endless(), 1))


def test_shard_list_file_and_env_rank(tmp_path, monkeypatch):
    urls = [str(write_tar(tmp_path / f"s{i}.tar", good_samples(f"s{i}-", 3, size=8)))
            for i in range(4)]
    listing = tmp_path / "shards.txt"
    listing.write_text("# shards\n" + "\n".join(urls) + "\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # the case under test is a process without a process group (a dataloader tool, a
    # launcher that only sets the env); an in-process run earlier in the suite may have
    # left a world-1 group, which would rightly win, and DeepSpeed caches groups so it
    # cannot be torn down between files
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    # train=False: each rank's whole share, not only its full training batches
    loader = build_loader(_cfg([SourceConfig("s", str(listing), resampled=False)]),
                          train=False)
    keys = {k.split("/")[0] for b in loader for k in b["keys"]}
    assert (loader.rank, loader.world_size) == (1, 2)
    other = build_loader(_cfg([SourceConfig("s", str(listing), resampled=False)]), 0, 2,
                         train=False)
    other_keys = {k.split("/")[0] for b in other for k in b["keys"]}
    # one pass: the two ranks read disjoint halves of the listed shards
    assert len(keys) == 2 and keys | other_keys == {f"s{i}.tar" for i in range(4)}


def test_brace_patterns_and_pipe_urls(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"p{i}.tar", good_samples(f"p{i}-", 2, size=8))
    braced = build_loader(_cfg([SourceConfig("s", str(tmp_path / "p{0..2}.tar"),
                                             resampled=False)]), 0, 1, train=False)
    assert sum(len(b["keys"]) for b in braced) == 6
    piped = build_loader(_cfg([SourceConfig("s", f"pipe:cat {tmp_path}/p{{0..2}}.tar",
                                            resampled=False)]), 0, 1, train=False)
    assert sorted(k.split("/")[1] for b in piped for k in b["keys"]) == \
        sorted(k.split("/")[1] for b in braced for k in b["keys"])


def test_config_errors_name_the_key():
    src = SourceConfig("s", "x.tar")
    with pytest.raises(ValueError, match="sources.s.weight"):
        SourceConfig("s", "x.tar", weight=0)
    with pytest.raises(ValueError, match="data.batch_size"):
        DataConfig(sources=[src], batch_size=0)
    with pytest.raises(ValueError, match="data.sources"):
        DataConfig(sources=[src, src])
    with pytest.raises(ValueError, match="data.sources"):
        build_loader(DataConfig(), 0, 1)
    from launch.config import ConfigError, build

    with pytest.raises(ConfigError, match="shuffle_bufer"):
        build(DataConfig, {"sources": [{"name": "s", "urls": "x.tar"}], "shuffle_bufer": 3})
    cfg = build(DataConfig, {"sources": [{"name": "s", "urls": ["a.tar", "b.tar"],
                                          "weight": 2}], "s3": {"retries": 2}})
    assert cfg.sources[0].weight == 2.0 and cfg.s3.retries == 2


def test_credentials_never_appear_in_logs_or_reprs():
    assert "secret" not in redact_url("s3://AKIA:secret@bucket/x.tar")
    assert "sig123" not in redact_url("https://h/x.tar?X-Amz-Signature=sig123&a=1")
    assert "pw" not in redact_url("pipe:curl -s https://user:pw@host/x.tar")
    assert "hunter2" not in repr(S3Config(key="AKIA", secret="hunter2"))


def test_unreadable_shard_is_counted_once_in_a_resampled_stream(tmp_path):
    good = str(write_tar(tmp_path / "good.tar", good_samples("g", 4, size=8)))
    (tmp_path / "junk.tar").write_bytes(random.Random(2).randbytes(2000))
    cfg = _cfg([SourceConfig("s", [good, str(tmp_path / "junk.tar")])], batch_size=4,
               image_size=8)
    loader = build_loader(cfg, 0, 1)
    for i, _ in enumerate(loader):
        if i == 30:
            break
    assert loader.stats.skipped == {"unreadable_shard": 1}


def test_demo_shards_feed_the_loader(cache):
    from pretrain.data import demo_source, demo_tag_vocab, ensure_demo_shards

    manifest = ensure_demo_shards(cache)  # the suite's shared demo cache (read only)
    cfg = _cfg([demo_source(manifest, "val")], tag_vocab=demo_tag_vocab(manifest),
               image_size=32, batch_size=64, workers=2)
    loader = build_loader(cfg, 0, 1, train=False)
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == 270
    assert all(b["has_tags"].all() and b["tag_targets"].sum(1).eq(3).all() for b in batches)
    assert not loader.stats.skipped


@pytest.mark.parametrize("workers", [0, 1])
def test_iterating_leaves_torch_global_rng_alone(tmp_path, workers):
    # The training step draws from torch's global RNG (M3I views and masks, drop path) and a
    # resumed run restores that RNG before its loader starts a new iterator. torch's
    # DataLoader draws its workers' base seed from the global RNG at every new iterator
    # unless it is given a `generator` (torch.utils.data.DataLoader docs, `generator`), so
    # the stream must not start one that does: a resumed run's random numbers would shift.
    urls = [str(write_tar(tmp_path / "s0.tar", good_samples("s0-", 4, size=8)))]
    loader = build_loader(_cfg([SourceConfig("s", urls)], workers=workers, batch_size=2),
                          0, 1)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    it = iter(loader)
    next(it)
    next(it)
    assert torch.equal(torch.get_rng_state(), before)
