"""The loop's gradient-accumulation mechanisms (runtime/loop.py), shared by every
fine-tuning task: grouping micro-batches into optimizer steps and the loss of one step.

Definitions tested against: DeepSpeed's ``gradient_accumulation_steps`` (docs: the number
of micro-batches whose gradients are accumulated before one optimizer step; each
micro-batch loss is scaled by 1/gradient_accumulation_steps, so an update's loss is the
mean of its micro-batch losses) and torch's ``DataLoader(drop_last=True)`` (docs: the last
incomplete batch is dropped), which a trailing partial group of micro-batches follows.
"""

from __future__ import annotations

import pytest
import torch

from runtime.loop import accumulated_step, step_batches


def test_step_batches_groups_whole_steps_and_never_draws_a_partial_one():
    drawn: list[int] = []

    def micro_batches():
        for i in range(7):
            drawn.append(i)
            yield i

    assert list(step_batches(micro_batches(), 3, 10)) == [[0, 1, 2], [3, 4, 5]]
    # the 7th micro-batch is drawn (to find the group short) but no 8th is asked for
    assert drawn == list(range(7))
    drawn.clear()
    # a step limit stops before any micro-batch of the next step is loaded
    assert list(step_batches(micro_batches(), 2, 1)) == [[0, 1]]
    assert drawn == [0, 1]


def test_accumulated_step_runs_each_micro_batch_in_order_and_returns_mean_losses():
    seen: list[int] = []

    def micro_step(batch: int) -> dict[str, torch.Tensor]:
        seen.append(batch)
        value = torch.tensor(float(batch), requires_grad=True)
        return {"loss_cls": value * 2, "loss_box": value}

    losses = accumulated_step(micro_step, [1, 2, 6])
    assert seen == [1, 2, 6]
    assert losses["loss_cls"].item() == pytest.approx(2 * 3.0)
    assert losses["loss_box"].item() == pytest.approx(3.0)
    assert not any(v.requires_grad for v in losses.values())  # no graph kept for logging
    # one micro-batch: its own loss, unchanged
    assert accumulated_step(lambda b: {"loss": torch.tensor(b)}, [0.25])["loss"].item() == 0.25
