"""What a killed job leaves in a run's ``checkpoints/`` is deleted (runtime/checkpoint.py):
the hidden folders of a resize's conversion cut short (``.step_N_universal.tmp-<token>``,
and ``.stale-<token>`` when it was replacing an older one, each conversion's own; without
the token as earlier versions named them: ~13 GB for InternImage-H), which nothing
removed, and ``deleting.tmp-*`` garbage, which only a save's prune removed (a resume of
a finished run never saves). Rank 0 of the job holding the run's lock deletes them at its
start (:func:`clear_leftovers`) and at each save (:func:`prune`). Also: a pre-training
``--resume auto`` of a run at its last step says it is complete and builds nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import runtime.checkpoint as ck


@pytest.fixture(autouse=True)
def _deletions_done():
    """No test leaves the deletion thread running (a non-daemon thread)."""
    yield
    assert ck.wait_for_deletions(timeout=60)


def _checkpoint(root: Path, step: int) -> Path:
    d = root / ck.tag_for(step)
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")
    (d / ck.TRAINER_STATE).write_text(json.dumps({"step": step}))
    return d


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "shard.pt").write_text("13 GB")
    return path


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _interrupted_conversion(root: Path, ckpt: Path, monkeypatch) -> str:
    """pretrain/resize.py's conversion of ``ckpt`` into ``root``, killed while
    ``ds_to_universal`` writes (the QA repro: SIGTERM once the hidden folder appears);
    returns the name of the folder it leaves."""
    import pretrain.resize as resize

    def killed(cmd, **kw):
        (Path(cmd[cmd.index("--output_folder") + 1]) / "zero").mkdir(parents=True)
        raise KeyboardInterrupt  # the process dies here

    with monkeypatch.context() as m:
        m.setattr(resize, "run_tool", killed)
        m.setattr(resize.shutil, "rmtree", lambda *a, **kw: None)  # no clean-up of its own
        with pytest.raises(KeyboardInterrupt):
            resize.convert_to_universal(ckpt, into=root)
    [left] = [p.name for p in root.iterdir() if p.name.startswith(".")]
    return left


def test_prune_deletes_a_conversion_cut_short_and_keeps_latests_universal_form(
        tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 20)
    ckpt = _checkpoint(root, 30)
    (root / ck.LATEST).write_text("step_0000030")
    # each conversion writes a folder of its own name (two jobs' never mix)
    assert _interrupted_conversion(root, ckpt, monkeypatch).startswith(
        ".step_0000030_universal.tmp-")
    # a conversion that was replacing an older universal form, killed between its renames
    _folder(root / ".step_0000030_universal.stale-0123456789abcdef")
    _folder(root / ".step_0000030_universal.tmp")  # an earlier version's, unsuffixed
    _folder(root / "step_0000030_universal")  # latest's: what a resize resume loads
    ck.prune(root, keep_last=2)
    assert _names(root) == ["latest", "step_0000020", "step_0000030",
                            "step_0000030_universal"]


def test_a_start_deletes_what_killed_jobs_left_and_nothing_else(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt = _checkpoint(root, 30)
    (root / ck.LATEST).write_text("step_0000030")
    assert _interrupted_conversion(root, ckpt, monkeypatch).startswith(
        ".step_0000030_universal.tmp-")  # its own name: its token
    _folder(root / ".step_0000030_universal.stale-0123456789abcdef")
    _folder(root / ".step_0000030_universal.stale")  # an earlier version's, unsuffixed
    _folder(root / "step_0000030_universal")  # kept: a resize resume may load it
    _folder(root / f"{ck.DELETING}0badc0de-step_0000010")  # a deletion cut short
    (root / ".latest.tmp").write_text("step_0000030")  # a file, not a derived folder
    # a save that failed (a full disk) or was killed: its partial folder took the room a
    # resume's first save needs (only the next successful save's prune removed it)
    _folder(root / "step_0000040.tmp-12345678")
    queued = ck.clear_leftovers(root)
    assert len(queued) == 5 and all(ck.is_garbage(p.name) for p in queued)
    assert ck.wait_for_deletions(timeout=60)
    assert _names(root) == [".latest.tmp", "latest", "step_0000030", "step_0000030_universal"]
    assert ck.clear_leftovers(tmp_path / "nothing") == []  # a fresh run: no checkpoints/
    # the staging folder latest names is a publish cut short: the newest checkpoint, kept
    (root / ck.LATEST).write_text("step_0000050.tmp-0badf00d")
    published = _checkpoint(root, 50).rename(root / "step_0000050.tmp-0badf00d")
    assert ck.clear_leftovers(root) == [] and published.is_dir()


def test_a_start_that_cannot_list_checkpoints_warns_and_goes_on(tmp_path, monkeypatch,
                                                                caplog):
    # rank 0 runs this before the ranks agree on their resume checks: an OSError raised
    # here (EACCES, ESTALE on NFS) would end rank 0 alone while the others wait
    root = tmp_path / "checkpoints"
    _folder(root / f"{ck.DELETING}0badc0de-step_0000010")

    def unlistable(self, pattern):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "glob", unlistable)
    assert ck.clear_leftovers(root) == []
    assert "could not look for what an earlier job left" in caplog.text


def test_resume_of_a_run_with_no_checkpoint_suggests_training_checkpoints_only(tmp_path):
    """`--resume DIR` with no checkpoint suggested a .pth or .safetensors file, which
    --resume then refused (a weights file holds no optimizer state): it names what
    --resume takes, and fine-tuning's --init for weights (init=True: pre-training has no
    --init, tests/test_resume_wording.py). `convert` and --init keep their wording."""
    from runtime.checkpoint_path import ACCEPTED, CheckpointPathError, resolve_checkpoint

    with pytest.raises(ck.ResumeError) as err:
        ck.resolve_resume(str(tmp_path), tmp_path, init=True)
    message = str(err.value)
    assert message.startswith(f"--resume {tmp_path}: a directory without a checkpoint")
    assert "step_* directory" in message and "--init" in message
    assert "a released .pth (or .pt/.bin) or a .safetensors file" not in message
    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ck.ResumeError, match="--init"):
        ck.resolve_resume(str(weights), tmp_path, init=True)
    with pytest.raises(CheckpointPathError) as err:
        resolve_checkpoint(tmp_path)
    assert str(err.value).endswith(ACCEPTED)


def _contents(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_pretrain_resume_of_a_finished_run_says_so_and_deletes_leftovers(cache, tmp_path):
    """`pretrain --resume auto` of a run at its last step used to build the engine, load
    the checkpoint, say "resumed ... at step 2" and print {"step": 2}; now it says the run
    is complete (naming its checkpoint), prints the run's last values, writes nothing
    (config.yaml, deepspeed_config.json, metrics.jsonl as they were), and deletes what a
    killed job left (garbage, a conversion cut short) although it never saves."""
    from pretrain_utils import pretrain_cmd, run_forked

    out = tmp_path / "run"
    args = ["run.max_steps=2", "run.checkpoint_every=2"]
    run_forked(pretrain_cmd(1, out, *args), cache)
    root = out / "checkpoints"
    leftovers = [_folder(root / f"{ck.DELETING}0badc0de-step_0000001"),
                 _folder(root / ".step_0000002_universal.tmp")]
    before = {k: v for k, v in _contents(out).items() if not k.startswith("checkpoints/")}
    proc = run_forked(pretrain_cmd(1, out, *args, "--resume", "auto"), cache)
    assert f"the run is already complete: its checkpoint {root / 'step_0000002'} is at " \
           "step 2 of 2" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])["final"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {k: v for r in rows if r["step"] == 2 for k, v in r.items() if k != "step"}
    assert final == {**trained, "step": 2, "already_complete": True}
    assert {k: v for k, v in _contents(out).items()
            if not k.startswith("checkpoints/")} == before
    assert not any(p.exists() for p in leftovers)
    assert _names(root) == ["latest", "step_0000002", "zero_to_fp32.py", "zero_to_torch.py"]


def test_deletions_queued_from_a_daemon_thread_finish_before_the_process_exits(tmp_path):
    """The SLURM job runs the trainer in a daemon thread (launch/slurm/job.py); the deletion
    thread took that flag from its creator, so the process's exit killed it: the checkpoint
    the last save pruned stayed half deleted in the finished run (a slow deletion stands in
    for 13 GB on a parallel filesystem)."""
    import subprocess
    import sys

    garbage = tmp_path / "deleting.tmp-step_0000002"
    (garbage / "zero").mkdir(parents=True)
    for i in range(20):
        (garbage / "zero" / f"{i}.pt").write_text("x")
    code = (
        "import shutil, sys, threading, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import runtime.checkpoint as ck\n"
        "real = shutil.rmtree\n"
        "def slow(path, *a, **k):\n"
        "    time.sleep(2)\n"
        "    real(path, *a, **k)\n"
        "shutil.rmtree = slow\n"
        "t = threading.Thread(target=ck.delete_in_background, args=([sys.argv[2]],),\n"
        "                     daemon=True)\n"
        "t.start(); t.join()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ck.__file__).rsplit("/", 2)[0],
                           str(garbage)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not garbage.exists()
