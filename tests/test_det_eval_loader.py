"""The detection evaluation reads its validation items through a DataLoader with
``run.num_workers`` loader processes, as training reads its items, so the images are
decoded while the model runs (before: ``val_set[i]`` one after the other in the
evaluating process, ~45 ms a 1200 x 800 JPEG the model waited for). The batches each
rank's model sees are those it saw before (its ``rank_share``, in order, ``run.batch_size``
at a time, the last one shorter), so the scores do not depend on ``run.num_workers``, and
an image that cannot be read still ends the evaluation with an error naming it."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.test_finetune_det_images import _cfg, _coco


class Boxer(nn.Module):
    """A stand-in detector: one box per image around its coloured pixels (the demo's
    shapes on a grey ground), of the class of their dominant channel (the demo's hues:
    red, green, blue), its score the image's mean; records the batches it is given."""

    def __init__(self):
        super().__init__()
        self.transform = SimpleNamespace(min_size=(64,))  # what evaluate() sets
        self.batches: list[list[torch.Tensor]] = []

    def forward(self, images):
        self.batches.append([img.clone() for img in images])
        out = []
        for img in images:
            colour = nn.functional.avg_pool2d((img.amax(0) - img.amin(0))[None], 5, 1, 2)[0]
            shape = colour > 0.3
            ys, xs = torch.nonzero(shape, as_tuple=True)
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 1, 1]
            label = int(img[:, shape].mean(1).argmax()) + 1 if len(xs) else 1
            out.append({"boxes": torch.tensor([box], dtype=torch.float32),
                        "labels": torch.tensor([label]), "scores": img.mean().reshape(1)})
        return out


def _demo(cache, *overrides: str):
    from finetune.det_config import DetectionConfig
    from finetune.det_data import build_val_set
    from launch.config import load_config

    cfg = load_config(DetectionConfig, None, [
        f"data.cache_dir={cache}", "data.demo_train=16", "data.demo_val=7",
        "data.demo_size=64", "head.kind=dino", "head.test_size=64", "run.batch_size=3",
        *overrides])
    return cfg, build_val_set(cfg)


def _old_batches(val_set, rank: int = 0, world: int = 1, batch_size: int = 3):
    """The batches the evaluation gave the model before: ``val_set[i]`` over this rank's
    share, ``batch_size`` at a time."""
    indices = range(rank, len(val_set), world)
    return [[val_set[i] for i in indices[s:s + batch_size]]
            for s in range(0, len(indices), batch_size)]


def _same_batches(got: list[list[torch.Tensor]], want: list[list]) -> None:
    assert [len(b) for b in got] == [len(b) for b in want]
    for batch, ref in zip(got, want):
        assert all(torch.equal(img, img_ref) for img, (img_ref, _) in zip(batch, ref))


def test_scores_and_batches_do_not_depend_on_the_loader_workers(cache):
    from finetune.det_eval import evaluate
    from runtime.dist import DistInfo

    scores = {}
    for workers in (0, 2):
        cfg, val_set = _demo(cache, f"run.num_workers={workers}")
        model = Boxer()
        scores[workers] = evaluate(model, val_set, cfg, DistInfo())
        _same_batches(model.batches, _old_batches(val_set))  # 3, 3, 1 images
        assert model.training  # given back in training mode
    assert scores[2] == scores[0]
    assert scores[0]["bbox_AP50"] > 0  # some box matched: a meaningful compare


def test_each_ranks_batches_are_its_share_in_order(cache):
    from finetune.det_eval import val_batches
    from runtime.dist import DistInfo

    cfg, val_set = _demo(cache, "run.num_workers=2", "run.batch_size=2")
    for rank in (0, 1):  # 7 images: rank 0 holds 4 (2 batches), rank 1 3 (2 batches)
        got = list(val_batches(val_set, cfg, DistInfo(rank=rank, world_size=2)))
        want = _old_batches(val_set, rank, 2, batch_size=2)
        _same_batches([[img for img, _ in b] for b in got], want)
        assert [[t["image_id"] for _, t in b] for b in got] == \
            [[t["image_id"] for _, t in b] for b in want]


def test_the_items_are_read_in_the_loader_workers(cache, tmp_path, monkeypatch):
    """run.num_workers=2: no image is decoded in the evaluating process; 0: all are."""
    from finetune import det_data
    from finetune.det_eval import evaluate
    from runtime.dist import DistInfo
    from tests.reader_pids import log_reader_pids

    log = tmp_path / "pids"
    log_reader_pids(monkeypatch, det_data, "read_image", log)
    for workers in (2, 0):
        log.unlink(missing_ok=True)
        cfg, val_set = _demo(cache, f"run.num_workers={workers}")
        evaluate(Boxer(), val_set, cfg, DistInfo())
        pids = log.read_text().split()
        assert len(pids) == len(val_set)
        assert (str(os.getpid()) in pids) == (workers == 0), (workers, pids)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_val_image_ends_the_evaluation_naming_it(tmp_path, workers):
    """Its own message, whichever process read it (not torch's ``Caught ... in DataLoader
    worker process`` text around the worker's traceback)."""
    from finetune.data_files import UnreadableFile
    from finetune.det_data import build_val_set
    from finetune.det_eval import evaluate
    from runtime.dist import DistInfo

    root = _coco(tmp_path / "coco")
    truncated = root / "val2017" / "sub" / "v2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    cfg = _cfg(root, "run.batch_size=1", f"run.num_workers={workers}", "head.kind=dino",
               "head.test_size=64")
    model = Boxer()
    with pytest.raises(UnreadableFile) as err:
        evaluate(model, build_val_set(cfg), cfg, DistInfo())
    assert re.fullmatch(rf"cannot read image {re.escape(str(truncated))} \(.+\)", str(err.value))
    assert len(model.batches) == 1  # the readable image before it was evaluated
