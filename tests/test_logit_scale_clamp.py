"""The learnable temperature is clamped as a parameter after each step, not in the forward.

open_clip clamps ``logit_scale`` to [0, ln 100] in place after every optimizer step (open_clip
3.3.0, src/open_clip_train/train.py). A clamp of exp(logit_scale) in the forward instead
has gradient 0 past the bound, so a temperature once driven there never comes back (Adam's
momentum even keeps pushing it up). Under DeepSpeed the fp32 master and the 16-bit copies
the forward reads must all be clamped, on every rank: ``pretrain.engine.clamp_logit_scale``.

Run as a script (``python tests/test_logit_scale_clamp.py OUT_DIR``) this file is one rank:
for each DeepSpeed set-up in RUNS, one after the other in the same process group, a tiny
model in bf16 whose loss is -scale for some steps (the scale wants to grow past 100) and
then +scale (it wants to shrink). (One pair of processes for the three set-ups, not three
pairs at once: six processes on two cores contended; every engine is built from its own
config, seed and data as before. The fixture forks the two ranks from
tests/rank_launcher.py's forkserver, run_file_function: no fresh interpreter's imports.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.channels=8", "model.depths=[1,1,1,1]", "model.groups=[1,1,1,1]",
             "model.dcn_backend=reference", "model.embed_dim=16", "text.width=16",
             "text.heads=2", "text.layers=1", "engine.precision=bf16", "data.batch_size=2",
             "optim.lr=0.05", "optim.min_lr=0.05", "optim.warmup_steps=0",
             "optim.weight_decay=0", "objective.init_temperature=0.0102"]  # scale 98
# Steps that push the scale up, then down. Adam at lr 0.05 moves ln(scale) ~0.05 a step:
# the first step reaches ln 100 from ln 98, the next two sit on it, and Adam's momentum
# keeps it there for two of the down steps; the other eight bring the forward's scale to
# 82 and the master 0.21 below ln 100 (measured), with a forward clamp it stays at 100.
# (Was 6 + 14, ending at ~77 and 0.26: the same outcome, and each ZeRO-3 step costs
# ~0.3 s of DeepSpeed's per-module hooks here: 7 saved per set-up, two of them ZeRO-3.)
UP, DOWN = 3, 10
# (ZeRO stage, whether ZeRO-3 keeps the 1-element parameter gathered between steps)
# (stage 0: DeepSpeed's FP16_UnfusedOptimizer keeps the fp32 masters, bf16 as fp16)
RUNS = [(3, True), (3, False), (2, True), (0, False)]


def _rank_main(out_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    from runtime.dist import init_distributed

    info = init_distributed()
    for stage, persist in RUNS:
        _run(out_dir, stage, persist, info.rank)


def _run(out_dir: str, stage: int, persist: bool, rank: int) -> None:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import build_engine, build_model, clamp_logit_scale

    def read_master() -> float:  # DeepSpeed's fp32 copy, where each set-up keeps it
        if stage == 0:  # deepspeed/runtime/fp16/unfused_optimizer.py
            opt = engine.optimizer
            return next(float(hp) for lows, highs in zip(opt.fp16_groups, opt.fp32_groups)
                        for lp, hp in zip(lows, highs) if lp is engine.module.logit_scale)
        return float(safe_get_full_fp32_param(engine.module.logit_scale))

    threshold = 100_000 if persist else 0
    cfg = load_config(PretrainConfig, DEMO_CONFIG, [
        *OVERRIDES, f"engine.zero_stage={stage}",
        f"engine.param_persistence_threshold={threshold}"])
    engine, _ = build_engine(cfg, build_model(cfg, num_tags=10), steps=100)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    tokens = torch.randint(0, cfg.text.vocab_size, (2, cfg.data.context_length))
    clamp_logit_scale(engine, cfg.objective.max_logit_scale)  # as the trainer's start does
    forward, master = [], [read_master()]
    for step in range(UP + DOWN + 1):
        image, text, tags, scale = engine(images, tokens)
        forward.append(float(scale))
        if step == UP + DOWN:
            break
        sign = -1.0 if step < UP else 1.0
        unused = image.float().sum() + text.float().sum() + tags.float().sum()
        engine.backward(sign * scale.float().sum() + 0.0 * unused)
        engine.step()
        clamp_logit_scale(engine, cfg.objective.max_logit_scale)
        master.append(read_master())
    Path(out_dir, f"{stage}_{persist}_rank{rank}.json").write_text(
        json.dumps({"forward": forward, "master": master}))
    engine.destroy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple, list[dict]]:
    from tests.rank_launcher import run_file_function

    out = tmp_path_factory.mktemp("logit_scale")
    run_file_function(__file__, "_rank_main", 2, str(out), timeout=240)
    return {run: [json.loads((out / f"{run[0]}_{run[1]}_rank{r}.json").read_text())
                  for r in range(2)] for run in RUNS}


@pytest.mark.distributed
def test_scale_reaches_the_bound_and_comes_back(runs):
    bound = math.log(100.0)
    for run, ranks in runs.items():
        for r in ranks:
            assert r == ranks[0], run  # every rank reads and holds the same values
            # the fp32 master never passes ln 100 and sits on it while pushed up
            assert max(r["master"]) <= bound + 1e-6, run
            assert r["master"][UP] == pytest.approx(bound, abs=1e-6), run
            # every forward's scale is exp of the fp32 master (open_clip's fp32 parameter),
            # not of the bf16 copy: 100 at the bound, where bf16 rounds ln 100 to 4.594
            # (98.9), and not on bf16's ~3% grid either way
            assert r["forward"] == pytest.approx([math.exp(m) for m in r["master"]],
                                                 rel=1e-6), run
            assert r["forward"][UP] == pytest.approx(100.0, rel=1e-6), run
            # pushed down, it comes back (a forward clamp left it at 100 for good)
            assert r["forward"][-1] < 90.0, (run, r["forward"])
            assert r["master"][-1] < bound - 0.1, run


if __name__ == "__main__":
    _rank_main(sys.argv[1])
