"""Streaming classification shards (finetune/cls_stream.py): exact batch counts per rank,
one pass per epoch, fresh order per epoch, exact mid-epoch resume, corrupt samples skipped,
and a training run through the entrypoint on streamed shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from finetune.cls_stream import StreamingShards

# whole DeepSpeed training runs (the suite's long files run first, tests/conftest.py)
pytestmark = pytest.mark.slow


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shards(root: Path, n_shards: int = 4, per_shard: int = 10,
                  corrupt: int | None = None) -> str:
    """Shards of samples labelled by their global index (``cls``); ``corrupt``: that
    sample's image is garbage."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                idx = s * per_shard + j
                members = {"jpg": b"not a jpeg" if idx == corrupt else _jpeg(idx),
                           "cls": str(idx).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{idx:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{0000..{n_shards - 1:04d}}}.tar")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def _labels(ds: StreamingShards, epoch: int, skip: int = 0, workers: int = 2) -> list[list[int]]:
    ds.set_epoch(epoch, skip)
    loader = DataLoader(ds, batch_size=ds.batch_size, num_workers=workers, drop_last=True,
                        collate_fn=StreamingShards.collate)
    return [labels.tolist() for _, labels, _ in loader]


def test_an_epoch_is_one_pass_in_exact_batches_and_epochs_reshuffle(tmp_path):
    urls = _write_shards(tmp_path)
    ds = StreamingShards([urls], _to_tensor, num_samples=40, batch_size=4, shuffle_buffer=8)
    assert ds.batches_per_epoch == 10
    epoch0 = _labels(ds, 0)
    assert len(epoch0) == 10 and all(len(b) == 4 for b in epoch0)
    assert sorted(sum(epoch0, [])) == list(range(40))  # every sample exactly once
    epoch1 = _labels(ds, 1)
    assert sorted(sum(epoch1, [])) == list(range(40)) and epoch1 != epoch0
    assert _labels(ds, 0) == epoch0  # a function of (seed, epoch): reproducible


def test_mid_epoch_resume_continues_with_the_same_batches(tmp_path):
    ds = StreamingShards([_write_shards(tmp_path)], _to_tensor, num_samples=40, batch_size=4)
    full = _labels(ds, 2)
    for skip in (3, 4, 7):
        assert _labels(ds, 2, skip) == full[skip:], skip
    assert _labels(ds, 2, 5, workers=1) == _labels(ds, 2, 0, workers=1)[5:]


def test_ranks_read_disjoint_slices_and_deliver_equal_batch_counts(tmp_path):
    # 2 ranks x 2 workers = 4 slots, one 8-sample shard each, 2 batches of 4 per slot
    urls = _write_shards(tmp_path, n_shards=4, per_shard=8)
    per_rank = []
    for rank in (0, 1):
        ds = StreamingShards([urls], _to_tensor, num_samples=32, batch_size=4)
        ds.rank, ds.world = rank, 2
        per_rank.append(sum(_labels(ds, 0), []))
    assert len(per_rank[0]) == len(per_rank[1]) == 16
    assert sorted(per_rank[0] + per_rank[1]) == list(range(32))


def test_corrupt_samples_are_skipped_counted_and_batches_stay_full(tmp_path, caplog):
    ds = StreamingShards([_write_shards(tmp_path, corrupt=5)], _to_tensor, num_samples=36,
                         batch_size=4)
    with caplog.at_level("WARNING"):
        batches = _labels(ds, 0, workers=0)
    assert len(batches) == 9 and all(len(b) == 4 for b in batches)
    assert 5 not in sum(batches, [])
    assert "undecodable_image" in caplog.text and "1 skipped" in caplog.text


def test_bad_settings_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="no shards"):
        StreamingShards([], _to_tensor, num_samples=40, batch_size=4)
    with pytest.raises(ValueError, match="train_samples"):
        StreamingShards([_write_shards(tmp_path)], _to_tensor, num_samples=2, batch_size=4)


def _stream_args(train_urls: str, val_urls: str, steps: int, log_every: int) -> list[str]:
    """Overrides of a small streamed classification run (64 classes of 16 px images,
    one 64-sample epoch = 8 steps of 8), evaluated at its last step."""
    return ["data.kind=stream", f"data.train_urls={json.dumps([train_urls])}",
            f"data.val_urls={json.dumps([val_urls])}",
            "data.train_samples=64", "data.num_classes=64", "data.img_size=16",
            "run.batch_size=8", f"run.max_steps={steps}", f"run.eval_every={steps}",
            f"run.log_every={log_every}", "run.num_workers=2", "run.progress=false",
            "optim.warmup_steps=0", "ema.enabled=false"]


