"""--init with an ImageNet-22K classifier into an ImageNet-1K one keeps the 1K classes' rows
of its head, as the released fine-tuning does (OpenGVLab/InternImage
classification/utils.py ``load_pretrained``: with TRAIN.RAND_INIT_FT_HEAD off, its default
and what the L/XL 22kto1k configs use, a 21841-class head becomes
``head.weight[map22kto1k]`` / ``head.bias[map22kto1k]`` from meta_data/map22kto1k.txt)."""

from __future__ import annotations

import torch

from finetune.init import imagenet22k_to_1k_rows, load_init
from models import build_model

TINY = {"channels": 16, "depths": (1, 1, 2, 1), "groups": (1, 2, 4, 8)}


def _classifier(num_classes: int) -> torch.nn.Module:
    return build_model("internimage_t", num_classes=num_classes, **TINY)


def test_the_map_is_the_released_one():
    rows = imagenet22k_to_1k_rows()
    assert rows.shape == (1000,) and int(rows.min()) >= 0 and int(rows.max()) < 21841
    # the released file's first and last entries: n01440764 (tench, 1K class 0) is row 359
    # of the sorted 21841 wnids (meta_data/22k_class_to_idx.json); its last line is 21815
    assert rows[:3].tolist() == [359, 368, 460] and int(rows[-1]) == 21815
    # the 22K set lacks n04399382 (teddy bear, 1K class 850): the release maps it to the
    # teapot's row (class 849); every other class has a row of its own
    assert int(rows[850]) == int(rows[849]) == 11136 and len(set(rows.tolist())) == 999


def test_a_22k_head_keeps_its_1k_rows(tmp_path):
    src = _classifier(21841)
    with torch.no_grad():
        src.head.bias.normal_()
    path = tmp_path / "internimage_t_22k.pth"
    torch.save({"model": src.state_dict()}, path)  # the released .pth layout
    model = _classifier(1000)
    report = load_init(model, path, variant="internimage_t")
    assert not report.dropped and not report.missing
    rows = imagenet22k_to_1k_rows()
    torch.testing.assert_close(model.head.weight, src.head.weight[rows], rtol=0, atol=0)
    torch.testing.assert_close(model.head.bias, src.head.bias[rows], rtol=0, atol=0)


def test_another_class_count_still_starts_a_fresh_head(tmp_path):
    path = tmp_path / "ten.pth"
    torch.save({"model": _classifier(10).state_dict()}, path)
    model = _classifier(1000)
    before = model.head.weight.detach().clone()
    report = load_init(model, path, variant="internimage_t")
    assert report.dropped == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, before)
