"""A job whose task failed is requeued by its batch script's exit trap
(launch/slurm/after_exit.py), within bounds: not a cancelled job, not one SLURM requeues
itself, not a completed run or one that gave up on its time-outs, and not a failure
(a refused resume included) that keeps coming back before the run saves again.

The SLURM states the rules read are what this project's test cluster (Slurm 22.05, the
one tests/slurm_cluster.py starts) shows from inside a batch script's EXIT trap: after a
task exits non-zero under ``srun --kill-on-bad-exit``, ``JobState=RUNNING`` and
``Restarts`` unchanged; after ``scancel`` or ``scontrol requeue`` of the running job,
``JobState=COMPLETING`` (a requeue with ``Restarts`` one higher). The real requeue of a
killed task is tests/test_submit_slurm.py's.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from launch.cli import main
from launch.slurm.after_exit import decide, slurm_ended_it, trap_lines

# own_checkpoint(): the tag checkpoints/latest holds, its save's saved_at, the mtime of latest
CKPT = ["step_0000006", 1764800000.25, 5678]


def _start(attempt: int) -> dict:
    return {"event": "start", "job_id": "7", "requeue": attempt}


def _decide(status=137, state="RUNNING", restarts=0, attempt=0, records=None,
            checkpoint=CKPT, limit=2):
    records = [_start(attempt)] if records is None else records
    return decide(status, state, restarts, attempt, records, checkpoint, limit)


def test_a_failed_task_of_a_running_attempt_is_requeued():
    requeue, why = _decide()
    assert requeue and "status 137" in why


@pytest.mark.parametrize(("state", "restarts"), [
    ("COMPLETING", 0),  # scancel of the running job
    ("COMPLETING", 1),  # scontrol requeue / the signal handler's requeue
    ("RUNNING", 1),     # SLURM restarted it already
    ("CANCELLED", 0), ("FAILED", 0), ("TIMEOUT", 0), ("NODE_FAIL", 0), (None, None)])
def test_a_job_slurm_ends_or_requeues_by_itself_is_left_to_slurm(state, restarts):
    assert slurm_ended_it(state, restarts, 0)
    requeue, why = _decide(state=state, restarts=restarts)
    assert not requeue and "SLURM ended or requeued this attempt itself" in why


def test_an_unanswered_scontrol_is_a_failure_not_requeued_said_as_such():
    assert not slurm_ended_it("UNKNOWN", None, 0)  # not SLURM's doing: recorded
    requeue, why = _decide(state="UNKNOWN", restarts=None)
    assert not requeue and "scontrol did not answer" in why


def test_tasks_that_all_returned_are_not_requeued():
    assert _decide(status=0) == (False, "every task returned")


@pytest.mark.parametrize(("ended", "reason"), [
    ({"event": "gave_up"}, "--max-requeues"),
    ({"event": "ended", "status": 0, "refused": False}, "the run completed")])
def test_a_run_that_completed_or_gave_up_is_not_requeued(ended, reason):
    requeue, why = _decide(records=[_start(0), {**ended, "job_id": "7"}])
    assert not requeue and reason in why


def test_a_refusal_or_a_failed_signal_requeue_is_a_failure_like_any_other():
    # a resume refused (exit 2: e.g. the checkpoint load failed on a bad node's GPU)
    refused = [_start(0), {"event": "ended", "status": 2, "refused": True, "job_id": "7"}]
    assert _decide(records=refused)[0]
    # bounded as any failure: the same checkpoint, failure_requeues times
    again = [*refused, {"event": "failure_requeue", "checkpoint": CKPT}, _start(1),
             {"event": "ended", "status": 2, "refused": True, "job_id": "7"}]
    assert not _decide(restarts=1, attempt=1, records=again, limit=1)[0]
    # the signal's handler asked for a requeue, yet SLURM runs the same attempt: it did
    # not happen (scontrol failed, or the rank died before asking)
    requeue, why = _decide(records=[_start(0), {"event": "requeue_requested",
                                                "job_id": "7"}])
    assert requeue and "signal's requeue did not happen" in why


def test_a_record_of_an_earlier_attempt_does_not_decide_this_one():
    # attempt 0 completed its signal's requeue; attempt 1 failed on its own
    records = [_start(0), {"event": "requeue_requested", "job_id": "7"},
               {"event": "ended", "status": 0, "refused": False}, _start(1)]
    assert _decide(restarts=1, attempt=1, records=records)[0]
    # attempt 1's run raised (rank 0 recorded its error): a failure
    crashed = [*records, {"event": "ended", "status": None, "refused": False,
                          "error": "RuntimeError('NCCL watchdog')"}]
    assert _decide(restarts=1, attempt=1, records=crashed)[0]


def test_a_run_stopped_by_a_non_finite_loss_is_not_requeued(tmp_path):
    """``run.on_nonfinite=stop`` raises NonFiniteLossError on every rank: rank 0's record of
    it (TrainingJob._record_end) tells the exit trap that a requeue would diverge again
    from the same checkpoint; another error is still a failure worth a requeue."""
    from launch.slurm.environment import TaskInfo, read_records, record
    from launch.slurm.job import TrainingJob
    from pretrain.trainer import NonFiniteLossError

    info = TaskInfo("7", 0, 0, 2, "node1", "slurm")
    record(tmp_path, "start", info, requeue=0)
    TrainingJob._record_end(tmp_path, info, 0, None,
                            NonFiniteLossError("non-finite loss (nan) at step 12"))
    requeue, why = _decide(records=read_records(tmp_path))
    assert not requeue and "a retry cannot help" in why and "step 12" in why
    other = tmp_path / "other"
    record(other, "start", info, requeue=0)
    TrainingJob._record_end(other, info, 0, None, RuntimeError("NCCL watchdog timeout"))
    assert _decide(records=read_records(other))[0]


def test_a_failure_that_returns_before_a_new_checkpoint_is_tried_a_bounded_number_of_times():
    records = []
    for attempt in range(3):
        records.append(_start(attempt))
        requeue, why = _decide(restarts=attempt, attempt=attempt, records=records, limit=2)
        if attempt < 2:
            assert requeue, (attempt, why)
            records.append({"event": "failure_requeue", "checkpoint": CKPT})
        else:
            assert not requeue and "failed 3 times without a new checkpoint" in why
    # the run saved since: the same failure count starts afresh
    records.append(_start(3))
    saved = ["step_0000008", 1764800100.5, 9999]
    assert _decide(restarts=3, attempt=3, records=records, checkpoint=saved)[0]
    # a record of the version that keyed on [inode, mtime]: the same save by its mtime
    legacy = [_start(0), {"event": "failure_requeue", "checkpoint": [4321, CKPT[2]]},
              _start(1)]
    assert not _decide(restarts=1, attempt=1, records=legacy, limit=1)[0]
    assert _decide(restarts=1, attempt=1, records=legacy, limit=1,
                   checkpoint=["step_0000006", 1764800000.25, 5679])[0]
    # no checkpoint at all yet (None) is one position like any other
    fresh = [_start(0), {"event": "failure_requeue", "checkpoint": None}, _start(1)]
    assert not _decide(restarts=1, attempt=1, records=fresh, checkpoint=None, limit=1)[0]


def test_the_trap_hands_srun_s_exit_status_and_the_run_dir_to_the_module(tmp_path):
    """The lines the sbatch script gets, run by bash: the function the EXIT trap calls
    sees the exit status of the script's last command (srun's), and a run dir with a
    space and a quote arrives as one argument."""
    fake = tmp_path / "python"
    seen = tmp_path / "argv.txt"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {seen}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    run_dir = tmp_path / "it's a run"
    script = tmp_path / "job.sh"
    script.write_text("\n".join(["#!/bin/bash", *trap_lines(str(fake), run_dir, 3),
                                 "sh -c 'exit 137'", ""]))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr  # the job's own status is kept
    assert seen.read_text().splitlines() == [
        "-m", "launch.slurm.after_exit", "--status", "137", "--run-dir", str(run_dir),
        "--failure-requeues", "3"]
    assert trap_lines(str(fake), run_dir, 0) == []  # 0: no trap at all


def test_dry_run_script_has_the_trap_after_the_profiles_set_up(capsys, tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("setup: ['module load cuda']\n")
    run_dir = tmp_path / "run"
    assert main(["submit", "--profile", str(profile), "--dry-run", "--failure-requeues", "4",
                 "pretrain", "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "failure_requeues: 4" in out
    lines = out.splitlines()
    load, trap, srun = (next(i for i, x in enumerate(lines) if x.startswith(p))
                        for p in ("module load cuda", "trap internimage_after_exit EXIT",
                                  "srun "))
    assert load < trap < srun
    assert (f"{sys.executable} -m launch.slurm.after_exit --status \"$status\" --run-dir "
            f"{run_dir} --failure-requeues 4") in out
    # requeueable whatever the site's JobRequeue: the trap's `scontrol requeue`, the
    # signal's, and SLURM's own after a node failure
    assert "#SBATCH --requeue" in out
    assert main(["submit", "--dry-run", "--failure-requeues", "0", "pretrain"]) == 0
    assert "after_exit" not in capsys.readouterr().out
    for said in ("{no-requeue: true}", "{requeue: false}", "{no_requeue: true}"):
        profile.write_text(f"sbatch_extra: {said}\n")  # a site's choice is kept
        assert main(["submit", "--profile", str(profile), "--dry-run", "pretrain"]) == 0
        out = capsys.readouterr().out
        assert "#SBATCH --no-requeue" in out and "--requeue" not in out.replace(
            "--no-requeue", ""), said  # never `--requeue=False`, which sbatch refuses
    assert main(["submit", "--dry-run", "--failure-requeues", "-1", "pretrain"]) == 2
    assert "failure_requeues" in capsys.readouterr().err


def _fake_scontrol(tmp_path, monkeypatch, answer: str, requeue_status: int = 0,
                   silent: int = 0):
    """A stand-in ``scontrol`` on PATH: ``show job`` prints ``answer`` (nothing for its
    first ``silent`` calls: a controller that does not answer), ``requeue`` exits with
    ``requeue_status``; every call is logged to calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                        f"if [ \"$1\" = requeue ]; then echo refused >&2; "
                        f"exit {requeue_status}; fi\n"
                        f"[ $(grep -c show {calls}) -le {silent} ] && exit 1\n"
                        f"echo '{answer}'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return calls


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "slurm_jobs.jsonl").read_text().splitlines()]


