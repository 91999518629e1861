"""The training loop keeps what is alive at its start out of the cyclic garbage collector's
reach while it trains (runtime/loop.py ``start_up_objects_frozen``) and gives it back after;
the command line freezes what is alive before the interpreter's exit (launch/cli.py
``main``, registered with atexit). CPython's ``gc.freeze`` docs: frozen objects are ignored
by every later collection; ``gc.unfreeze`` puts them back in the oldest generation."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch

from runtime.dist import DistInfo
from runtime.loop import LoopPosition, LoopSpec, TaskHooks, run_loop
from runtime.metrics import MetricsLogger
from tests.pretrain_utils import REPO


class _Node:
    """A reference cycle: freed only by the cyclic collector."""

    def __init__(self):
        self.me = self


def _loop(tmp_path, train_step, steps: int = 3) -> None:
    hooks = TaskHooks(batches=lambda epoch, skip: range(100), train_step=train_step,
                      evaluate=lambda: {}, save=lambda pos: None)
    spec = LoopSpec(name="t", total_steps=steps, eval_every=0, checkpoint_every=0,
                    log_every=1)
    metrics = MetricsLogger(tmp_path, True, steps, 0, tensorboard=False, progress=False)
    run_loop(spec, hooks, LoopPosition(), metrics=metrics, d=DistInfo())


def test_objects_alive_at_the_start_are_frozen_while_training_and_given_back(tmp_path):
    alive = _Node()
    seen = []

    def train_step(batch):
        seen.append(gc.get_freeze_count())
        return {"loss": torch.tensor(1.0)}

    assert gc.get_freeze_count() == 0
    _loop(tmp_path, train_step)
    # every step ran with the start-up objects frozen (a module's worth at least)
    assert len(seen) == 3 and all(count > 1000 for count in seen), seen
    assert gc.get_freeze_count() == 0  # given back: their cycles are collectable again
    ref = weakref.ref(alive)
    del alive
    gc.collect()
    assert ref() is None


def test_garbage_of_the_start_is_collected_not_frozen_and_training_garbage_is_collected(
        tmp_path):
    garbage = _Node()
    ref_start = weakref.ref(garbage)
    del garbage  # a cycle: still there until a collection
    refs = []

    def train_step(batch):
        node = _Node()
        refs.append(weakref.ref(node))
        del node
        if len(refs) == 2:
            assert ref_start() is None  # collected before the freeze
            gc.collect()  # collects what training made, frozen or not
            assert refs[0]() is None
        return {"loss": torch.tensor(1.0)}

    _loop(tmp_path, train_step)
    assert len(refs) == 3


def test_a_training_step_that_raises_unfreezes(tmp_path):
    def train_step(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _loop(tmp_path, train_step)
    assert gc.get_freeze_count() == 0


def test_the_command_line_freezes_what_is_alive_before_the_process_exits():
    # registered before main: atexit runs it after main's own callback (last in, first out)
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))\n"
            "from launch.cli import main\n"
            "print('frozen before', gc.get_freeze_count())\n"
            # a config error: main returns (2) without a run; any way out exits alike
            "sys.exit(main(['pretrain', 'no_such.key=1']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no_such" in proc.stderr, proc.stderr[-2000:]
    before, at_exit = (int(line.split()[-1]) for line in proc.stdout.strip().splitlines())
    assert before == 0 and at_exit > 1000, proc.stdout[-500:]
