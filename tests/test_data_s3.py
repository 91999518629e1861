"""Shards streamed over HTTP from a real S3-protocol server (moto) on 127.0.0.1."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from s3_server import CREDENTIALS, MotoServer, good_samples, write_tar

from pretrain.data import DataConfig, S3Config, SourceConfig, build_loader

pytestmark = pytest.mark.s3


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="module")
def moto_server():
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shard_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3shards")
    return [write_tar(d / f"shard-{i:02d}.tar", good_samples(f"s{i}-", 40, size=32))
            for i in range(4)]


def _eval_cfg(urls, s3: S3Config, workers: int = 0) -> DataConfig:
    return DataConfig(sources=[SourceConfig("s", urls, resampled=False)], image_size=16,
                      batch_size=8, workers=workers, shuffle_buffer=0, context_length=12,
                      s3=s3)


def _read_all(cfg: DataConfig):
    loader = build_loader(cfg, 0, 1, train=False)
    keys, images = [], []
    for batch in loader:
        keys += batch["keys"]
        images.append(batch["images"])
    return loader, keys, torch.cat(images)


def test_s3_gives_the_same_samples_as_local_disk(moto_server, shard_files, aws_env):
    urls = moto_server.upload("same", shard_files)
    _, local_keys, local_images = _read_all(_eval_cfg([str(f) for f in shard_files],
                                                      S3Config()))
    loader, keys, images = _read_all(_eval_cfg(urls, S3Config(
        endpoint_url=moto_server.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]), workers=2))
    assert len(keys) == 160
    assert sorted(keys) == sorted(local_keys)
    order = [local_keys.index(k) for k in keys]
    assert torch.equal(images, local_images[order])
    assert not loader.stats.skipped


def test_endpoint_and_credentials_from_aws_env(moto_server, shard_files, aws_env,
                                               monkeypatch):
    urls = moto_server.upload("fromenv", shard_files[:1])
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    _, keys, _ = _read_all(_eval_cfg(urls, S3Config()))
    assert len(keys) == 40


def test_missing_object_is_an_unreadable_shard(moto_server, shard_files, aws_env):
    urls = moto_server.upload("partial", shard_files[:1])
    cfg = _eval_cfg(urls + ["s3://partial/nope.tar"],
                    S3Config(endpoint_url=moto_server.endpoint, retries=1, backoff=0.01))
    loader, keys, _ = _read_all(cfg)
    assert len(keys) == 40
    assert loader.stats.skipped == {"unreadable_shard": 1}


def test_server_restart_mid_stream_is_retried_and_reading_continues(shard_files, aws_env,
                                                                    tmp_path):
    server = MotoServer()
    server.start()
    try:
        urls = server.upload("flaky", shard_files)
        # small blocks: the rest of each shard is fetched after the outage, not before
        s3 = S3Config(endpoint_url=server.endpoint, retries=8, backoff=0.25, max_backoff=2.0,
                      block_size=8192, connect_timeout=2, read_timeout=5)
        loader = build_loader(_eval_cfg(urls, s3), 0, 1, train=False)
        keys: list[str] = []
        restarted = threading.Event()

        def restart() -> None:
            time.sleep(3.0)  # longer than botocore/s3fs retry internally
            server.start()
            server.upload("flaky", shard_files)  # moto forgot everything
            restarted.set()

        for i, batch in enumerate(loader):
            keys += batch["keys"]
            if i == 2:
                server.stop()
                thread = threading.Thread(target=restart, daemon=True)
                thread.start()
        thread.join(timeout=60)
        assert restarted.is_set()
        _, local_keys, _ = _read_all(_eval_cfg([str(f) for f in shard_files], S3Config()))
        assert keys == local_keys
        assert not loader.stats.skipped
        assert loader.stats.events["shard_retries"] >= 1
    finally:
        server.stop()
