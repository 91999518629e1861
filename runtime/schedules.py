"""Learning-rate schedules of every training job, one function per schedule kind.

All of them apply each param group's ``lr_scale`` (runtime/param_groups.py), the optimizer's
group ``lr`` having started at the base lr: a group trains at
``base_lr * schedule(t) * lr_scale`` (classification's ``cosine(absolute_ends=True)``:
with the warm-up start and ``min_lr`` left unscaled, as the released code does).

- ``WarmupCosine``: pre-training's linear warm-up then cosine to ``min_lr``, in steps (or,
  once re-planned for another global batch, in samples: :meth:`WarmupCosine.rebase`); a
  torch scheduler, so DeepSpeed can own it (``lr_scheduler=``) and save/restore its
  ``state_dict`` with every checkpoint.
- ``cosine``, ``multistep``, ``poly``: fine-tuning's timm schedulers (stepped per update
  with ``step_update``), whose ``update_groups`` multiplies ``lr_scale`` in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

# the released recipes warm up from 1e-3 x the base lr (mmdet/mmseg warmup_ratio, and the
# classification code's WARMUP_LR / BASE_LR = 5e-7 / 5e-4)
WARMUP_RATIO = 1e-3


def warmup_cosine(warmup_steps: int, total_steps: int,
                  min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at step ``s``: linear warm-up over ``warmup_steps`` steps
    (step 0 already at ``1 / warmup_steps``), then cosine from 1 to ``min_ratio`` at
    ``total_steps``, constant after."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class WarmupCosine(LRScheduler):
    """Pre-training's schedule: group ``i`` trains at
    ``base_lrs[i] * warmup_cosine(t) * lr_scale_i`` at step ``t``.

    ``base_lrs`` are the groups' initial lrs (the base lr, by runtime/param_groups.py's
    convention). A group without ``lr_scale`` trains at scale 1; so a checkpoint of the
    earlier ``LambdaLR`` over pre-scaled groups (whose restored groups carry no
    ``lr_scale`` and whose ``base_lrs`` hold the scaled lrs) resumes at the same rates.

    After :meth:`rebase` (a run resumed with another global batch) the multiplier is a
    function of the samples read instead (``samples_plan``), saved and restored with the
    rest of the state; until then ``samples_plan`` is None and the schedule is
    ``warmup_cosine`` of the step, as it always was (a checkpoint written before
    ``samples_plan`` existed restores with None: torch's ``load_state_dict`` updates
    ``__dict__`` with what was saved, leaving attributes it did not save as built).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int,
                 total_steps: int, min_ratio: float, last_epoch: int = -1) -> None:
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"WarmupCosine: min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio
        self.samples_plan: dict[str, float] | None = None
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The schedule's multiplier of the base lr at ``step``."""
        if self.samples_plan is None:
            return warmup_cosine(self.warmup_steps, self.total_steps, self.min_ratio)(step)
        return self._samples_factor(self.samples_plan, self.samples_at(step))

    def get_lr(self) -> list[float]:
        """Each group's lr at the current step (``last_epoch`` counts steps here)."""
        f = self.factor(self.last_epoch)
        return [base * f * group.get("lr_scale", 1.0)
                for base, group in zip(self.base_lrs, self.optimizer.param_groups)]

    # -- the schedule in samples -----------------------------------------------------------
    def _plan(self, batch_before: int) -> dict[str, float]:
        """The schedule as a curve in samples: the re-planned one, or the step schedule
        read with ``batch_before`` samples per step (step ``s`` = ``s * batch_before``
        samples; the first warm-up step already at ``1 / warmup_steps`` becomes a warm-up
        that starts one step's samples in)."""
        if self.samples_plan is not None:
            return self.samples_plan
        b = float(batch_before)
        return {"step": 0, "samples": 0.0, "batch": b, "unit": b,
                "warmup": self.warmup_steps * b, "anchor": self.warmup_steps * b,
                "progress": 0.0, "end": self.total_steps * b}

    def samples_at(self, step: int, batch_before: int = 1) -> float:
        """Samples read after optimizer step ``step`` as this schedule counts them
        (``batch_before`` per step where it still counts steps)."""
        plan = self._plan(batch_before)
        return plan["samples"] + (step - plan["step"]) * plan["batch"]

    def end_samples(self, batch_before: int = 1) -> float:
        """Samples after which the lr is ``min_ratio`` (``batch_before`` per step where the
        schedule still counts steps)."""
        return self._plan(batch_before)["end"]

    @staticmethod
    def _progress(plan: dict[str, float], samples: float) -> float:
        """How far the cosine is (0 at its start, 1 at ``min_ratio``) after ``samples``."""
        span = plan["end"] - plan["anchor"]
        if span <= 0:
            return 1.0
        done = plan["progress"] + (1 - plan["progress"]) * (samples - plan["anchor"]) / span
        return min(1.0, max(0.0, done))

    def _samples_factor(self, plan: dict[str, float], samples: float) -> float:
        if samples < plan["warmup"]:
            # linear in samples, at the step schedule's values at whole steps; capped at 1
            # because a position between the last warm-up step and the cosine's start
            # exists only in samples
            return min(1.0, (samples + plan["unit"]) / plan["warmup"])
        cosine = 0.5 * (1 + math.cos(math.pi * self._progress(plan, samples)))
        return self.min_ratio + (1 - self.min_ratio) * cosine

    def rebase(self, step: int, end_step: int, batch: int, batch_before: int) -> None:
        """Re-plan from optimizer step ``step`` (where the scheduler stands): from here on
        each step reads ``batch`` samples and the run ends at ``end_step``.

        The lr as a function of the samples read is kept where it is (the warm-up ends
        at the same sample count) and the rest of the cosine is laid over the samples left,
        ``(end_step - step) * batch``, so the lr is continuous in samples across the change
        and is ``min_ratio`` exactly after ``end_step``. ``batch_before``: samples per step
        so far, needed only while the schedule still counts steps (never re-planned).
        The groups' lrs are set to the re-planned value at ``step`` (what the next step
        trains at).
        """
        old = self._plan(batch_before)
        here = self.samples_at(step, batch_before)
        anchor = max(old["warmup"], here)  # the cosine continues from here (or its start)
        self.samples_plan = {
            "step": step, "samples": here, "batch": float(batch), "unit": old["unit"],
            "warmup": old["warmup"], "anchor": anchor,
            "progress": self._progress(old, anchor) if anchor > old["warmup"] else 0.0,
            "end": here + (end_step - step) * batch}
        self.total_steps = end_step
        self.last_epoch = step
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def _warmup(lr: float, warmup_steps: int) -> dict:
    """timm's warm-up arguments: linear from ``WARMUP_RATIO x lr`` over ``warmup_steps``
    updates (``t_in_epochs=False``: the scheduler counts updates)."""
    return {"warmup_t": warmup_steps, "warmup_lr_init": lr * WARMUP_RATIO,
            "t_in_epochs": False}