RUNNING = "JobId=7 JobState=RUNNING Restarts=0 Reason=None"


def test_the_module_records_its_decision_and_asks_slurm_to_requeue(tmp_path, monkeypatch):
    """The trap's entry point: SLURM's answer and the run's records in, the decision
    recorded in slurm_jobs.jsonl and ``scontrol requeue <job>`` run."""
    from launch.slurm import after_exit

    calls = _fake_scontrol(tmp_path, monkeypatch, RUNNING)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slurm_jobs.jsonl").write_text(json.dumps(_start(0)) + "\n")
    argv = ["--status", "137", "--run-dir", str(run_dir), "--failure-requeues", "1"]
    assert after_exit.main(argv) == 0
    assert calls.read_text().splitlines() == ["show job -o 7", "requeue 7"]
    last = _rows(run_dir)[-1]
    assert last["event"] == "failure_requeue" and last["checkpoint"] is None
    assert last["requeue"] == 1 and last["status"] == 137
    # the same failure again before any checkpoint: recorded, not requeued
    calls.unlink()
    assert after_exit.main(argv) == 0
    assert calls.read_text().splitlines() == ["show job -o 7"]
    last = _rows(run_dir)[-1]
    assert last["event"] == "failure_not_requeued" and "failure_requeues=1" in last["why"]


