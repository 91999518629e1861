"""Fine-tuning writes TensorBoard scalars, and a resumed run hides what a dead run logged
past its checkpoint, as metrics.jsonl does (runtime/metrics.py ``MetricsLogger``)."""

from __future__ import annotations

import shutil
from pathlib import Path

# classification on the digits demo, the cheapest task: one evaluation, at the end
TINY = ["run.batch_size=16", "run.max_steps=4", "run.eval_every=4", "run.checkpoint_every=2",
        "run.log_every=2", "run.num_workers=0", "run.progress=false", "run.threads=1",
        "ema.enabled=false", "optim.warmup_steps=0"]


def _loss_steps(run_dir: Path) -> list[int]:
    """The steps of the ``loss`` scalar as TensorBoard shows them: its EventAccumulator
    reads every event file of the directory in order and applies their purge events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"], acc.Tags()
    return [e.step for e in acc.Scalars("loss")]


def test_finetuning_writes_tensorboard_and_a_resume_purges_the_steps_past_its_checkpoint(
        tmp_path, cache):
    """A crash while step 4's checkpoint is written leaves step 4 logged and ``latest`` on
    step 2 (DeepSpeed's ``latest`` names the last complete checkpoint). The resumed run
    logs step 4 again; torch's SummaryWriter docs: with ``purge_step`` T, "any events whose
    global_step larger or equal to T will be purged and hidden from TensorBoard", so
    opened with T = checkpoint step + 1, step 4 shows once. (Without it, TensorBoard would
    show step 4 twice: it only drops earlier events when a step goes backwards.)"""
    import torch

    from finetune.classification import ClassificationConfig, train
    from launch.config import load_config

    out = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={cache}"]  # the suite's shared demo cache
    threads = torch.get_num_threads()
    try:
        train(load_config(ClassificationConfig, None, args), out)
        # run.log_every=2 also logs the first step: 1, 2, 4
        assert _loss_steps(out) == [1, 2, 4]

        ckpts = out / "checkpoints"
        shutil.rmtree(ckpts / "step_0000004")
        (ckpts / "latest").write_text("step_0000002")
        train(load_config(ClassificationConfig, None, args), out, resume="auto")
    finally:
        torch.set_num_threads(threads)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert _loss_steps(out) == [1, 2, 4]

