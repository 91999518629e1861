"""Fine-tuning resume is exact: kill -9 on 2 ranks (gloo, CPU), then `--resume auto`, and
metrics.jsonl reads as the uninterrupted run, step by step, for classification, detection
and segmentation; data-loader workers draw different augmentations on each rank.

The kill comes from inside: ``INTERNIMAGE_KILL_AFTER_STEP=5`` makes every rank SIGKILL
itself at the end of step 5, after the checkpoint of step 3 (``run.checkpoint_every=3``),
so steps 4 and 5 are in metrics.jsonl and must be dropped and trained again. Every
checkpoint lands mid-epoch, so the resumed run must also skip exactly the batches of the
epoch already trained.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import pytest
import torch

from runtime.preemption import KILL_AFTER_STEP_ENV
from tests.rank_launcher import run_cli

pytestmark = [pytest.mark.distributed]

COMMON = ["run.max_steps=6", "run.eval_every=3", "run.checkpoint_every=3", "run.log_every=1",
          "run.progress=false", "optim.warmup_steps=0"]
TASKS = {
    # digits demo; one data-loader worker per rank: augmentations drawn in the workers.
    # One evaluation, at the end (its 270 images, raw and EMA weights, are most of a step)
    "classification": ["run.batch_size=16", "run.num_workers=1", "run.eval_every=6"],
    # 16 images, 4 per batch on 2 ranks: 2 batches per epoch, so step 3 is mid-epoch
    "detection": ["data.demo_train=16", "data.demo_val=4", "data.demo_size=64",
                  "run.batch_size=4", "detector.train_sizes=[64]", "detector.test_size=64",
                  "detector.max_size=64", "run.num_workers=0"],
    "segmentation": ["data.demo_train=16", "data.demo_val=3", "data.demo_size=64",
                     "data.scale_short=64", "data.crop_size=[48,48]", "data.test_short=64",
                     "eval.crop=[48,48]", "eval.stride=[32,32]", "run.batch_size=4",
                     "run.num_workers=0", "head_channels=32"],
}
# (task, overrides): every task as above, and gradient accumulation (run.grad_accum): 2
# micro-batches of 2 per rank per step, so 2 steps an epoch and the checkpoint of step 3
# lands after the first step of epoch 1 -- the resume must skip 2 micro-batches of it
CASES = {**{task: (task, []) for task in TASKS},
         "segmentation-grad_accum-2": ("segmentation",
                                       ["run.batch_size=2", "run.grad_accum=2"]),
         # the digits shards streamed (data.kind=stream), 4 steps an epoch: the checkpoint
         # of step 3 is mid-epoch, steps 5 and 6 are in epoch 1; the stream's position and
         # augmentation draws come from the checkpoint's saved stream state
         "classification-stream": ("classification", ["data.kind=stream",
                                                      "data.train_samples=128"])}


def _stream_urls(cache: Path) -> list[str]:
    """The digits demo's shards as a streamed set's ``data.train_urls``/``val_urls``."""
    from data.demo import demo_source_urls, ensure_demo_shards

    manifest = ensure_demo_shards(cache, 32)
    return [f"data.train_urls={json.dumps(demo_source_urls(manifest, 'train'))}",
            f"data.val_urls={json.dumps(demo_source_urls(manifest, 'val'))}"]


def _argv(task: str, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["finetune", task, "--output-dir", str(out), *COMMON, *TASKS[task],
            f"data.cache_dir={cache}", *extra]


def _saved_step(out: Path) -> int:
    """The step of the checkpoint ``--resume auto`` would take: every task runs on DeepSpeed,
    whose ``latest`` names the complete tag directory (DeepSpeed's own convention, read by
    its ``load_checkpoint``)."""
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    return json.loads((ckpts / tag / "trainer_state.json").read_text())["step"]


def _records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock stamps (the only field that may differ)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.mark.parametrize("case", list(CASES))
def test_kill_9_then_resume_auto_logs_every_step_as_the_uninterrupted_run(case, cache,
                                                                          tmp_path):
    task, extra = CASES[case]
    if "data.kind=stream" in extra:
        extra = [*extra, *_stream_urls(cache)]
    reference = tmp_path / "uninterrupted"
    assert run_cli(_argv(task, reference, cache, *extra)) == [0, 0]

    out = tmp_path / "killed"
    codes = run_cli(_argv(task, out, cache, *extra), env={KILL_AFTER_STEP_ENV: "5"})
    assert codes == [-9, -9]  # multiprocessing: -N for a process ended by signal N
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4, 5]
    assert _saved_step(out) == 3

    assert run_cli(_argv(task, out, cache, *extra, "--resume", "auto")) == [0, 0]
    resumed, expected = _records(out), _records(reference)
    train_steps = [r["step"] for r in resumed if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 once, from the resumed run
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    for got, want in zip(resumed, expected, strict=True):
        assert got.keys() == want.keys(), got["step"]
        counts = {k for k, v in want.items() if isinstance(v, dict)}  # a stream's skips
        assert {k: got[k] for k in counts} == {k: want[k] for k in counts}, got["step"]
        assert ({k: v for k, v in got.items() if k not in counts}
                == pytest.approx({k: v for k, v in want.items() if k not in counts},
                                 rel=1e-6, abs=1e-7)), got["step"]
        # An exact resume evaluates bit-identical weights and statistics, so the
        # continuous validation losses (classification) match exactly: EMAs holding
        # rank-local BatchNorm statistics on ranks > 0 left them 7e-7 apart (within the
        # tolerance above) while a top-5 near-tie could flip.
        for key in ("val_loss", "val_loss_ema"):
            if key in want:
                assert got[key] == want[key], (got["step"], key)


class _DrawsInWorker(torch.utils.data.Dataset):
    """Every sample is a random draw made where the sample is loaded (the worker), as a
    random augmentation is; the index is ignored, so only the generators matter."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return torch.rand(4), 0


