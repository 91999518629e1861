"""Streaming classification shards (finetune/cls_stream.py): exact batch counts per rank,
one pass per epoch, fresh order per epoch, epochs that go on where the last stopped, exact
resume from the saved stream state (augmentations included), corrupt samples skipped and
counted across a resume, and training runs through the entrypoint on streamed shards."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def _labels(ds: StreamingShards, n: int) -> list[list[int]]:
    """The labels of the stream's next ``n`` batches."""
    batches = ds.batches()
    return [next(batches)[1].tolist() for _ in range(n)]


def _stream(urls: str, workers: int = 2, **kw) -> StreamingShards:
    kw = {"num_samples": 40, "batch_size": 4, "rank": 0, "world": 1} | kw
    return StreamingShards([urls], _to_tensor, workers=workers, **kw)


def test_an_epoch_is_one_pass_in_exact_batches_and_the_next_reshuffles(tmp_path):
    urls = _write_shards(tmp_path)
    ds = _stream(urls, shuffle_buffer=8)
    assert ds.batches_per_epoch == 10
    epoch0 = _labels(ds, 10)
    assert len(epoch0) == 10 and all(len(b) == 4 for b in epoch0)
    assert sorted(sum(epoch0, [])) == list(range(40))  # every sample exactly once
    epoch1 = _labels(ds, 10)  # the stream goes on: the next data epoch, reshuffled
    assert sorted(sum(epoch1, [])) == list(range(40)) and epoch1 != epoch0
    assert _labels(_stream(urls, shuffle_buffer=8), 10) == epoch0  # reproducible


@pytest.mark.parametrize("n_shards", [5, 7])
def test_epochs_go_on_where_the_last_stopped_so_no_sample_falls_behind(tmp_path, n_shards):
    # 5 (7) shards over 2 worker slots: a data epoch deals one slot a shard more than the
    # other. Restarting both slots at data epoch e in training epoch e (this module's old
    # rule) left the end of the larger share unread and read the next epoch's start
    # twice: after 8 epochs samples were read 5..11 times. Going on where the last epoch
    # stopped, no sample is ever more than one read behind or ahead.
    urls = _write_shards(tmp_path, n_shards=n_shards, per_shard=8)
    ds = _stream(urls, num_samples=8 * n_shards, shuffle_buffer=8)
    epochs = 8
    counts = Counter(sum(_labels(ds, epochs * ds.batches_per_epoch), []))
    assert sum(counts.values()) == epochs * 8 * n_shards
    assert {counts[i] for i in range(8 * n_shards)} <= {epochs - 1, epochs, epochs + 1}


def _augmenting(img: Image.Image) -> torch.Tensor:
    """A transform drawing from python's, numpy's and torch's global generators, as
    timm's RandAugment, crops and erasing and torchvision's flips do."""
    return torch.tensor([float(np.asarray(img).mean()), random.random(),
                         float(np.random.rand()), float(torch.rand(()))])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_from_the_saved_state_delivers_the_uninterrupted_batches(tmp_path, workers):
    urls = _write_shards(tmp_path)

    def stream() -> StreamingShards:
        return StreamingShards([urls], _augmenting, num_samples=40, batch_size=4,
                               shuffle_buffer=8, workers=workers, rank=0, world=1)

    def take(ds: StreamingShards, n: int) -> list[torch.Tensor]:
        batches = ds.batches()
        return [torch.cat([x, y[:, None].float()], 1) for x, y in
                (next(batches) for _ in range(n))]

    full = take(stream(), 25)  # two and a half epochs
    # mid-epoch; at epoch 0's end (the next block opens with a sample read ahead); in
    # the block it opens; further on
    seen = set()  # (a block opened with a sample read ahead, samples of it handed out)
    for cut in (3, 10, 13, 17):
        first = stream()
        take(first, cut)
        seen |= {(p["lead"] is not None, p["emitted"] > 0)
                 for p in first.state_dict()["positions"].values()}
        resumed = stream()
        resumed.load_state_dict([first.state_dict()])
        rest = take(resumed, 25 - cut)
        for a, b in zip(rest, full[cut:], strict=True):  # labels and augmentation draws
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if workers:  # 2 slots of 20 samples a data epoch, blocks of 8: every kind of state
        assert seen == {(False, False), (False, True), (True, False), (True, True)}
    state = json.loads(json.dumps(first.state_dict()))  # it goes into trainer_state.json
    assert state["positions"] and len(json.dumps(state)) < 4000


