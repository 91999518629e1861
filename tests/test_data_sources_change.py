"""A pre-training resume whose data sources changed since the checkpoint (a source added
or removed): the saved data position is one cursor per saved source, so it is refused in
one line naming the change, or with ``data.on_shard_list_change=restart`` the data
pipeline starts afresh over this run's sources with its counts kept. (Both used to end in
``zip() argument 3 is shorter than arguments 1-2``.)"""

from __future__ import annotations

import json

import pytest
from s3_server import good_samples, write_tar

from data.config import S3Config
from data.state import PipelineState


def _cfg(urls: dict[str, list[str]], **kw):
    from pretrain.data import DataConfig, SourceConfig

    return DataConfig(sources=[SourceConfig(name, u) for name, u in urls.items()],
                      image_size=8, batch_size=2, workers=0, shuffle_buffer=0,
                      context_length=8, seed=1, s3=S3Config(prefetch_bytes=0), **kw)


def _keys(loader, n: int) -> list[str]:
    out: list[str] = []
    for batch in loader:
        out += batch["keys"]
        if len(out) >= n:
            return out[:n]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    return {name: [str(write_tar(root / f"{name}{i}.tar", good_samples(f"{name}{i}-", 4,
                                                                        size=8)))
                   for i in range(4)]
            for name in ("a", "b", "c")}


@pytest.fixture(scope="module")
def saved(shards) -> list[dict]:
    """Every rank's state of a 2-rank run over sources a and b, 6 samples into it."""
    from pretrain.data import build_loader

    out = []
    for rank in (0, 1):
        loader = build_loader(_cfg({"a": shards["a"], "b": shards["b"]}), rank, 2)
        _keys(loader, 6)
        out.append(json.loads(json.dumps(loader.state_dict())))  # as checkpoints store it
    return out


def test_changed_sources_names_a_source_added_or_removed():
    lists = {name: [4, name * 16] for name in "abc"}

    def state(names: str, recorded: bool = True) -> PipelineState:
        return PipelineState(1, 0, 1, 1, list(names),
                             shard_lists=[lists[n] for n in names] if recorded else None)

    assert state("abc").changed_sources(state("ab")) == ["c"]
    assert state("a").changed_sources(state("ab")) == ["b"]
    assert state("ac").changed_sources(state("ab")) == ["c", "b"]
    assert state("ab").changed_sources(state("ab", recorded=False)) == []
    assert state("abc").changed_sources(state("ab", recorded=False)) == ["c"]
    assert state("ba").changed_sources(state("ab")) == []  # the order: check_sources


@pytest.mark.parametrize("names, change", [("abc", "added ['c']"), ("a", "removed ['b']")])
def test_a_changed_source_set_is_refused_naming_the_change(shards, saved, names, change):
    from pretrain.data import build_loader

    cfg = _cfg({n: shards[n] for n in names})
    with pytest.raises(ValueError) as err:
        build_loader(cfg, 0, 2, state=saved[0])
    message = str(err.value)
    assert change in message and "on_shard_list_change=restart" in message
    assert "\n" not in message


def test_sources_in_another_order_are_refused_whatever_the_policy(shards, saved):
    from pretrain.data import build_loader

    for policy in ("error", "restart"):
        cfg = _cfg({"b": shards["b"], "a": shards["a"]}, on_shard_list_change=policy)
        with pytest.raises(ValueError, match=r"in the order \['a', 'b'\].*list data.sources "
                                             "in that order"):
            build_loader(cfg, 0, 2, state=saved[0])


@pytest.mark.parametrize("names", ["abc", "a", "ac"])
def test_restart_starts_afresh_over_the_new_sources_with_the_counts_kept(shards, saved,
                                                                         names):
    from pretrain.data import build_loader

    urls = {n: shards[n] for n in names}
    restart = _cfg(urls, on_shard_list_change="restart")
    restarted = build_loader(restart, 0, 2, state=saved[0])
    assert restarted.stats.samples == saved[0]["stats"]["samples"]
    assert _keys(restarted, 10) == _keys(build_loader(_cfg(urls), 0, 2), 10)
    # every rank's state on another world size (the re-deal path): counts summed on rank 0
    merged = build_loader(restart, 0, 1, state=saved)
    assert sum(merged.stats.samples.values()) == 12


@pytest.mark.slow
def test_a_pretraining_resume_with_a_source_added(tmp_path, cache):
    # The user's path: train on sources a and b, resume with c added. Refused before any
    # compute in one line naming c (no traceback, the run's config.yaml kept, no staged
    # config left); with data.on_shard_list_change=restart it trains on over a, b and c.
    from tests.pretrain_utils import latest, losses, pretrain_cmd, run_forked

    def sources(*names: str) -> str:
        return "data.sources=" + json.dumps([
            {"name": n, "urls": "builtin:digits/train", "image_key": "jpg",
             "text_key": "txt", "tags_key": "json:tags"} for n in names])

    out = tmp_path / "run"
    run_forked(pretrain_cmd(1, out, "--max-steps", "3", "--checkpoint-every", "3",
                            "zero_shot.urls=[]", sources("a", "b")), cache)
    assert latest(out) == "step_0000003"
    config = (out / "config.yaml").read_text()
    resume = ["--max-steps", "4", "--resume", "auto", "zero_shot.urls=[]"]
    proc = run_forked(pretrain_cmd(1, out, *resume, sources("a", "b", "c")), cache,
                      check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("internimage pretrain:")]
    assert len(errors) == 1 and "added ['c']" in errors[0], proc.stderr[-3000:]
    assert (out / "config.yaml").read_text() == config
    assert not list(out.glob(".config.yaml.pending*"))
    assert sorted(losses(out)) == [1, 2, 3]

    run_forked(pretrain_cmd(1, out, *resume, sources("a", "b", "c"),
                            "data.on_shard_list_change=restart"), cache)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(final["source_mix"]) == {"a", "b", "c"}


@pytest.mark.parametrize("world", [2, 1])
def test_another_data_seed_is_refused_naming_the_key_and_the_saved_value(shards, saved,
                                                                          world):
    """Same world size (this rank's own state) and another (every rank's, re-dealt): the
    message names ``data.seed`` and what to resume with, not the loader's internals (it
    used to point at ``state=None`` and data.redeal, and at a world size or worker count
    that had not changed)."""
    import dataclasses

    from pretrain.data import build_loader

    cfg = dataclasses.replace(_cfg({"a": shards["a"], "b": shards["b"]}), seed=2)
    with pytest.raises(ValueError) as err:
        build_loader(cfg, 0, world, state=saved[0] if world == 2 else saved)
    message = str(err.value)
    assert "data.seed=1" in message and "data.seed=2" in message
    assert "resume with data.seed=1" in message and "redeal" not in message