def test_a_requeue_scontrol_refuses_is_recorded_and_one_slurm_made_is_not(tmp_path,
                                                                         monkeypatch):
    from launch.slurm import after_exit

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slurm_jobs.jsonl").write_text(json.dumps(_start(0)) + "\n")
    argv = ["--status", "1", "--run-dir", str(run_dir), "--failure-requeues", "2"]
    _fake_scontrol(tmp_path, monkeypatch, RUNNING, requeue_status=1)
    assert after_exit.main(argv) == 0
    requested, failed = _rows(run_dir)[-2:]
    assert requested["event"] == "failure_requeue"
    assert failed["event"] == "failure_requeue_failed" and "refused" in failed["error"]
    # a requeue SLURM is making (srun returned before the batch shell's SIGTERM): the
    # record of the run is left as it was
    before = _rows(run_dir)
    _fake_scontrol(tmp_path, monkeypatch, "JobId=7 JobState=COMPLETING Restarts=1")
    assert after_exit.main(argv) == 0
    assert _rows(run_dir) == before


def test_an_unanswered_scontrol_is_asked_again(tmp_path, monkeypatch):
    """A busy controller (scontrol without an answer) is asked again before anything is
    decided: the job still runs its attempt, so the answer that comes is acted on."""
    from launch.slurm import after_exit

    monkeypatch.setattr(after_exit, "ASK_EVERY_S", 0.0)
    calls = _fake_scontrol(tmp_path, monkeypatch, RUNNING, silent=after_exit.ASKS - 1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slurm_jobs.jsonl").write_text(json.dumps(_start(0)) + "\n")
    argv = ["--status", "1", "--run-dir", str(run_dir), "--failure-requeues", "2"]
    assert after_exit.main(argv) == 0
    assert calls.read_text().splitlines() == ["show job -o 7"] * after_exit.ASKS + [
        "requeue 7"]
    # never answering: a failure not requeued, said as such
    calls.unlink()
    _fake_scontrol(tmp_path, monkeypatch, RUNNING, silent=after_exit.ASKS)
    assert after_exit.main(argv) == 0
    assert "requeue 7" not in calls.read_text()
    last = _rows(run_dir)[-1]
    assert last["event"] == "failure_not_requeued" and "did not answer" in last["why"]


def test_a_job_record_is_on_disk_before_record_returns(tmp_path, monkeypatch):
    """The exit trap counts the job's failure_requeue lines: each is fsynced before the
    trap asks for the requeue (a batch host that crashed lost the last ones from its
    page cache, and the bound then counted one failure fewer)."""
    import launch.slurm.environment as environment
    from launch.slurm.environment import TaskInfo, read_records, record

    synced = []
    real = os.fsync
    monkeypatch.setattr(environment.os, "fsync",
                        lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    record(tmp_path, "failure_requeue", TaskInfo("7", 0, 0, 2, "node1", "slurm"), requeue=1)
    assert synced == [os.path.realpath(tmp_path / "slurm_jobs.jsonl")]
    assert read_records(tmp_path)[-1]["event"] == "failure_requeue"


def test_refused_attempts_count_until_an_attempt_gets_past_its_start():
    """A refused attempt is no progress whatever the checkpoint does (a second submission
    refused by the run lock while the first job saves: bounded), but a job that trains
    between sporadic refusals (a lock file the file system failed to read once) goes on:
    counted over the job's whole life, its third such refusal ended it."""
    refused = {"event": "ended", "status": 2, "refused": True, "job_id": "7"}
    ran = {"event": "ended", "status": None, "refused": False, "error": "NCCL timeout",
           "job_id": "7"}
    records: list[dict] = []
    for attempt in range(6):  # refused, trained (then crashed at a newer checkpoint), ...
        records += [_start(attempt), refused if attempt % 2 == 0 else ran]
        checkpoint = [f"step_{1000 * attempt:07d}", 1764800000.0 + attempt, attempt]
        requeue, why = _decide(status=2, restarts=attempt, attempt=attempt, records=records,
                               checkpoint=checkpoint, limit=2)
        assert requeue, (attempt, why)
        records.append({"event": "failure_requeue", "checkpoint": checkpoint})
    # refused again and again, the other job saving each time: two requeues, then left
    for attempt in range(6, 9):
        records += [_start(attempt), refused]
        checkpoint = [f"step_{1000 * attempt:07d}", 1764800000.0 + attempt, attempt]
        requeue, why = _decide(status=2, restarts=attempt, attempt=attempt, records=records,
                               checkpoint=checkpoint, limit=2)
        assert requeue == (attempt < 8), (attempt, why)
        records.append({"event": "failure_requeue", "checkpoint": checkpoint})


def test_an_attempt_slurm_ended_itself_breaks_a_streak_of_refusals():
    """An attempt SLURM requeued itself (a time limit, a preemption) leaves only its start
    record, and it trained: the refusals before it are no part of the streak after it.
    Counted on, the job's second refusal after it ended the job 'without a new
    checkpoint' (failure_requeues=2)."""
    refused = {"event": "ended", "status": 2, "refused": True, "job_id": "7"}
    records = [_start(0), refused, {"event": "failure_requeue", "checkpoint": CKPT},
               _start(1)]  # trained; SLURM requeued it at its time limit: no record after
    for attempt in (2, 3):
        records += [_start(attempt), refused]
        requeue, why = _decide(status=2, restarts=attempt, attempt=attempt, records=records,
                               limit=2)
        assert requeue, (attempt, why)
        records.append({"event": "failure_requeue", "checkpoint": CKPT})
    records += [_start(4), refused]  # the third refusal since: the bound holds
    assert not _decide(status=2, restarts=4, attempt=4, records=records, limit=2)[0]


def test_refused_starts_before_an_attempt_that_trained_are_not_charged_to_it():
    """Refused twice (the run lock, just after scancel), then trained for days and saved;
    then SIGKILLed by srun after another task failed: rank 0 wrote no ``ended`` record.
    That attempt is judged by the checkpoint, not charged with the refusals before it (it
    was ended 'refused at their start')."""
    refused = {"event": "ended", "status": 2, "refused": True, "job_id": "7"}
    records = []
    for attempt in (0, 1):
        records += [_start(attempt), refused,
                    {"event": "failure_requeue", "checkpoint": CKPT}]
    records.append(_start(2))  # trained; killed without a record
    newer = ["step_0005000", 1764900000.0, 9999]
    requeue, why = _decide(status=137, restarts=2, attempt=2, records=records,
                           checkpoint=newer, limit=2)
    assert requeue, why
    assert "requeue 1 of at most 2" in why
