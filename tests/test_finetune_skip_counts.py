"""The unreadable training items a fine-tuning run replaced reach metrics.jsonl.

Segmentation, detection and classification's map-style sets (an image folder, shards held
in memory) read the next item in place of one that exists but cannot be read
(``finetune.data_files.NextReadable``). Each replacement used to be counted only in
the log line of the DataLoader worker that made it (two workers here); now each batch
carries its count out of the worker and every training record from the first replacement
on holds the run's total, ``skipped: {"unreadable": N}`` (the field a streamed
classification set logs its skips in, by reason), summed over ranks and kept across a
resume.

The sets here hold two consecutive unreadable images at indices 3 and 4: a draw of item 3
replaces two (3 and 4, read 5), a draw of item 4 one, so a whole epoch replaces exactly
three, whatever the shuffle (every item is drawn once an epoch: the batch divides the
set).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.demo_data import write_shapes_ade, write_shapes_coco

PER_EPOCH = 3  # items 3 and 4 unreadable: 2 + 1 replaced per epoch
# 8 images, batch 2: 4 steps an epoch; records at steps 1 and every 4th
COMMON = ["run.batch_size=2", "run.num_workers=2", "run.log_every=4", "run.progress=false",
          "run.tensorboard=false", "optim.warmup_steps=0", "run.eval_every=0"]
SEG = ["data.kind=ade20k", "data.num_classes=4", "data.scale_short=32",
       "data.crop_size=[32,32]", "data.test_short=32", "eval.crop=[32,32]",
       "eval.stride=[32,32]", "head_channels=16"]
DET = ["detector.train_sizes=[32]", "detector.test_size=32", "detector.max_size=32"]


def _truncate(path: Path) -> None:
    """Cut an image file to half its bytes (a download cut short): it opens, then fails."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _training_records(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _train(task: str, root: Path, out: Path, steps: int, resume: str | None = None) -> None:
    from launch.config import load_config

    if task == "classification":
        from finetune.classification import ClassificationConfig as Config
        from finetune.classification import train
        extra = ["data.kind=imagefolder", f"data.root={root}", "data.num_classes=2"]
    elif task == "segmentation":
        from finetune.segmentation import SegmentationConfig as Config
        from finetune.segmentation import train
        extra = [*SEG, f"data.root={root}"]
    else:
        from finetune.detection import DetectionConfig as Config
        from finetune.detection import train
        extra = [*DET, "data.kind=coco", f"data.root={root}", "data.train_images=train",
                 "data.val_images=val", "data.train_ann=annotations/instances_train.json",
                 "data.val_ann=annotations/instances_val.json"]
    cfg = load_config(Config, None, [*COMMON, *extra, f"run.max_steps={steps}"])
    train(cfg, out, resume=resume)


def _dataset(task: str, root: Path) -> list[Path]:
    """Write a tiny set of 8 training and 2 validation images under ``root``; its training
    images in index order (sorted by name, as the datasets list them)."""
    if task == "classification":  # an ImageNet-layout folder: two classes, 4 + 1 each
        from PIL import Image

        gen = torch.Generator().manual_seed(0)
        for split, per_class in (("train", 4), ("val", 1)):
            for c in ("a", "b"):
                (root / split / c).mkdir(parents=True)
                for k in range(per_class):
                    pixels = torch.randint(256, (32, 32, 3), generator=gen, dtype=torch.uint8)
                    Image.fromarray(pixels.numpy()).save(root / split / c / f"{k}.png")
        return sorted((root / "train").glob("*/*.png"))
    if task == "segmentation":
        write_shapes_ade(root, 8, 2, 32)
        return sorted((root / "images" / "training").iterdir())
    write_shapes_coco(root, 8, 2, 32)
    return sorted((root / "train").iterdir())


def test_segmentation_counts_replaced_items_over_workers_and_a_resume(tmp_path):
    root, out = tmp_path / "data", tmp_path / "run"
    for path in _dataset("segmentation", root)[3:5]:
        _truncate(path)
    _train("segmentation", root, out, steps=6)  # saved at step 6, inside epoch 1
    assert _training_records(out)[4]["skipped"] == {"unreadable": PER_EPOCH}
    # the resume loads epoch 1's first two batches again to skip them (their replacements
    # are in the saved total: not counted again) and goes on from the total it holds
    _train("segmentation", root, out, steps=8, resume="auto")
    records = _training_records(out)
    assert records[4]["skipped"] == {"unreadable": PER_EPOCH}
    assert records[8]["skipped"] == {"unreadable": 2 * PER_EPOCH}


def _two_equal_ranks(values, length):
    """runtime.dist.sum_over_ranks (under runtime.dist.sum_counts) over two ranks that
    counted the same."""
    return None if values is None else [2 * v for v in values]


def test_detection_counts_replaced_items_summed_over_ranks(tmp_path, monkeypatch):
    """Two ranks that replaced the same items, as the loop's all-reduce sums them: the
    record holds their sum (one process here: the sum is the only place ranks meet)."""
    import runtime.dist

    monkeypatch.setattr(runtime.dist, "sum_over_ranks", _two_equal_ranks)
    root, out = tmp_path / "data", tmp_path / "run"
    for path in _dataset("detection", root)[3:5]:
        _truncate(path)
    _train("detection", root, out, steps=4)
    assert _training_records(out)[4]["skipped"] == {"unreadable": 2 * PER_EPOCH}


