"""A step whose update DeepSpeed skipped for an fp16 loss-scale overflow.

DeepSpeed 0.19.8 (deepspeed/runtime/engine.py ``_take_model_step``): on an overflow of the
fp16 optimizer it applies no update, counts ``skipped_steps``, does not step the lr
scheduler, and ``was_step_applied()`` is False. The trainer counted such a step as taken
all the same: the lr schedule fell one step behind the step counter per overflow (a
step-based run ended before reaching its final lr), and the EMA teacher took a momentum
step towards weights that had not changed. (fp16 does not run on this machine's CPU
accelerator, tests/test_pretrain_precision.py: the trainer's hook is run on a stand-in
engine that reports the overflow as DeepSpeed does.)
"""

from __future__ import annotations

from types import SimpleNamespace

from pretrain.config import PretrainConfig
from pretrain.trainer import Trainer


class _Scheduler:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


class _Teacher:
    def __init__(self):
        self.updates = 0

    def update(self, momentum):
        self.updates += 1


def _trainer(applied: list[bool]):
    """The parts of a Trainer that ``_after_step`` reads, over an engine whose steps were
    applied or skipped as ``applied`` says, in turn."""
    outcomes = iter(applied)
    engine = SimpleNamespace(lr_scheduler=_Scheduler(),
                             was_step_applied=lambda: next(outcomes),
                             module=SimpleNamespace(logit_scale=None))
    t = SimpleNamespace(step=0, samples=0, batch=8, overflow_skipped=0, engine=engine,
                        teacher=_Teacher(), cfg=PretrainConfig(), total_steps=100)
    t._overflowed = lambda step: Trainer._overflowed(t, step)
    return t


def test_an_update_skipped_by_deepspeed_keeps_the_schedule_on_the_step_and_the_teacher_still(
        monkeypatch):
    import pretrain.trainer as trainer

    clamped = []
    monkeypatch.setattr(trainer, "clamp_logit_scale", lambda engine, bound: clamped.append(1))
    t = _trainer([False, False, True])
    for step in (1, 2):
        Trainer._after_step(t, step)
    # the two skipped updates: the schedule stepped by hand (DeepSpeed did not), the
    # teacher untouched, counted; the step and the plan moved on
    assert t.engine.lr_scheduler.steps == 2 and t.teacher.updates == 0
    assert t.overflow_skipped == 2 and t.step == 2 and t.samples == 16
    assert clamped == []
    Trainer._after_step(t, 3)  # applied: DeepSpeed stepped the schedule itself
    assert t.engine.lr_scheduler.steps == 2 and t.teacher.updates == 1 and clamped == [1]
    assert t.overflow_skipped == 2
