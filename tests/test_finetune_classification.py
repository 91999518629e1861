"""Classification fine-tuning on the digits demo shards: loss falls, metrics, resume; every
real config validates with --dry-run (the layer-wise lr decay groups:
tests/test_param_groups.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from runtime.run_lock import LOCK_NAME

# whole DeepSpeed training runs (the suite's long files run first, tests/conftest.py)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["run.batch_size=32", "run.max_steps=6", "run.eval_every=6", "run.log_every=1",
        "run.num_workers=0", "run.progress=false", "optim.warmup_steps=0"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_loss_falls_metrics_and_resume(cache, tmp_path):
    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, [*TINY, f"data.cache_dir={cache}"])
    out = tmp_path / "run"
    result = train(cfg, out)
    assert {"top1", "top5", "top1_ema"} <= set(result)
    # started from Python, the run lets go of its directory when train() returns: a lock
    # left held kept a heartbeat thread that, once the folder went, asked the next run
    # in this process to stop (runtime/run_lock.py releasing)
    assert not (out / LOCK_NAME).exists()
    recs = _records(out)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]
    assert sum("top1" in r for r in recs) == 1
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in recs if "top1" in r)

    cfg = load_config(ClassificationConfig, None,
                      [*TINY, f"data.cache_dir={cache}", "run.max_steps=8"])
    train(cfg, out, resume="auto")
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # continued from step 6, nothing repeated
    # DeepSpeed's convention: `latest` names the tag of the last complete checkpoint
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000008"


def test_mixup_randaugment_path_runs(cache, tmp_path):
    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, [
        *TINY, f"data.cache_dir={cache}", "run.max_steps=2", "run.eval_every=2",
        "aug.mixup=0.8", "aug.cutmix=1.0", "aug.re_prob=0.25", "optim.layer_decay=0.8"])
    assert "top1_ema" in train(cfg, tmp_path / "mix")


def test_warmup_epochs_and_cosine_over_the_whole_run():
    """optim.warmup_epochs counts in epochs of the actual run; as in the released InternImage
    code the cosine spans the whole run with the warm-up laid over its start, so the last
    step reaches min_lr."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier, build_optimizer, build_scheduler
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None,
                      ["optim.warmup_epochs=2", "optim.lr=1e-3", "optim.min_lr=1e-5"])
    opt = build_optimizer(build_classifier(cfg), cfg, world_size=1)
    sched = build_scheduler(opt, cfg, total_steps=100, steps_per_epoch=10, world_size=1)

    def lr(step: int) -> float:
        sched.step_update(step)
        return max(g["lr"] for g in opt.param_groups)

    assert lr(0) == pytest.approx(1e-6)                       # ramp from lr x 1e-3
    assert lr(10) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # 20-step ramp, half-way
    cosine_at_20 = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 100))
    assert lr(20) == pytest.approx(cosine_at_20)
    assert lr(100) == pytest.approx(1e-5)
    assert cfg.optim.warmup(10) == 20
    cfg = load_config(ClassificationConfig, None, ["optim.warmup_steps=7"])
    assert cfg.optim.warmup(10) == 7                          # no warmup_epochs: steps