def cosine(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, total_steps: int,
           warmup_steps: int, warmup_prefix: bool, absolute_ends: bool = False):
    """timm's cosine from ``lr`` to ``min_lr`` over ``total_steps`` updates.

    ``warmup_prefix=False`` is the released classification code's (the cosine spans the
    whole run and the warm-up overlays its start, so the lr reaches ``min_lr`` at the last
    step); ``True`` starts the cosine after the warm-up.

    ``absolute_ends``: the warm-up start and ``min_lr`` are absolute lrs, not scaled by
    each group's ``lr_scale``: a group runs from ``warmup_lr_init`` up to
    ``lr_scale x lr``, then cosine to ``min_lr`` (which lies above its peak where
    ``lr_scale x lr < min_lr``). That is the released classification code: its groups hold
    ``ratio x BASE_LR`` as their own lr and timm's CosineLRScheduler schedules each from
    that lr to the one ``MIN_LR`` (OpenGVLab/InternImage classification/optimizer.py
    ``set_weight_decay_and_lr``, classification/lr_scheduler.py ``build_scheduler``).
    Otherwise a group trains at ``lr_scale x`` the base lr's schedule.
    """
    from timm.scheduler import CosineLRScheduler

    cls = _absolute_ends_cosine() if absolute_ends else CosineLRScheduler
    return cls(optimizer, t_initial=max(1, total_steps), lr_min=min_lr,
               warmup_prefix=warmup_prefix, **_warmup(lr, warmup_steps))