def test_classification_counts_replaced_images_over_workers_ranks_and_a_resume(
        tmp_path, monkeypatch):
    """An image folder (map-style): its unreadable images used to be replaced with no
    count in the records at all (only the streamed set logged ``skipped``). Two ranks that
    replaced the same images, as the loop's all-reduce sums them (doubled): the records hold
    their sum, and the resume goes on from the saved total without counting again the
    batches it loads only to skip them."""
    import runtime.dist

    monkeypatch.setattr(runtime.dist, "sum_over_ranks", _two_equal_ranks)
    root, out = tmp_path / "data", tmp_path / "run"
    images = _dataset("classification", root)
    assert [p.relative_to(root / "train").as_posix() for p in images[3:5]] == [
        "a/3.png", "b/0.png"]  # ImageFolder's indices 3 and 4
    for path in images[3:5]:
        _truncate(path)
    _train("classification", root, out, steps=6)  # saved at step 6, inside epoch 1
    records = _training_records(out)
    assert records[4]["skipped"] == {"unreadable": 2 * PER_EPOCH}
    _train("classification", root, out, steps=8, resume="auto")
    records = _training_records(out)
    assert records[4]["skipped"] == {"unreadable": 2 * PER_EPOCH}
    assert records[8]["skipped"] == {"unreadable": 2 * 2 * PER_EPOCH}


def test_the_skipped_field_is_absent_until_something_was_skipped_in_every_kind_of_set(
        monkeypatch):
    """Detection, segmentation and a map-style classification set log no ``skipped``
    before the first skip; a streamed classification set logged ``skipped: {}`` in every
    record instead. Now each record's field (``finetune.skip_counts.SkipCounts``) follows
    the one rule, the streamed set keeps its counts by reason, and only rank 0, which
    writes the records, receives the counts."""
    from collections import Counter

    import runtime.dist
    from finetune.skip_counts import SkipCounts

    stream_counts: Counter[str] = Counter()
    streamed = SkipCounts(stream=lambda: stream_counts)
    assert streamed.record() == {} and streamed.state() == {}
    stream_counts["undecodable_image"] += 1  # what its workers report
    assert streamed.record() == {"skipped": {"undecodable_image": 1}}
    assert streamed.state() == {}  # the stream position carries it across a resume

    in_memory = SkipCounts()
    assert in_memory.record() == {}
    assert in_memory.state() == {"skipped": {}}
    resumed = SkipCounts(before={"unreadable": 2})
    assert resumed.record() == {"skipped": {"unreadable": 2}}
    assert list(resumed.counted([("batch", 1), ("next", 0)])) == ["batch", "next"]
    assert resumed.state() == {"skipped": {"unreadable": 3}}
    # a rank other than 0: no field, the state not its to write
    monkeypatch.setattr(runtime.dist, "global_rank", lambda: 1)
    assert resumed.record() == {} and resumed.state() == {"skipped": {}}
    # a reason outside finetune.skip_counts.REASONS on some rank: every rank gathers
    monkeypatch.setattr(runtime.dist, "global_rank", lambda: 0)
    monkeypatch.setattr(runtime.dist, "gather_objects", lambda obj: [obj, {"a_new_reason": 4}])
    stream_counts["a_new_reason"] += 1
    assert streamed.record() == {"skipped": {"a_new_reason": 5, "undecodable_image": 1}}


def _shard(path: Path, samples: list[tuple[bytes, str]]) -> str:
    """A webdataset shard: sample ``i`` holds ``i.png`` and its ``cls`` label."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, (image, label) in enumerate(samples):
            for name, data in ((f"{i:06d}.png", image), (f"{i:06d}.cls", label.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = torch.randint(256, (32, 32, 3), generator=torch.Generator().manual_seed(seed),
                           dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def test_in_memory_shards_log_their_load_skips_beside_replaced_images_across_a_resume(
        tmp_path):
    """Shards held in memory drop the samples whose label lies outside the classes as they
    load (a CUDA device assert in the loss otherwise); that count reached the log only.
    Now the records hold it by reason beside the replaced images, and a resume, whose set
    loads and counts them again, does not count them twice. The set: 10 samples, labels
    -1 and 99999 outside [0, 2), so 8 trained on (batch 2: 4 steps an epoch); the kept
    sample at index 3 is a truncated PNG, replaced by the next once an epoch."""
    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config

    labels = ["0", "1", "-1", "0", "1", "99999", "0", "1", "0", "1"]
    images = [_png(i) for i in range(len(labels))]
    images[4] = images[4][:len(images[4]) // 2]  # the 4th kept sample (index 3 once loaded)
    train_url = _shard(tmp_path / "train.tar", list(zip(images, labels, strict=True)))
    val_url = _shard(tmp_path / "val.tar", [(_png(100), "0"), (_png(101), "1")])
    out = tmp_path / "run"

    def run(steps: int, resume: str | None = None) -> dict[int, dict]:
        cfg = load_config(ClassificationConfig, None, [
            *COMMON, "data.kind=shards", f"data.train_urls=[{train_url}]",
            f"data.val_urls=[{val_url}]", "data.num_classes=2", f"run.max_steps={steps}"])
        train(cfg, out, resume=resume)
        return _training_records(out)

    records = run(6)  # saved at step 6, inside epoch 1
    assert records[1].get("skipped", {}).get("label_out_of_range") == 2  # from the start
    assert records[4]["skipped"] == {"label_out_of_range": 2, "unreadable": 1}
    records = run(8, resume="auto")
    assert records[8]["skipped"] == {"label_out_of_range": 2, "unreadable": 2}
