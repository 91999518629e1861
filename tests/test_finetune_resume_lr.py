"""A resumed classification run trains with the optimizer settings of its own config.

``--resume`` with another ``optim.lr`` (or ``min_lr``, ``weight_decay``, ``layer_decay``,
``dcn_lr_mult``, ``betas``) used to go on with the checkpoint's values while config.yaml
recorded the new ones: DeepSpeed's ``load_checkpoint`` restores the optimizer's param
groups whole (their ``lr``, ``initial_lr``, ``lr_scale``, ``weight_decay``, ``betas``), and
timm's scheduler, built after it, took its base lr from the restored ``initial_lr``
(``group.setdefault``) and each group's scale from the restored ``lr_scale``. Now the
resumed run continues the schedule's position at the values a fresh run of the new
config has, and keeps the checkpoint's AdamW moments.

The unchanged-config resume reproducing the uninterrupted run step by step is
tests/test_finetune_resume.py (classification, 2 ranks, kill -9).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# the digits demo, 2 images a step, 4 steps with a checkpoint at step 2; the warm-up (3
# steps) overlays the cosine, so the resumed steps are one in the warm-up and one after it
COMMON = ["run.batch_size=2", "run.num_workers=0", "run.threads=1", "run.max_steps=4",
          "run.checkpoint_every=2", "run.log_every=1", "run.eval_every=0",
          "run.progress=false", "run.tensorboard=false", "ema.enabled=false",
          "optim.warmup_steps=3", "optim.layer_decay=0.9"]
# every optimizer setting the config derives the param groups from, changed; a DCN
# multiplier above 1 makes the scaled groups' lr the logged (largest) one
CHANGED = ["optim.lr=0.004", "optim.min_lr=1e-5", "optim.weight_decay=0.1",
           "optim.layer_decay=0.8", "optim.dcn_lr_mult=2.0", "optim.betas=[0.8,0.99]"]
SETTINGS = ("initial_lr", "lr_scale", "weight_decay", "betas")


class _Killed(Exception):
    """The run ended after a step (a node failure), its checkpoint written."""


def _train(cache: Path, out: Path, extra: list[str], monkeypatch, resume: str | None = None,
           kill_after: int | None = None) -> dict:
    """Run classification in this process; what its scheduler was built over: each
    group's settings and the AdamW step counts the optimizer held then."""
    import finetune.cls_build
    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config
    from runtime import preemption

    built: dict = {}
    # the function itself, not an earlier call's recording (monkeypatch undoes at the end)
    build_scheduler = getattr(finetune.cls_build.build_scheduler, "original",
                              finetune.cls_build.build_scheduler)

    def recording(optimizer, *args, **kwargs):
        scheduler = build_scheduler(optimizer, *args, **kwargs)
        built["groups"] = [{k: g[k] for k in SETTINGS} for g in optimizer.param_groups]
        built["steps"] = {int(s["step"]) for s in optimizer.state.values()}
        return scheduler

    recording.original = build_scheduler
    def kill_point(step: int) -> None:
        if step == kill_after:
            raise _Killed(step)

    monkeypatch.setattr(finetune.cls_build, "build_scheduler", recording)
    monkeypatch.setattr(preemption, "kill_point", kill_point)
    cfg = load_config(ClassificationConfig, None, [*COMMON, f"data.cache_dir={cache}", *extra])
    train(cfg, out, resume=resume)
    return built


def _lrs(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


@pytest.mark.parametrize("stage", [0, 3])
def test_a_resume_with_changed_optimizer_settings_trains_with_them(stage, cache, tmp_path,
                                                                   monkeypatch):
    import torch

    zero = [f"run.zero_stage={stage}"]
    threads = torch.get_num_threads()
    try:
        fresh = _train(cache, tmp_path / "fresh", [*zero, *CHANGED], monkeypatch)
        out = tmp_path / "run"
        with pytest.raises(_Killed):
            _train(cache, out, zero, monkeypatch, kill_after=2)
        resumed = _train(cache, out, [*zero, *CHANGED], monkeypatch, resume="auto")
    finally:
        torch.set_num_threads(threads)
    want, got = _lrs(tmp_path / "fresh"), _lrs(out)
    assert sorted(got) == [1, 2, 3, 4]
    # after the resume: the lr a fresh run of the new config logs at the same step (the
    # checkpoint's settings gave 3.0e-4 at step 3 where this config gives 1.18e-3)
    assert got[3] == pytest.approx(want[3], rel=1e-12)
    assert got[4] == pytest.approx(want[4], rel=1e-12)
    # every group trains at the new config's base lr, scale, weight decay and betas...
    assert resumed["groups"] == fresh["groups"]
    # ... with the AdamW moments of the checkpoint's 2 steps (a fresh run has none yet)
    assert resumed["steps"] == {2} and fresh["steps"] == set()


# the segmentation demo shrunk (tests/test_finetune_resume.py's), 4 steps, a checkpoint at 2
SEG = ["data.demo_train=8", "data.demo_val=2", "data.demo_size=64", "data.scale_short=64",
       "data.crop_size=[48,48]", "data.test_short=64", "eval.crop=[48,48]",
       "eval.stride=[32,32]", "run.batch_size=2", "run.num_workers=0", "head_channels=16",
       "run.threads=1", "run.max_steps=4", "run.checkpoint_every=2", "run.log_every=1",
       "run.eval_every=4", "run.progress=false", "run.tensorboard=false",
       "optim.warmup_steps=3", "optim.layer_decay=0.9"]


def test_a_resumed_segmentation_run_trains_with_its_configs_group_settings(
        cache, tmp_path, monkeypatch):
    """Segmentation (as detection: finetune/loop.py) builds its scheduler before the engine,
    so a changed ``optim.lr`` did apply, but the restored groups kept the checkpoint's
    ``lr_scale`` (layer decay, DCN multiplier), ``weight_decay`` and ``betas``."""
    import torch

    import finetune.loop
    from finetune.segmentation import SegmentationConfig, train
    from launch.config import load_config
    from runtime import preemption

    start_engine = finetune.loop.start_engine
    seen: dict[str, list] = {}

    def train_once(out: Path, extra: list[str], resume: str | None = None,
                   kill_after: int | None = None) -> list[dict]:
        def recording(net, optimizer, *args, **kwargs):  # the groups the loop trains with
            started = start_engine(net, optimizer, *args, **kwargs)
            seen["groups"] = [{k: g[k] for k in SETTINGS} for g in optimizer.param_groups]
            return started

        def kill_point(step: int) -> None:
            if step == kill_after:
                raise _Killed(step)

        monkeypatch.setattr(finetune.loop, "start_engine", recording)
        monkeypatch.setattr(preemption, "kill_point", kill_point)
        cfg = load_config(SegmentationConfig, None,
                          [*SEG, f"data.cache_dir={cache}", *extra])
        train(cfg, out, resume=resume)
        return seen["groups"]

    threads = torch.get_num_threads()
    try:
        fresh = train_once(tmp_path / "fresh", CHANGED)
        with pytest.raises(_Killed):
            train_once(tmp_path / "run", [], kill_after=2)
        resumed = train_once(tmp_path / "run", CHANGED, resume="auto")
    finally:
        torch.set_num_threads(threads)
    assert resumed == fresh
    want, got = _lrs(tmp_path / "fresh"), _lrs(tmp_path / "run")
    assert got[3] == pytest.approx(want[3], rel=1e-12)
    assert got[4] == pytest.approx(want[4], rel=1e-12)