@functools.cache
def _absolute_ends_cosine():
    from timm.scheduler import CosineLRScheduler

    class AbsoluteEndsCosine(CosineLRScheduler):
        """timm's cosine (one cycle) with the warm-up start and ``lr_min`` absolute per
        group (:func:`cosine`, ``absolute_ends``). ``_get_lr`` returns each group's lr
        divided by its ``lr_scale``, which timm's ``update_groups`` multiplies back in."""

        def __init__(self, optimizer, **kwargs):
            super().__init__(optimizer, **kwargs)
            if self.warmup_t:  # timm set warmup_lr_init x lr_scale: the absolute start
                self.update_groups(self._get_lr(0))

        def _get_lr(self, t: int) -> list[float]:
            scales = [g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
            if t < self.warmup_t:
                w0 = self.warmup_lr_init
                return [(w0 + t * (s * base - w0) / self.warmup_t) / s
                        for s, base in zip(scales, self.base_values)]
            if self.warmup_prefix:
                t = t - self.warmup_t
            if t >= self.t_initial:  # after the one cycle (cycle_limit 1): lr_min
                return [self.lr_min / s for s in scales]
            c = 0.5 * (1 + math.cos(math.pi * t / self.t_initial))
            return [(self.lr_min + (s * base - self.lr_min) * c) / s
                    for s, base in zip(scales, self.base_values)]

    return AbsoluteEndsCosine


def multistep(optimizer: torch.optim.Optimizer, *, lr: float, milestones: Sequence[int],
              gamma: float, warmup_steps: int):
    """timm's step decay by ``gamma`` at each of ``milestones`` (update counts).

    mmdet's step policy (the released 1x/3x detection configs): the milestones count from
    step 0 and the warm-up overlays them, not shifts them.
    """
    from timm.scheduler import MultiStepLRScheduler

    return MultiStepLRScheduler(optimizer, decay_t=list(milestones), decay_rate=gamma,
                                warmup_prefix=False, **_warmup(lr, warmup_steps))


@functools.cache
def _mmcv_warmup_poly():
    from timm.scheduler import PolyLRScheduler

    class MmcvWarmupPoly(PolyLRScheduler):
        """timm's poly decay (one cycle, ``warmup_prefix=False``) whose warm-up scales the
        poly lr of the same step, as mmcv 1.x's ``LrUpdaterHook.get_warmup_lr`` (linear):
        ``poly(t) * (1 - (1 - t / W) * (1 - warmup_ratio))``; timm's replaced it by a ramp
        to the base lr, above mmcv's by up to 1.9% at the end of the released 1500-step
        warm-up of an 80k schedule, then a drop at step W."""

        warmup_ratio = WARMUP_RATIO

        def _get_lr(self, t: int) -> list[float]:
            if t >= self.warmup_t:
                return super()._get_lr(t)
            left = max(0.0, 1 - t / self.t_initial) ** self.power
            scale = 1 - (1 - t / self.warmup_t) * (1 - self.warmup_ratio)
            return [(self.lr_min + (base - self.lr_min) * left) * scale
                    for base in self.base_values]

    return MmcvWarmupPoly


def poly(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, total_steps: int,
         power: float, warmup_steps: int, warmup_ratio: float = WARMUP_RATIO):
    """Polynomial decay to ``min_lr`` over ``total_steps`` updates (mmseg's poly policy)
    with mmcv's linear warm-up from ``warmup_ratio x lr`` over ``warmup_steps`` updates.

    mmcv's ``PolyLrUpdaterHook`` computes the decay on the absolute iteration and its
    warm-up multiplies that iteration's poly lr by ``1 - (1 - t / W) * (1 - ratio)``
    (mmcv/runner/hooks/lr_updater.py ``get_warmup_lr``), so the decay is not shifted by the
    warm-up and reaches ``min_lr`` at the last step.
    """
    warm = _warmup(lr, warmup_steps) | {"warmup_lr_init": lr * warmup_ratio}
    scheduler = _mmcv_warmup_poly()(optimizer, t_initial=max(1, total_steps), power=power,
                                     lr_min=min_lr, warmup_prefix=False, **warm)
    scheduler.warmup_ratio = warmup_ratio
    return scheduler
