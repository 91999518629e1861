"""An interrupted rewind undone with ``--resume auto`` leaves ``metrics.jsonl`` (and
TensorBoard) reading as the run that continued.

A rewind (``--resume RUN/checkpoints/step_30`` while step_40 is ``latest``) cuts the file
back to step 30 at its start; the abandoned checkpoints stay until the rewound run's first
checkpoint is complete, so until then ``--resume auto`` can undo it (README). That undo
continued from step 40 over a file holding steps 1-30 and the rewound run's 31-33: the
records 31-40 of the branch that continued were lost, the abandoned 31-33 kept. Now what
a resume cuts is kept in ``metrics.jsonl.cut`` until the resumed run's first checkpoint,
and a later resume rebuilds the lineage from it (runtime/metrics.py)."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.metrics import CUT_SUFFIX, MetricsLogger

_SECONDS = itertools.count(int(time.time()) + 1)


@contextmanager
def _own_second():
    """TensorBoard names each events file by the second its writer opened, then the PID
    and a per-process counter compared as text ("10" sorts before "9"), and reads a run
    directory's files in name order: real resumes are new processes seconds apart, these
    runs share a process and a second. Each writer here is opened in a second of its own
    (tensorboard's event_file_writer reads time.time() for the name)."""
    import tensorboard.summary.writer.event_file_writer as efw

    second = float(next(_SECONDS))
    real = efw.time
    efw.time = SimpleNamespace(time=lambda: second)
    try:
        yield
    finally:
        efw.time = real


def _run(out: Path, start: int, end: int, checkpoints=(), branch: str = "a",
         unannounced: int | None = None) -> None:
    """A run resumed from ``start`` logging steps start+1..end, checkpointing at
    ``checkpoints`` as a save does (a complete ``checkpoints/step_*`` folder, then what
    runtime/loop.py's save tells the logger); the save of step ``unannounced`` is
    published but the run dies before telling the logger (killed after the publish)."""
    with _own_second():
        logger = MetricsLogger(out, True, end, start, tensorboard=True, progress=False,
                               timestamp=True)  # as pre-training logs
    for step in range(start + 1, end + 1):
        logger.log(step, {"loss": step + (0.5 if branch == "b" else 0.0)})
        if step in checkpoints or step == unannounced:
            folder = out / "checkpoints" / f"step_{step:07d}"
            shutil.rmtree(folder, ignore_errors=True)  # a branch's save replaces its step's
            folder.mkdir(parents=True)
            (folder / "trainer_state.json").write_text(json.dumps({"step": step,
                                                                   "branch": branch}))
            time.sleep(0.01)  # file times apart, as saves are
            if step == unannounced:
                logger.close()
                return
            logger.checkpointed()
    logger.close()


def _records(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads,
                                                (out / "metrics.jsonl").read_text().splitlines())]


def _tensorboard(out: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]  # no step or time re-logged as scalars
    return [(e.step, e.value) for e in events.Scalars("loss")]


def _lineage(*parts: tuple[int, int, str]) -> list[tuple[int, float]]:
    return [(s, s + (0.5 if b == "b" else 0.0)) for lo, hi, b in parts for s in range(lo, hi + 1)]


