"""A training set too small for one optimizer step is refused at the start, in one line.

Fewer samples a process than ``run.batch_size x run.grad_accum`` give an epoch without a
step. The training loop said so only at its first epoch: after the model, the engine and
the run directory were made, as a traceback. The step count is known once the set is
(``len(set) // (batch x accum x processes)``; the dense tasks' from their loader), so the
start refuses it there, a refused start as any other: exit 2, one line, no run
directory left behind.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("task, args", [
    # the digits demo: 1,527 training images on one process, 512 x 4 a step
    ("classification", ["run.batch_size=512", "run.grad_accum=4", "run.num_workers=0"]),
    # the segmentation demo shrunk to 3 training images, 4 a batch
    ("segmentation", ["data.demo_train=3", "data.demo_val=1", "data.demo_size=32",
                      "run.batch_size=4", "run.num_workers=0", "head_channels=16"]),
])
def test_an_epoch_without_an_optimizer_step_is_refused_before_anything_is_built(
        task, args, cache, tmp_path, capsys, monkeypatch):
    import finetune.engine
    import finetune.loop
    import finetune.zero
    from launch.cli import main

    started = []
    # patched where it is called: finetune.zero and finetune.loop bind the name when they
    # are imported (patching finetune.engine alone, a first import of finetune.zero during
    # this test bound the stand-in for good: later tests' engines were None)
    for module in (finetune.engine, finetune.loop, finetune.zero):
        monkeypatch.setattr(module, "start_engine", lambda *a, **k: started.append(a))
    out = tmp_path / "runs" / "run"
    code = main(["finetune", task, "--output-dir", str(out), *args,
                 f"data.cache_dir={cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not started
    assert err[-1].startswith("internimage finetune: ") and "Traceback" not in "\n".join(err)
    assert "an epoch holds no optimizer step" in err[-1] and "run.batch_size" in err[-1]
    assert not (tmp_path / "runs").exists()  # the refused start left no folder behind
