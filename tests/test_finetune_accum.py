"""Gradient accumulation in fine-tuning (``run.grad_accum``, issue #13).

The definition tested against is DeepSpeed's (docs, "gradient_accumulation_steps": the
number of micro-batches whose gradients are accumulated before one optimizer step, with
train_batch_size = micro_batch x gradient_accumulation_steps x GPUs; ``engine.backward``
scales each micro-batch loss by 1/gradient_accumulation_steps): ``grad_accum`` micro-batches
of ``b`` make one update equal to the update of one batch of ``accum x b`` -- for a model
without batch-dependent normalisation, up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# whole DeepSpeed training runs (the suite's long files run first, tests/conftest.py)
pytestmark = pytest.mark.slow

# the classification runs: no randomness inside the step (no drop path, Mixup or EMA, no
# RandAugment / random erasing), so that the only difference is how a batch is split
CLS = ["run.max_steps=3", "run.eval_every=3", "run.checkpoint_every=1", "run.log_every=1",
       "run.num_workers=0",
       "run.progress=false", "run.tensorboard=false", "run.threads=1",
       "optim.warmup_steps=1", "model.drop_path_rate=0", "ema.enabled=false",
       "aug.auto_augment=", "aug.re_prob=0",
       # The released InternImage classifiers end in conv_head = 1x1 conv + BatchNorm
       # (OpenGVLab/InternImage classification/models/intern_image.py), whose batch
       # statistics depend on the batch split; InternImage-H's CLIP-style attention-pooling
       # head has LayerNorms only, so the whole network is batch-independent.
       "model.name=internimage_h", "model.channels=16", "model.depths=[1,1,2,1]",
       "model.groups=[1,2,4,8]"]
# Biases added to every key of a softmax attention get an exact gradient of 0 (softmax is
# shift-invariant: softmax(q.k + q.b) = softmax(q.k), "Attention Is All You Need" eq. 1),
# so in fp32 they see rounding noise, which AdamW's per-parameter normalisation turns into
# updates that differ in sign between any two summation orders: compared apart.
KEY_BIASES = ("clip_projector.norm1_k.0.bias", "clip_projector.cross_dcn.k_bias")
SEG = ["data.demo_val=2", "data.demo_size=64", "data.scale_short=64",
       "data.crop_size=[48,48]", "data.test_short=64", "eval.crop=[48,48]",
       "eval.stride=[48,48]", "run.log_every=1", "run.num_workers=0", "run.progress=false",
       "run.tensorboard=false", "run.threads=1", "optim.warmup_steps=2", "head_channels=16"]


@pytest.fixture
def keep_threads():
    """``run.threads`` sets torch's global thread count: put it back for later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _train_records(out: Path) -> list[dict]:
    return [r for r in _records(out) if "loss" in r]


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_grad_accum_is_validated_and_in_the_dry_run_plan(task, capsys):
    """ARCHITECTURE.md's contract: a bad config fails before any compute with a message
    naming the key (exit status 2, as every other config error); the plan states the
    samples per optimizer step (DeepSpeed: micro-batch x gradient_accumulation_steps per
    GPU)."""
    from launch.cli import main

    assert main(["finetune", task, "--dry-run", "run.grad_accum=0"]) == 2
    assert "run.grad_accum: must be >= 1" in capsys.readouterr().err
    assert main(["finetune", task, "--dry-run", "run.batch_size=4", "run.grad_accum=3"]) == 0
    assert "12 per process per optimizer step" in capsys.readouterr().out


def test_classification_accumulated_steps_equal_the_large_batch_steps(cache, tmp_path,
                                                                      keep_threads):
    """Batch 8 x grad_accum 2 against batch 16 x grad_accum 1 on the same samples in the
    same order (one process; the sampler's permutation comes from the same generator):
    the same optimizer steps, lr, losses and final weights (DeepSpeed's definition above;
    fp32 rounding of the split mean only)."""
    from finetune.classification import ClassificationConfig, train
    from finetune.convert import read_source
    from launch.config import load_config

    runs = {}
    for name, batch, accum in (("accum", 8, 2), ("large", 16, 1)):
        out = tmp_path / name
        cfg = load_config(ClassificationConfig, None, [
            *CLS, f"data.cache_dir={cache}", f"run.batch_size={batch}",
            f"run.grad_accum={accum}"])
        train(cfg, out)
        runs[name] = out
    got, want = _train_records(runs["accum"]), _train_records(runs["large"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        assert g["lr"] == w["lr"]  # one schedule step per optimizer step
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)  # mean of the two halves
    ds = json.loads((runs["accum"] / "deepspeed_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 8

    final = {name: read_source(out / "checkpoints" / "step_0000003")[0]
             for name, out in runs.items()}
    assert final["accum"].keys() == final["large"].keys()
    for key, value in final["large"].items():
        if key.endswith(KEY_BIASES):
            # exact gradient 0: both runs move them by rounding noise only (|w| ~ 1e-5)
            assert value.abs().max() < 1e-4 and final["accum"][key].abs().max() < 1e-4
            continue
        torch.testing.assert_close(final["accum"][key], value, rtol=1e-5, atol=1e-5,
                                   msg=key)
    # the tolerance is far below what one optimizer step changes (AdamW moves weights by
    # about lr), so a missed or extra update would fail above
    before, _ = read_source(runs["large"] / "checkpoints" / "step_0000002")
    assert max((final["large"][k] - v).abs().max().item() for k, v in before.items()) > 1e-4


def test_segmentation_accumulation_counts_optimizer_steps_and_drops_a_partial_group(
        cache, tmp_path, keep_threads):
    """18 images, 2 epochs: batch 2 x grad_accum 2 gives 9 micro-batches an epoch, so 4
    optimizer steps (the 9th micro-batch is dropped, as drop_last drops a short batch), the
    step count of batch 4 x grad_accum 1 (18 // 4); the lr schedule, the epoch of every
    step and the checkpoint land on the same steps. The losses and weights cannot be
    compared exactly: UperNet's head normalises with BatchNorm (released
    mmsegmentation UPerHead config, norm_cfg SyncBN), whose statistics are per micro-batch.
    """
    from finetune.segmentation import SegmentationConfig, train
    from launch.config import load_config

    runs = {}
    for name, batch, accum in (("accum", 2, 2), ("large", 4, 1)):
        out = tmp_path / name
        cfg = load_config(SegmentationConfig, None, [
            *SEG, f"data.cache_dir={cache}", "data.demo_train=18", "run.epochs=2",
            f"run.batch_size={batch}", f"run.grad_accum={accum}"])
        train(cfg, out)
        runs[name] = out
    got, want = _train_records(runs["accum"]), _train_records(runs["large"])
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [(r["step"], r["epoch"], r["lr"]) for r in got] == \
        [(r["step"], r["epoch"], r["lr"]) for r in want]
    assert [r["epoch"] for r in got] == [0] * 4 + [1] * 4
    for out in runs.values():
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    ds = json.loads((runs["accum"] / "deepspeed_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