def test_an_undone_rewind_restores_the_records_of_the_branch_that_continued(tmp_path):
    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 33, branch="b")  # the rewind, killed before its first checkpoint
    assert _records(tmp_path) == _lineage((1, 30, "a"), (31, 33, "b"))
    _run(tmp_path, 40, 42, checkpoints=(42,))  # --resume auto: latest is still step 40
    want = _lineage((1, 42, "a"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want
    assert not (tmp_path / ("metrics.jsonl" + CUT_SUFFIX)).exists()  # gone with the save


def test_a_rewind_whose_first_checkpoint_is_complete_is_final(tmp_path):
    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 36, checkpoints=(35,), branch="b")  # saved: step 40 is pruned
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000040")
    _run(tmp_path, 35, 37, branch="b")  # killed after step 36, resumed from its step 35
    want = _lineage((1, 30, "a"), (31, 37, "b"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want


@pytest.mark.parametrize("back", [20, 30])
def test_a_second_rewind_before_any_save_then_an_undo(tmp_path, back):
    _run(tmp_path, 0, 40, checkpoints=(20, 30, 40))
    _run(tmp_path, 30, 33, branch="b")
    _run(tmp_path, back, back + 2, branch="b")  # rewound again, killed again
    _run(tmp_path, 40, 41)  # undone: step 40 was never replaced
    want = _lineage((1, 41, "a"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want


def test_an_ordinary_kill_and_resume_reads_as_the_uninterrupted_run(tmp_path):
    _run(tmp_path, 0, 13, checkpoints=(10,))  # killed at 13, after the checkpoint of 10
    _run(tmp_path, 10, 20, checkpoints=(20,))
    assert _records(tmp_path) == _tensorboard(tmp_path) == _lineage((1, 20, "a"))


@pytest.mark.parametrize("rewind", [False, True])
def test_a_run_killed_between_its_save_and_telling_the_logger_keeps_its_records(
        tmp_path, rewind):
    """The cut file outlives a save that was published but not announced (a kill in the
    save's prune or final barrier, or rank 0 dying mid-swap): the resume of that new
    checkpoint is no undo, the file's own records are the lineage (a reviewer's case: the
    continuing branch's records were replaced by the dead run's)."""
    if rewind:
        _run(tmp_path, 0, 40, checkpoints=(30, 40))
        _run(tmp_path, 30, 36, branch="b", unannounced=35)
        shutil.rmtree(tmp_path / "checkpoints" / "step_0000040")  # pruned by that save
        _run(tmp_path, 35, 37, branch="b")
        want = _lineage((1, 30, "a"), (31, 37, "b"))
    else:
        _run(tmp_path, 0, 15, checkpoints=(10,))  # killed at 15
        _run(tmp_path, 10, 21, branch="b", unannounced=20)
        _run(tmp_path, 20, 22, branch="b")
        want = _lineage((1, 10, "a"), (11, 22, "b"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want


def test_a_finished_runs_resume_undoes_an_interrupted_rewind_and_reads_its_last_records(
        tmp_path):
    # a finished run (step 40 of 40) rewound to step 30 and killed before its first
    # checkpoint, then resumed with --resume auto: latest is the finished step 40, the
    # resume trains nothing (FinetuneRun.completed, pre-training's finished check); it
    # read the file as it was (the abandoned 31-33 kept, the cut file left for ever)
    from runtime.metrics import records_at

    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 33, branch="b")
    assert [(r["step"], r["loss"]) for r in records_at(tmp_path, 40)] == [(40, 40.0)]
    assert _records(tmp_path) == _lineage((1, 40, "a"))
    assert not (tmp_path / ("metrics.jsonl" + CUT_SUFFIX)).exists()
    assert records_at(tmp_path / "nothing", 40) == []


def _finished_resume(out: Path, step: int) -> list[tuple[int, float]]:
    """What a finished run's ``--resume auto`` reads (``records_at``, which trains nothing),
    its TensorBoard writer (if any) opened in a second of its own, as a new process's is."""
    from runtime.metrics import records_at

    with _own_second():
        return [(r["step"], r["loss"]) for r in records_at(out, step)]


def test_a_finished_runs_resume_that_undoes_a_rewind_mends_tensorboard_too(tmp_path):
    # the rewind's writer purged steps 31 on and logged branch b's 31-33; the finished
    # run's resume put branch a's 31-40 back in metrics.jsonl only, so TensorBoard showed
    # 31-33 of the abandoned branch b and nothing past 33 (README's former known gap)
    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 33, branch="b")  # the rewind, killed before its first checkpoint
    assert _finished_resume(tmp_path, 40) == [(40, 40.0)]
    want = _lineage((1, 40, "a"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want
    # a second look changes nothing (and writes no further events file)
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert _finished_resume(tmp_path, 40) == [(40, 40.0)]
    assert sorted((tmp_path / "tensorboard").iterdir()) == files
    assert _tensorboard(tmp_path) == want


def test_a_finished_runs_resume_killed_mid_repair_is_finished_by_the_next(tmp_path,
                                                                          monkeypatch):
    # TensorBoard is mended before metrics.jsonl is touched: killed in between, the cut
    # file still describes the undo, and the next resume repairs both again
    import runtime.metrics as metrics

    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 33, branch="b")

    def killed(path, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "truncate_after", killed)
    with pytest.raises(KeyboardInterrupt):
        _finished_resume(tmp_path, 40)
    monkeypatch.undo()
    assert _finished_resume(tmp_path, 40) == [(40, 40.0)]
    want = _lineage((1, 40, "a"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want
    assert not (tmp_path / ("metrics.jsonl" + CUT_SUFFIX)).exists()


def test_a_finished_runs_resume_gives_a_run_without_tensorboard_none(tmp_path):
    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 33, branch="b")
    shutil.rmtree(tmp_path / "tensorboard")  # as a run with run.tensorboard=false logs
    assert _finished_resume(tmp_path, 40) == [(40, 40.0)]
    assert _records(tmp_path) == _lineage((1, 40, "a"))
    assert not (tmp_path / "tensorboard").exists()


def test_a_training_resume_killed_right_after_its_cut_leaves_tensorboard_mended(tmp_path,
                                                                                 monkeypatch):
    # an undo (--resume auto after an interrupted rewind) put branch a's 31-40 back in
    # metrics.jsonl and removed the cut file, then the job died before its TensorBoard
    # writer was opened: the next resume (from 40, nothing left to cut) purged from 41
    # only, and TensorBoard showed the abandoned branch b's 31-33 for ever
    import runtime.metrics as metrics

    _run(tmp_path, 0, 40, checkpoints=(30, 40))
    _run(tmp_path, 30, 33, branch="b")  # the rewind, killed before its first checkpoint
    real = metrics.cut_back

    def killed_after(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "cut_back", killed_after)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, 40, 42, checkpoints=(42,))
    monkeypatch.undo()
    assert _records(tmp_path) == _lineage((1, 40, "a"))
    assert not (tmp_path / ("metrics.jsonl" + CUT_SUFFIX)).exists()  # nothing left to cut
    _run(tmp_path, 40, 42, checkpoints=(42,))
    want = _lineage((1, 42, "a"))
    assert _records(tmp_path) == want
    assert _tensorboard(tmp_path) == want


def test_a_training_resumes_purge_is_on_disk_before_it_logs(tmp_path):
    # the writer's purge event waited in its buffer until the first checkpoint's flush:
    # a job killed before it (or before a save it published could tell the logger) left
    # the dead run's steps past the checkpoint showing beside the new run's
    _run(tmp_path, 0, 13, checkpoints=(10,))  # killed at 13, after the checkpoint of 10
    with _own_second():
        logger = MetricsLogger(tmp_path, True, 20, 10, tensorboard=True, progress=False)
    try:
        assert _tensorboard(tmp_path) == _lineage((1, 10, "a"))  # nothing flushed since
    finally:
        logger.close()