def test_a_resume_with_another_worker_count_skips_no_sample(tmp_path, caplog):
    # run.num_workers changed between the save and the resume: the saved positions of the
    # 2 old slots are re-dealt over 1 new one (data.redeal); what the old workers had
    # handed out of their current shuffle blocks is read again (logged), nothing skipped
    urls = _write_shards(tmp_path, n_shards=6, per_shard=8)
    first = _stream(urls, num_samples=48, shuffle_buffer=4)
    before = sum(_labels(first, 5), [])
    resumed = _stream(urls, workers=1, num_samples=48, shuffle_buffer=4)
    with caplog.at_level("WARNING"):
        resumed.load_state_dict([first.state_dict()])
    # the old workers' blocks ended with their batches: nothing of them is repeated, and
    # the new worker's first 7 batches are exactly what they left of the data epoch
    after = sum(_labels(resumed, 7), [])
    assert sorted(before + after) == list(range(48))
    assert "re-dealt" in caplog.text and "0 samples repeated" in caplog.text


def test_a_resume_with_another_shuffle_buffer_finishes_the_saved_block_first(tmp_path):
    # data.shuffle_buffer changed between the save and the resume (8 -> 4): the block the
    # save was inside is filled to its saved size and permuted as before, so its rest comes
    # out as in the uninterrupted run; the new size holds from the next block on, and the
    # data epoch is read once (before: 2 samples repeated, 2 never read)
    urls = _write_shards(tmp_path)
    first = _stream(urls, workers=0, shuffle_buffer=8)
    before = _labels(first, 1)  # 4 samples of the first 8-sample block
    saved = first.state_dict()
    assert {p["emitted"] for p in saved["positions"].values()} == {4}
    rest_of_block = _labels(first, 1)
    resumed = _stream(urls, workers=0, shuffle_buffer=4)
    resumed.load_state_dict([saved])
    after = _labels(resumed, 9)
    assert after[0] == rest_of_block[0]
    assert sorted(sum(before + after, [])) == list(range(40))


