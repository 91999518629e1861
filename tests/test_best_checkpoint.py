"""The best evaluated checkpoint of a fine-tuning run is kept (runtime/best.py).

Fine-tuning kept its last 2 checkpoints only: a run whose top-1 peaked earlier lost those
weights, where the released code keeps them (classification/main.py saves
``ckpt_epoch_best.pth`` when acc1 beats ``max_accuracy``; the detection and segmentation
configs set ``evaluation = dict(save_best=...)``). Here the loop's own evaluations and
checkpoints (runtime/loop.py) with real saves and pruning (runtime/checkpoint.py), a
resume of the run, a rewind; then a real classification run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import runtime.checkpoint as ck
from runtime.best import BestCheckpoint
from runtime.dist import DistInfo
from runtime.loop import LoopPosition, LoopSpec, TaskHooks, run_loop
from runtime.metrics import MetricsLogger
from runtime.preemption import STOP_REQUESTED, request_stop
from tests.pretrain_utils import run_forked


class Engine:
    """DeepSpeed's layout of one rank's files (what runtime.checkpoint saves through)."""
    device = "cpu"  # where a rank's collectives put their tensors (DeepSpeedEngine.device)

    def zero_optimization(self) -> bool:
        return False

    def save_checkpoint(self, save_dir, tag, save_latest, client_state):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_text(tag)


def _train(root: Path, top1: dict[int, float], total: int, start: int = 0,
           keep_last: int = 1, checkpoint_every: int = 0,
           top1_ema: dict[int, float] | None = None, stop_at: int = 0,
           eval_owed: bool = False) -> list[int]:
    """Evaluate every step (top-1 from ``top1``; the EMA's from ``top1_ema``, whose best
    is kept too when given), checkpoint every ``checkpoint_every`` (0: the last step
    only); a stop requested during step ``stop_at``; from ``start`` owing its evaluation
    or not (``eval_owed``); the steps saved."""
    saved: list[int] = []
    steps = iter(range(start + 1, total + 1))
    current = [start]

    def train_step(batch):
        current[0] = next(steps)
        if current[0] == stop_at:
            request_stop()
        return {"loss": torch.tensor(1.0)}

    def save(pos: LoopPosition) -> None:
        saved.append(pos.step)
        ck.save_checkpoint(Engine(), root, pos.step, {}, {"step": pos.step}, DistInfo(),
                           keep_last)
        ck.wait_for_deletions(timeout=60)

    hooks = TaskHooks(batches=lambda epoch, skip: range(100), train_step=train_step,
                      evaluate=lambda: {"top1": top1[current[0]]} | (
                          {"top1_ema": top1_ema[current[0]]} if top1_ema else {}),
                      save=save)
    spec = LoopSpec(name="t", total_steps=total, eval_every=1,
                    checkpoint_every=checkpoint_every, log_every=1)
    metrics = MetricsLogger(root.parent, True, total, start, tensorboard=False,
                            progress=False)
    best = [BestCheckpoint.resume(root, "top1", start, is_main=True)]
    if top1_ema:
        best.append(BestCheckpoint.resume(root, "top1_ema", start, True, ck.BEST_EMA))
    try:
        run_loop(spec, hooks, LoopPosition(start, eval_owed=eval_owed), metrics=metrics,
                 d=DistInfo(), best=best)
    finally:
        STOP_REQUESTED.clear()
    return saved


def _best(root: Path, pointer: str = ck.BEST) -> dict:
    return json.loads((root / pointer).read_text())


def _killed_before_pointing_at(step: int, monkeypatch, train) -> None:
    """``train()`` dies (a BaseException, as a kill) once the checkpoint of ``step`` is
    saved, before a best's pointer names it alone."""
    class Killed(BaseException):
        pass

    real = BestCheckpoint.record

    def dying(self, at, result):
        if at == step:
            raise Killed
        real(self, at, result)

    monkeypatch.setattr(BestCheckpoint, "record", dying)
    with pytest.raises(Killed):
        train()
    monkeypatch.undo()