def test_loader_workers_draw_different_augmentations_per_rank_and_epoch():
    """torch seeds each DataLoader worker with ``base_seed + worker_id``, base_seed drawn
    from the loader's generator (torch.utils.data docs, "Randomness in multi-process data
    loading"): a generator seeded alike on every rank gives every rank the same draws."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_data import build_loaders
    from launch.config import load_config
    from runtime.dist import DistInfo

    cfg = load_config(ClassificationConfig, None, ["run.num_workers=1", "run.batch_size=8"])
    data = _DrawsInWorker()

    def first_batch(rank: int, epoch: int) -> torch.Tensor:
        train, _, _ = build_loaders(cfg, DistInfo(rank=rank, world_size=2), data, data, epoch)
        return next(iter(train)).batch[0]

    r0e0 = first_batch(0, 0)
    assert not torch.equal(r0e0, first_batch(1, 0))  # ranks: different augmentations
    assert not torch.equal(r0e0, first_batch(0, 1))  # epochs: different augmentations
    assert torch.equal(r0e0, first_batch(0, 0))  # reproducible: what exact resume needs


def test_a_stop_request_saves_at_the_step_boundary_and_the_run_resumes_from_it(cache, tmp_path):
    """What a launcher does on SLURM's USR2 (runtime.preemption.request_stop): the loop
    saves at the end of the running step and returns; `--resume auto` continues there."""
    from finetune.segmentation import SegmentationConfig, train
    from launch.config import load_config
    from runtime.preemption import STOP_REQUESTED, request_stop

    # one thread, as each rank above: several threads on a busy 2-core machine spin
    args = [*COMMON, *TASKS["segmentation"], f"data.cache_dir={cache}", "run.max_steps=3",
            "run.threads=1"]
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    request_stop()  # before the first step: it ends at step 1
    try:
        result = train(load_config(SegmentationConfig, None, args), out)
        STOP_REQUESTED.clear()
        assert result["stopped_early"] and result["step"] == 1
        # not a periodic checkpoint (every 3): saved on the request
        assert _saved_step(out) == 1
        train(load_config(SegmentationConfig, None, args), out, resume="auto")
    finally:
        STOP_REQUESTED.clear()
        torch.set_num_threads(threads)
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_an_evaluation_a_stop_skipped_is_run_first_by_the_resume(task, cache, tmp_path):
    """A stop at an evaluation step saves without evaluating; the checkpoint owes that
    evaluation (trainer_state ``eval_owed``) and the resumed run makes it up before
    training on, logged at that step. Classification builds its loaders with its first
    batches: the owed evaluation comes before them (it failed there with KeyError 'val',
    on every retry of the resume)."""
    from launch.config import load_config
    from runtime.preemption import STOP_REQUESTED, request_stop

    module = import_module(f"finetune.{task}")
    config = {"classification": "ClassificationConfig",
              "segmentation": "SegmentationConfig"}[task]
    args = [*COMMON, *TASKS[task], f"data.cache_dir={cache}", "run.max_steps=2",
            "run.eval_every=1", "run.threads=1"]
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    request_stop()  # before the first step: it ends at step 1, an evaluation step
    try:
        result = module.train(load_config(getattr(module, config), None, args), out)
        STOP_REQUESTED.clear()
        assert result["stopped_early"] and result["step"] == 1
        step1 = out / "checkpoints" / "step_0000001" / "trainer_state.json"
        assert json.loads(step1.read_text())["eval_owed"] is True
        assert not any("loss" not in r for r in _records(out))  # nothing evaluated yet
        module.train(load_config(getattr(module, config), None, args), out, resume="auto")
    finally:
        STOP_REQUESTED.clear()
        torch.set_num_threads(threads)
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    evaluated = [r["step"] for r in records if "loss" not in r]
    assert evaluated == [1, 2]