def test_ranks_read_disjoint_slices_and_deliver_equal_batch_counts(tmp_path):
    # 2 ranks x 2 workers = 4 slots, one 8-sample shard each, 2 batches of 4 per slot
    urls = _write_shards(tmp_path, n_shards=4, per_shard=8)
    per_rank = [sum(_labels(_stream(urls, num_samples=32, rank=rank, world=2), 4), [])
                for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 16
    assert sorted(per_rank[0] + per_rank[1]) == list(range(32))


def test_corrupt_samples_are_skipped_counted_and_batches_stay_full(tmp_path, caplog):
    ds = _stream(_write_shards(tmp_path, corrupt=5), workers=0)
    with caplog.at_level("WARNING"):  # 40 samples: the first data epoch's 39 and one more
        batches = _labels(ds, 10)
    assert all(len(b) == 4 for b in batches)
    assert 5 not in sum(batches, [])
    assert "undecodable_image" in caplog.text and "1 skipped" in caplog.text
    assert ds.stats.skipped == {"undecodable_image": 1}
    resumed = _stream(_write_shards(tmp_path, corrupt=5), workers=0)
    resumed.load_state_dict([ds.state_dict()])
    assert resumed.stats.skipped == {"undecodable_image": 1}  # counts go on after a resume


def test_a_shard_of_bad_samples_is_counted_whole_but_logged_in_a_few_lines(tmp_path, caplog):
    """A shard whose first 120 labels are outside the classes (a wrong label file): every
    sample is counted by reason, but the worker logs only its first skips and then a line
    at 100, not one line per sample (10k lines per epoch and worker on a real shard)."""
    from finetune.cls_stream import SKIPS_LOGGED_EACH

    url = _labelled_shard(tmp_path / "bad.tar", ["7"] * 120 + ["0", "1", "2", "3"])
    stream = _stream(url, workers=0, num_samples=4, shuffle_buffer=1, num_classes=4)
    with caplog.at_level("WARNING", logger="finetune.cls_stream"):
        (labels,) = _labels(stream, 1)
    assert sorted(labels) == [0, 1, 2, 3]
    assert stream.stats.skipped == {"label_out_of_range": 120}
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == SKIPS_LOGGED_EACH + 1, lines
    assert "label 7 outside [0, 4)" in lines[0] and "bad.tar" in lines[0]
    assert lines[-1].startswith("100 samples skipped by this worker")


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


def test_classification_trains_on_streamed_shards_and_resumes(tmp_path, capsys):
    from finetune.classification import ClassificationConfig, train
    from launch.cli import main
    from launch.config import ConfigError, load_config

    # an exact resume (the same losses as the uninterrupted run) on 2 ranks after kill -9:
    # tests/test_finetune_resume.py, case classification-stream
    urls = _write_shards(tmp_path / "shards", n_shards=4, per_shard=16)
    args = _stream_args(urls, urls, steps=5, log_every=1)
    out = tmp_path / "run"
    result = train(load_config(ClassificationConfig, None, args), out)
    assert 0 <= result["top1"] <= 1
    train(load_config(ClassificationConfig, None, [*args, "run.max_steps=12"]), out,
          resume="auto")  # resumes inside epoch 0 (8 batches per epoch), then epoch 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    rank_file = out / "checkpoints" / "step_0000012" / "rank_states" / "00000.json"
    assert json.loads(rank_file.read_text())["data"]["positions"] != {}
    # a shard list that changed since the checkpoint: refused before the model is built,
    # the run's config.yaml kept; data.on_shard_list_change=restart goes on afresh
    fewer = [*_stream_args(urls.replace("0003", "0002"), urls, 5, 1), "run.max_steps=13"]
    (out / "config.yaml").write_text("the run's own\n")
    assert main(["finetune", "classification", "--output-dir", str(out), "--resume", "auto",
                 *fewer]) == 2
    assert "on_shard_list_change=restart" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "the run's own\n"
    train(load_config(ClassificationConfig, None,
                      [*fewer, "data.on_shard_list_change=restart"]), out, resume="auto")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 13
    with pytest.raises(ConfigError, match="data.train_samples"):
        load_config(ClassificationConfig, None, [a for a in args if "train_samples" not in a])


def test_fewer_shards_than_slots_still_reads_every_sample_once_per_epoch(tmp_path):
    # Issue #14's rule for epochs without replacement: every shard is read exactly once per
    # epoch whatever the slot count; a source with fewer shards than slots is split so that
    # several slots read disjoint samples of one shard. 2 shards, 2 ranks x 2 workers.
    urls = _write_shards(tmp_path, n_shards=2, per_shard=16)
    streams = [_stream(urls, num_samples=32, rank=rank, world=2) for rank in (0, 1)]
    for epoch in (0, 1):
        seen = sum((sum(_labels(ds, 4), []) for ds in streams), [])
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
    stream = _stream(url, workers=0, num_samples=4, shuffle_buffer=1, num_classes=4)
    with caplog.at_level("WARNING"):
        (labels,) = _labels(stream, 1)
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


@pytest.mark.parametrize("workers, reads_all", [(0, False), (2, True)])
def test_a_streamed_resume_reads_its_own_rank_file_unless_the_workers_changed(
        tmp_path, workers, reads_all):
    """3 ranks saved their stream positions (workers=0); rank 1 resumes on 3 ranks. With
    the same worker count it reads its own rank file alone (every rank used to read every
    rank's: 7.8 GB across a 512-rank job); with another worker count every rank's, which
    the re-deal needs. Either way it delivers what a stream built from every position
    delivers."""
    import runtime.checkpoint as ck
    from finetune.engine import FinetuneRun
    from finetune.zero import DATA_KEY, _restore_stream
    from runtime.dist import DistInfo

    urls = _write_shards(tmp_path, n_shards=6, per_shard=8)
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    for rank in range(3):
        ds = _stream(urls, workers=0, num_samples=48, rank=rank, world=3)
        _labels(ds, 2 + rank)
        ck.write_rank_state(ckpt, rank, {"rng": {}, DATA_KEY: ds.state_dict()})
    ck.write_trainer_state(ckpt, {"step": 2, "world_size": 3, ck.RANK_STATES: 3})
    states = [json.loads(ck.rank_state_path(ckpt, r).read_text())[DATA_KEY]
              for r in range(3)]
    run = FinetuneRun(tmp_path, ckpt, ck.load_trainer_state(ckpt))
    read: list[str] = []
    real = Path.read_text

    def spy(path, *args, **kwargs):
        read.append(Path(path).name)
        return real(path, *args, **kwargs)

    resumed = _stream(urls, workers=workers, num_samples=48, rank=1, world=3)
    Path.read_text = spy
    try:
        _restore_stream(resumed, run, steps_per_epoch=4, d=DistInfo(rank=1, world_size=3))
    finally:
        Path.read_text = real
    assert set(read) == ({"00000.json", "00001.json", "00002.json"} if reads_all
                         else {"00001.json"})
    expected = _stream(urls, workers=workers, num_samples=48, rank=1, world=3)
    expected.load_state_dict(states)
    assert _labels(resumed, 3) == _labels(expected, 3)


def test_a_worker_out_of_memory_is_not_counted_as_an_undecodable_image(monkeypatch):
    """Streamed classification's decode: a MemoryError is the worker's, not the sample's
    (it was counted undecodable_image, sample after sample); a damaged image still is."""
    import finetune.cls_stream as cls_stream
    from data.stats import SkipCounter

    codec = cls_stream.LabelledCodec(lambda img: img)
    raw = {"__key__": "k", "__url__": "x.tar", "jpg": b"\xff\xd8 not really", "cls": b"3"}
    counter = SkipCounter()
    assert codec.decode(0, raw, random.Random(0), counter) is None  # damaged: skipped
    assert [(name, n) for kind, _, name, n in counter.drain() if kind == "skip"] == [
        ("undecodable_image", 1)]

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cls_stream.Image, "open", out_of_memory)
    with pytest.raises(MemoryError):
        codec.decode(0, raw, random.Random(0), SkipCounter())