def _kept(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step_*"))


def test_an_evaluation_that_improves_is_saved_and_outlives_the_retention(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    top1 = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.20, 5: 0.45, 6: 0.10}
    # saved where an evaluation improved (1, 2) and at the last step; no other
    assert _train(root, top1, total=6) == [1, 2, 6]
    assert _best(root) == {"tag": "step_0000002", "step": 2, "metric": "top1",
                           "value": 0.50}
    assert _kept(root) == [2, 6]  # keep_last=1 and the best
    # a checkpoint due at an improving step is saved once
    root2 = tmp_path / "run2" / "checkpoints"
    assert _train(root2, top1, total=6, checkpoint_every=2, keep_last=2) == [1, 2, 4, 6]
    assert _best(root2)["step"] == 2 and _kept(root2) == [2, 4, 6]


def test_the_evaluation_a_stop_skipped_can_still_make_its_checkpoint_the_best(tmp_path):
    """A stop at step 3 saves without evaluating (runtime/loop.py); the resume evaluates
    step 3's checkpoint first, and its best top-1 names that checkpoint, which the later
    saves' pruning (keep_last=1) then keeps."""
    root = tmp_path / "run" / "checkpoints"
    top1 = {1: 0.30, 2: 0.50, 3: 0.90, 4: 0.20, 5: 0.45}
    assert _train(root, top1, total=5, stop_at=3) == [1, 2, 3]
    assert _best(root)["step"] == 2  # step 3 was not evaluated
    assert _train(root, top1, total=5, start=3, eval_owed=True) == [5]
    assert _best(root) == {"tag": "step_0000003", "step": 3, "metric": "top1",
                           "value": 0.90}
    assert _kept(root) == [3, 5]


def test_a_resume_keeps_the_best_so_far_and_a_rewind_forgets_an_abandoned_branchs(
        tmp_path):
    root = tmp_path / "run" / "checkpoints"
    top1 = {1: 0.30, 2: 0.50, 3: 0.40, 4: 0.20, 5: 0.45, 6: 0.10, 7: 0.48, 8: 0.60}
    _train(root, top1, total=6)
    # resumed at step 6 (its latest) and trained on: 0.48 at step 7 is no best
    assert _train(root, top1, total=8, start=6) == [8]
    # step 8's save pruned with the pointer still on step 2: that one goes at the next
    assert _best(root)["step"] == 8 and _kept(root) == [2, 8]
    pointer = _best(root)
    # a rewind to an earlier checkpoint: a best beyond it belongs to the abandoned branch
    assert BestCheckpoint.resume(root, "top1", 6, is_main=True).value is None
    # a start from nothing, or another metric's pointer, knows no best either
    assert BestCheckpoint.resume(root, "top1", 0, is_main=True).value is None
    assert BestCheckpoint.resume(root, "mIoU", 8, is_main=True).value is None
    # none of these starts has saved yet: the pointer is as it was (`latest` still names
    # the branch at step 8), so that branch's resume keeps its best
    assert _best(root) == pointer
    assert BestCheckpoint.resume(root, "top1", 8, is_main=True).value == 0.60


def test_a_rewound_start_that_ends_before_its_first_save_leaves_the_branchs_best(
        tmp_path, monkeypatch):
    """The reviewer's case: a rewind (`--resume .../step_1` of a run whose best is step
    2) dies before its first save; `latest` still names step 2's branch, and a resume of
    it must keep step 2 as its best (the rewind's start used to drop it from best.json
    at once, and prune then let step 2 go)."""
    root = tmp_path / "run" / "checkpoints"
    _train(root, {1: 0.3, 2: 0.9, 3: 0.5}, total=3, checkpoint_every=1)
    assert _best(root)["step"] == 2

    class Killed(BaseException):
        pass

    def dying(hooks, pos, metrics):
        raise Killed

    monkeypatch.setattr("runtime.loop._save", dying)
    with pytest.raises(Killed):  # evaluated (0.95 improves) and dies in its first save
        _train(root, {2: 0.95}, total=3, start=1, checkpoint_every=1)
    monkeypatch.undo()
    assert _best(root)["step"] == 2  # the abandoned branch's entry still current
    assert _train(root, {4: 0.1}, total=4, start=3, keep_last=1) == [4]
    # its own score: the rewind's pending 0.95 at step 2 named a save that never
    # happened, not the older checkpoint at that step
    assert (_best(root)["step"], _best(root)["value"]) == (2, 0.9) and _kept(root) == [2, 4]


def test_a_rewinds_abandoned_best_is_never_taken_for_a_new_checkpoint_at_its_step(
        tmp_path):
    """The reviewer's case: a best at step 2 (0.9); a rewind to step 1, whose run is
    stopped during step 2 (its evaluation skipped to save in time: step 2 saved, never
    evaluated); its resume took step 2 for the 0.9 best, kept it and let nothing worse
    than 0.9 replace it. The rewind's resume drops the abandoned branch's entry."""
    from runtime.preemption import STOP_REQUESTED

    root = tmp_path / "run" / "checkpoints"
    ema = {1: 0.1, 2: 0.8}
    _train(root, {1: 0.3, 2: 0.9}, total=2, top1_ema=ema)
    assert _best(root)["step"] == _best(root, ck.BEST_EMA)["step"] == 2
    STOP_REQUESTED.set()  # agreed at the end of the rewound run's first step, step 2
    try:
        assert _train(root, {2: 0.2}, total=3, start=1, top1_ema=ema) == [2]
    finally:
        STOP_REQUESTED.clear()
    assert _best(root)["tag"] is None and _best(root, ck.BEST_EMA)["tag"] is None
    assert _train(root, {3: 0.35}, total=3, start=2, top1_ema={3: 0.3}) == [3]
    assert (_best(root)["step"], _best(root)["value"]) == (3, 0.35)
    assert (_best(root, ck.BEST_EMA)["step"], _best(root, ck.BEST_EMA)["value"]) == (3, 0.3)


def test_a_kill_between_the_best_save_and_its_pointer_keeps_that_best(tmp_path,
                                                                       monkeypatch):
    """The save of an improving evaluation is published, then the job dies before the
    pointer names it: the requeued run must keep that checkpoint as its best (it is not
    evaluated again), not prune it as an ordinary one (the reviewer's case: 0.9 at step 4
    lost, 0.6 at step 5 recorded as best)."""
    root = tmp_path / "run" / "checkpoints"
    top1 = {1: 0.3, 2: 0.5, 3: 0.4, 4: 0.9, 5: 0.6, 6: 0.55, 7: 0.1, 8: 0.1}
    _killed_before_pointing_at(4, monkeypatch, lambda: _train(root, top1, total=8))
    assert ck.read_latest(root) == "step_0000004"
    _train(root, top1, total=8, start=4)
    assert _best(root) == {"tag": "step_0000004", "step": 4, "metric": "top1",
                           "value": 0.9}
    assert _kept(root) == [4, 8]


def test_the_emas_best_is_kept_beside_the_models(tmp_path, monkeypatch):
    """With an EMA the released classification/main.py keeps two bests: acc1's
    (``ckpt_epoch_best.pth``) and the EMA's (``ckpt_epoch_ema_best.pth``, by its own
    max_ema_accuracy). Their peaks at different steps: both checkpoints outlive the
    retention, each named by its pointer, through a kill between a save and the pointers
    (both pending at once) and a resume."""
    root = tmp_path / "run" / "checkpoints"
    top1 = {1: 0.3, 2: 0.6, 3: 0.4, 4: 0.7, 5: 0.2, 6: 0.1, 7: 0.1, 8: 0.1}
    ema = {1: 0.1, 2: 0.2, 3: 0.5, 4: 0.8, 5: 0.3, 6: 0.85, 7: 0.4, 8: 0.2}
    assert _train(root, top1, total=3, top1_ema=ema) == [1, 2, 3]
    assert (_best(root)["step"], _best(root, ck.BEST_EMA)["step"]) == (2, 3)
    assert _best(root, ck.BEST_EMA) == {"tag": "step_0000003", "step": 3,
                                        "metric": "top1_ema", "value": 0.5}
    assert _kept(root) == [2, 3]
    # step 4 improves both: both named pending, saved, then the job dies before the
    # pointers are written
    _killed_before_pointing_at(4, monkeypatch,
                               lambda: _train(root, top1, total=8, start=3, top1_ema=ema))
    assert _best(root)["pending"]["step"] == _best(root, ck.BEST_EMA)["pending"]["step"] == 4
    assert _kept(root) == [2, 3, 4]  # each current best, each pending one
    assert _train(root, top1, total=8, start=4, top1_ema=ema) == [6, 8]
    assert (_best(root)["step"], _best(root, ck.BEST_EMA)["step"]) == (4, 6)
    assert _kept(root) == [4, 6, 8]


def test_a_non_finite_or_missing_metric_is_never_best(tmp_path):
    best = BestCheckpoint(tmp_path, "top1", True)
    assert not best.improves({"top1": float("nan")}) and not best.improves({})
    assert best.improves({"top1": 0.0})


@pytest.mark.slow
def test_a_classification_run_keeps_its_best_evaluated_checkpoint(tmp_path, cache):
    """The demo with an EMA evaluated every step, checkpointed every 4, keeping 1: the
    checkpoints of the best top-1 and of the EMA's best top-1 are on disk, named by
    best.json and best_ema.json, whatever steps they were."""
    out = tmp_path / "run"
    run_forked([*_cls_cmd(out, cache), "run.max_steps=6", "run.eval_every=1",
                "run.checkpoint_every=4", "run.keep_last=1", "optim.lr=5e-2",
                "ema.enabled=true", "ema.decay=0.5"], cache)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    root = out / "checkpoints"
    wanted = set()
    for metric, pointer in (("top1", ck.BEST), ("top1_ema", ck.BEST_EMA)):
        scores = [(r[metric], -r["step"]) for r in rows if metric in r]
        want = -max(scores)[1]  # the first step of the highest score
        assert _best(root, pointer)["step"] == want, (metric, scores)
        assert _best(root, pointer)["value"] == max(scores)[0]
        assert (root / ck.tag_for(want) / ck.TRAINER_STATE).is_file()
        wanted.add(want)
    # the latest, the bests, and at most the previous bests (pruned at the next save)
    assert {6} | wanted <= set(_kept(root)) and len(_kept(root)) <= 5

    # the EMA's best exported as weights to fine-tune from: its ema.pt, not the model's
    from safetensors.torch import load_file

    from launch.cli import main

    ema_best = root / _best(root, ck.BEST_EMA)["tag"]
    for weights in ("ema", "model"):
        assert main(["convert", str(ema_best), str(tmp_path / f"{weights}.safetensors"),
                     "--weights", weights]) == 0
    exported = load_file(tmp_path / "ema.safetensors")
    saved = torch.load(ema_best / ck.EMA_FILE, map_location="cpu")
    assert exported.keys() == saved.keys() == load_file(tmp_path / "model.safetensors").keys()
    for name, value in saved.items():
        assert torch.equal(exported[name], value.float() if value.is_floating_point()
                           else value), name
    model = load_file(tmp_path / "model.safetensors")
    assert any(not torch.equal(model[k], exported[k]) for k in exported)
    # a weights file holds no EMA: refused in one line
    assert main(["convert", str(tmp_path / "ema.safetensors"),
                 str(tmp_path / "again.safetensors"), "--weights", "ema"]) == 2


def _cls_cmd(out: Path, cache: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "launch.cli", "finetune", "classification",
            "--output-dir", str(out), f"data.cache_dir={cache}", "run.progress=false",
            "run.num_workers=0", "run.log_every=1", "run.tensorboard=false"]



def _flaky_pointer(monkeypatch) -> None:
    """Reading best.json fails as a transient EIO of a parallel or FUSE file system does;
    every other file reads."""
    import errno

    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == ck.BEST:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_a_pointer_that_cannot_be_read_keeps_every_checkpoint_at_that_prune(tmp_path,
                                                                             monkeypatch):
    """One failed read of best.json at a save: taken for "no best", the prune set the best
    checkpoint aside for deletion. Now the first prune of a process keeps every complete
    checkpoint, the next, the pointer readable again, prunes as before, and a later one
    that cannot read it keeps what it named then."""
    root = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / ck.tag_for(step)).mkdir(parents=True)
        ck.write_trainer_state(root / ck.tag_for(step), {"step": step})
    (root / "latest").write_text(ck.tag_for(4))
    ck.record_best(root, {"tag": ck.tag_for(1), "step": 1, "metric": "top1", "value": 0.9})
    with monkeypatch.context() as patch:
        _flaky_pointer(patch)
        ck.prune(root, keep_last=1, wait=True)
    assert _kept(root) == [1, 2, 3, 4]
    ck.prune(root, keep_last=1, wait=True)
    assert _kept(root) == [1, 4]  # the best and the newest
    # unreadable again later (bad permissions for good, say): what it named at the last
    # prune is kept, not every checkpoint of every save (a disk filled by them)
    for step in (5, 6):
        (root / ck.tag_for(step)).mkdir()
        ck.write_trainer_state(root / ck.tag_for(step), {"step": step})
    (root / "latest").write_text(ck.tag_for(6))
    with monkeypatch.context() as patch:
        _flaky_pointer(patch)
        ck.prune(root, keep_last=1, wait=True)
    assert _kept(root) == [1, 6]


def test_a_resume_whose_pointer_cannot_be_read_is_refused_on_every_rank(tmp_path,
                                                                       monkeypatch):
    """Rank 0 reads the pointers for every rank (FinetuneRun.bests): a read that fails is
    a ResumeError (a requeue tries again), not a run that forgot its best; a pointer that
    is not there is no best, as before."""
    from finetune.engine import FinetuneRun

    root = tmp_path / "run" / "checkpoints"
    ck.record_best(root, {"tag": ck.tag_for(1), "step": 1, "metric": "top1", "value": 0.9})
    run = FinetuneRun(tmp_path / "run", None, None)
    with monkeypatch.context() as patch:
        _flaky_pointer(patch)
        with pytest.raises(ck.ResumeError, match="best checkpoint's pointer.*Input/output"):
            run.bests({ck.BEST: "top1"}, 4, True)
    (root / ck.BEST).unlink()
    (best,) = run.bests({ck.BEST: "top1"}, 4, True)
    assert best.value is None and best.step is None