def test_classification_trains_on_streamed_shards_and_resumes(tmp_path):
    from finetune.classification import ClassificationConfig, train
    from launch.config import ConfigError, load_config

    urls = _write_shards(tmp_path / "shards", n_shards=4, per_shard=16)
    args = _stream_args(urls, urls, steps=5, log_every=1)
    out = tmp_path / "run"
    result = train(load_config(ClassificationConfig, None, args), out)
    assert 0 <= result["top1"] <= 1
    train(load_config(ClassificationConfig, None, [*args, "run.max_steps=12"]), out,
          resume="auto")  # resumes inside epoch 0 (8 batches per epoch), then epoch 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    with pytest.raises(ConfigError, match="data.train_samples"):
        load_config(ClassificationConfig, None, [a for a in args if "train_samples" not in a])


def test_fewer_shards_than_slots_still_reads_every_sample_once_per_epoch(tmp_path):
    # Issue #14's rule for epochs without replacement: every shard is read exactly once per
    # epoch whatever the slot count; a source with fewer shards than slots is split so that
    # several slots read disjoint samples of one shard. 2 shards, 2 ranks x 2 workers.
    urls = _write_shards(tmp_path, n_shards=2, per_shard=16)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            ds = StreamingShards([urls], _to_tensor, num_samples=32, batch_size=4)
            ds.rank, ds.world = rank, 2
            seen += sum(_labels(ds, epoch), [])
        assert sorted(seen) == list(range(32)), epoch


def _labelled_shard(path: Path, labels: list[str]) -> str:
    """One shard, sample ``i`` an 8x8 JPEG with ``cls`` member ``labels[i]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            for ext, data in (("jpg", _jpeg(i)), ("cls", label.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


# 4 classes; -1 and 99999 would index outside the logits (a CUDA device assert in the loss)
LABELS = ["0", "-1", "1", "99999", "2", "3", "4", "1"]


def test_labels_outside_the_classes_are_skipped_counted_and_logged(tmp_path, caplog):
    from finetune.cls_data import ShardDataset

    url = _labelled_shard(tmp_path / "s.tar", LABELS)
    with caplog.at_level("WARNING"):
        ds = ShardDataset([url], _to_tensor, num_classes=4)
    assert sorted(label for _, label in ds.items) == [0, 1, 1, 2, 3]
    assert ds.skipped == 3 and ds.skipped_by_reason == {"label_out_of_range": 3}
    assert "s.tar" in caplog.text and "outside [0, 4)" in caplog.text
    caplog.clear()
    stream = StreamingShards([url], _to_tensor, num_samples=4, batch_size=4, shuffle_buffer=1,
                             num_classes=4)
    with caplog.at_level("WARNING"):
        (labels,) = _labels(stream, 0, workers=0)
    assert sorted(labels) == [0, 1, 2, 3]  # the first four in range; the loss gets no other
    assert "label -1 outside [0, 4)" in caplog.text and "label 99999 outside" in caplog.text
    assert "s.tar" in caplog.text


def test_streamed_skips_and_shard_damage_reach_the_training_metrics(tmp_path):
    # what pre-training logs as "skipped": here a corrupt image (shard 0, sample 5) and a
    # shard cut inside its sample 10's label (shard 3: 10 of 16 samples read, 1 counted lost)
    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config

    urls = _write_shards(tmp_path / "shards", n_shards=4, per_shard=16, corrupt=5)
    cut = tmp_path / "shards" / "shard-0003.tar"
    with tarfile.open(cut) as tar:
        label = tar.getmember(f"{3 * 16 + 10:06d}.cls")
    cut.write_bytes(cut.read_bytes()[:label.offset_data])
    args = _stream_args(urls, str(tmp_path / "shards" / "shard-0001.tar"), steps=8,
                        log_every=4)
    train(load_config(ClassificationConfig, None, args), tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["step"] == 8  # an epoch: every slot read its share of the shards
    skipped = last["skipped"]
    assert skipped["truncated_shard"] == 1 and skipped["lost_samples"] == 1
    assert skipped["undecodable_image"] >= 1  # once per read of it