def _entrypoint_configs() -> list[Path]:
    """Every preset, Mask2Former and DINO (``head`` section) included."""
    return sorted((REPO / "configs" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("config", _entrypoint_configs(), ids=lambda p: p.stem)
def test_real_configs_dry_run(config, capsys):
    import yaml

    from launch.cli import main

    task = ("classification" if config.stem.startswith(("cls_", "classification"))
            else "detection" if config.stem.startswith(("det_", "detection"))
            else "segmentation")
    extra = []
    init = (yaml.safe_load(config.read_text()) or {}).get("init")
    if init and init.startswith("runs/"):  # a stage-2 preset: stage 1's output is not here
        extra = ["init=null"]
    assert main(["finetune", task, "--config", str(config), "--dry-run", *extra]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out
    memory = re.search(r"memory per GPU +~([0-9.]+) GiB = states ([0-9.]+) \(([^)]*)\)"
                       r"(?: \+ ZeRO buffers ([0-9.]+))? \+ activations ([0-9.]+)", out)
    assert memory, out
    total, states, buffers, activations = (float(memory[i] or 0) for i in (1, 2, 4, 5))
    # an EMA under ZeRO is assembled whole at an evaluation or a save, in the activations'
    # place (finetune/memory.py): the larger of the two is counted
    assembled = re.search(r"assembles the EMA: ([0-9.]+) in their place", out)
    peak = max(activations, float(assembled[1])) if assembled else activations
    assert states > 0 and activations > 0 and total == pytest.approx(
        states + buffers + peak, abs=0.02)
    # under ZeRO, DeepSpeed's gradient-reduction buffers (and ZeRO-3's gathered model)
    zero = yaml.safe_load(config.read_text()).get("run", {}).get("zero_stage", 0)
    assert (buffers > 0) == bool(zero) and (f"ZeRO-{zero}" in memory[3]) == bool(zero)


def test_bad_config_fails_before_compute(capsys):
    from launch.cli import main

    assert main(["finetune", "classification", "--dry-run", "optim.layer_decay=2"]) == 2
    assert "optim.layer_decay" in capsys.readouterr().err
    assert main(["finetune", "segmentation", "--dry-run", "data.kind=voc"]) == 2
    assert "data.kind" in capsys.readouterr().err
    assert main(["finetune", "detection", "--init", "/nonexistent.pth", "--dry-run"]) == 2


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_validation_image_is_counted_once_on_any_rank_count(world_size):
    """top-1 is a fraction of the validation set (ImageNet-1k: exactly 50,000 images).
    torch's DistributedSampler pads the ranks' shares to equal length by repeating
    images (its ``drop_last=False`` docs), so a padded split counts some twice; 10
    images do not divide among 3 or 4 ranks."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_data import build_loaders
    from launch.config import load_config
    from runtime.dist import DistInfo

    cfg = load_config(ClassificationConfig, None, ["run.num_workers=0", "run.batch_size=1"])
    images = [(i, 0) for i in range(10)]  # the item is its own index
    seen = []
    for rank in range(world_size):
        _, val, _ = build_loaders(cfg, DistInfo(rank=rank, world_size=world_size), images,
                                  images)
        seen += [int(i) for batch, _ in val for i in batch]
    assert sorted(seen) == list(range(10))


class _TwoUnreadable(torch.utils.data.Dataset):
    """Six samples (the value is the index, the label the index too); 2 and 3 raise what
    PIL raises on a truncated file."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        if i in (2, 3):
            raise OSError("image file is truncated (4 bytes not processed)")
        return torch.tensor([float(i)]), i


def test_a_small_damaged_training_set_tries_each_sample_once(caplog):
    # every task's rule (finetune.data_files.NextReadable): sixteen unreadable samples in a
    # row end the run, or every sample once when the set holds fewer; it used to cycle a
    # three-sample set sixteen times, logging the same files again and again
    from finetune.cls_data import SkipUnreadable

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise OSError(f"image file {i} is truncated")

    data = SkipUnreadable(Broken(), substitute=True)
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="3 consecutive"):
        data[1]
    assert [r.getMessage().split(" skipped")[0] for r in caplog.records] == [
        f"data: training sample {j}" for j in (1, 2, 0)]


def test_unreadable_images_are_replaced_in_training_and_left_out_of_evaluation(caplog):
    """A corrupt image never ends a run: in training the next readable sample takes its
    place (batches keep their size, as every rank must), in evaluation it is left out of
    the metrics and the count is logged (the guide: corrupt samples skipped and counted)."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_data import build_loaders
    from finetune.zero import evaluate
    from launch.config import load_config
    from runtime.dist import DistInfo

    cfg = load_config(ClassificationConfig, None, ["run.num_workers=0", "run.batch_size=3"])
    data = _TwoUnreadable()
    train, val, _ = build_loaders(cfg, DistInfo(), data, data)
    batches = list(train)
    drawn = sorted(int(v) for b in batches for v in b.batch[0].flatten())
    assert drawn == [0, 1, 4, 4, 4, 5]
    # each batch carries its count of failed reads (what metrics.jsonl's skipped sums):
    # index 2 tries 2 and 3 before reading 4, index 3 tries 3 before reading 4
    assert sum(b.replaced for b in batches) == 3

    class Onehot(torch.nn.Module):  # predicts the class equal to the input value
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten().long(), 6).float()

    with caplog.at_level("WARNING"):
        result = evaluate(Onehot(), val, DistInfo(), torch.float32, img_size=8)
    assert result["top1"] == 1.0  # over the 4 readable images, all right
    assert "2 validation images unreadable" in caplog.text
