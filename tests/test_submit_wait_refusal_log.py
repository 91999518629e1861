"""`submit --wait` shows the line with which the job's last attempt refused, not one an
earlier attempt left in the same log, and reads only the end of a long log.

submitit names a task's stderr log ``<job id>_<task>_log.err`` and SLURM appends to it
(``--open-mode=append``) at every requeue of the job: one file holds every attempt, and
each attempt of a task starts with TrainingJob's "job ... task ... restart N" line.

No SLURM needed: the tasks' result files and logs are written here as submitit's tasks
leave them (one test runs the real submitit task entry point, twice, as SLURM would).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import cloudpickle_dump

from launch.slurm.wait import ATTEMPT_START, failure, refusal, task_outcome

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "4242"


def _start(restart: int, task: int = 0) -> str:
    """The line TrainingJob logs at each start of a task (launch/slurm/job.py)."""
    return (f"2024-01-0{restart + 1} 00:00:00,000 INFO launch.slurm.job: job {JOB_ID} task "
            f"{task}/2 (master node1), restart {restart} (0 for the time limit, at most 3 "
            f"allowed; preemptions unlimited), run dir /r\n")


def _trace(task: int, status: int) -> str:
    return ("Traceback (most recent call last):\n" + '  File "x.py", line 1\n' * 30
            + f"RuntimeError: `internimage pretrain --output-dir /r` exited with status "
            f"{status} (job {JOB_ID}, task {task})\n")


def _failed_job(tmp_path: Path, logs: dict[int, str], status: int = 2) -> submitit.Job:
    """A 2-task SLURM job whose last attempt's tasks both raised TrainingJob's error for
    ``status``; task k's stderr log is ``logs[k]`` followed by that traceback."""
    job = submitit.SlurmJob(folder=tmp_path, job_id=JOB_ID, tasks=(0, 1))
    for task in (0, 1):
        cloudpickle_dump(("error", _trace(task, status)), job.task(task).paths.result_pickle)
        Path(job.task(task).paths.stderr).write_text(logs[task] + _trace(task, status))
    return job


FIRST = "internimage pretrain: /r/checkpoints/step_0000004: saved by 2 ranks, this run has 1"
LAST = "internimage pretrain: config error: unknown key 'no_such'"


def test_the_last_attempts_refusal_is_shown_not_an_earlier_ones(tmp_path):
    """Attempt 0 refused (the job was then requeued by hand, say), attempt 1 refused with
    another line: that one is how the job ended."""
    logs = {k: _start(0, k) + FIRST + "\n" + _trace(k, 2) + _start(1, k) + "loading...\n"
            + LAST + "\n" for k in (0, 1)}
    why = failure(_failed_job(tmp_path, logs), "FAILED")
    assert why.split("\n", 1)[0] == f"job {JOB_ID} ended in state FAILED: {LAST}"


def test_no_line_is_shown_when_the_last_attempt_printed_none(tmp_path):
    """The last attempt exited 2 without a refusal line: the earlier attempt's refusal is
    not passed off as its reason; the report is the tasks' details, as for any failure."""
    logs = {k: _start(0, k) + FIRST + "\n" + _trace(k, 2) + _start(1, k) + "loading...\n"
            for k in (0, 1)}
    job = _failed_job(tmp_path, logs)
    assert refusal(job, [task_outcome(job, k) for k in (0, 1)]) is None
    why = failure(job, "FAILED")
    assert why.startswith(f"job {JOB_ID} ended in state FAILED; 2 of 2 task(s) did not "
                          "succeed:")
    assert FIRST not in why.split("==>", 1)[0]  # the log tail may show it, as it is


def test_a_log_without_start_lines_is_read_as_one_attempt(tmp_path):
    """A log no start line marks (written before this marker existed): its last refusal
    line, as before."""
    logs = {k: FIRST + "\n" + LAST + "\n" for k in (0, 1)}
    why = failure(_failed_job(tmp_path, logs), "FAILED")
    assert why.split("\n", 1)[0] == f"job {JOB_ID} ended in state FAILED: {LAST}"


def _bytes_read() -> int:
    """What this process has read so far (read(2) and the like, page cache included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux's /proc/self/io")
def test_a_long_log_is_read_from_its_end_only(tmp_path):
    """A weeks-long attempt's log (64 MiB here, its start line at the top, an earlier
    attempt's refusal before it): the report reads a bounded end of each log, and still
    finds the last attempt's refusal there (the attempt began before that end)."""
    body = "".join(f"step {i} loss 1.234 lr 1e-4 throughput 123.4 img/s\n"
                   for i in range(1000)).encode()
    job = _failed_job(tmp_path, {k: "" for k in (0, 1)})
    for task in (0, 1):
        paths = job.task(task).paths
        with open(paths.stderr, "wb") as f:
            f.write((_start(0, task) + FIRST + "\n" + _start(1, task)).encode())
            while f.tell() < 64 << 20:
                f.write(body)
            f.write((LAST + "\n" + _trace(task, 2)).encode())
        with open(paths.stdout, "wb") as f:
            while f.tell() < 64 << 20:
                f.write(body)
    before = _bytes_read()
    why = failure(job, "FAILED")
    read = _bytes_read() - before
    assert why.split("\n", 1)[0] == f"job {JOB_ID} ended in state FAILED: {LAST}"
    assert "RuntimeError: `internimage pretrain --output-dir /r` exited with status 2" in why
    assert read < 4 << 20, f"read {read} bytes of logs of 4 x 64 MiB"


def test_the_start_line_the_job_writes_marks_each_attempt(tmp_path):
    """Two attempts of a task, run as SLURM runs them (submitit's task entry point, the
    job's stderr appended to one file), each refusing a different config error of the
    real `internimage pretrain`: each attempt's start is marked once in the log, before
    its refusal, and the second attempt's line is shown."""
    from launch.cli import main
    from launch.slurm.job import TrainingJob

    folder = tmp_path / "logs"
    folder.mkdir()
    job = submitit.SlurmJob(folder=folder, job_id=JOB_ID, tasks=(0,))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder),
                "SLURM_JOB_ID": JOB_ID, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                "SLURM_JOB_NODELIST": "node1", "PYTHONPATH": str(REPO)})
    for restart, key in enumerate(("first_bad_key", "second_bad_key")):
        argv = ["pretrain", "--output-dir", str(tmp_path / "run"), f"{key}=1"]
        delayed = submitit.helpers.DelayedSubmission(TrainingJob(argv, tmp_path / "run",
                                                                 entry=main))
        delayed.set_timeout(60, 3)
        delayed.dump(job.paths.submitted_pickle)  # what submitit rewrites at a requeue
        env["SLURM_RESTART_COUNT"] = str(restart)
        with open(job.paths.stderr, "a") as err:  # sbatch --open-mode=append
            subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                           timeout=120)
    log = Path(job.paths.stderr).read_text()
    # each attempt wrote one start line, before its refusal
    starts = [i for i, line in enumerate(log.splitlines()) if ATTEMPT_START.search(line)]
    refused = [i for i, line in enumerate(log.splitlines()) if "_bad_key'" in line]
    assert len(starts) == 2 and len(refused) == 2, log[-3000:]
    assert starts[0] < refused[0] < starts[1] < refused[1]
    outcomes = [task_outcome(job, 0)]
    assert outcomes[0].status == "error" and "exited with status 2 " in outcomes[0].detail
    shown = refusal(job, outcomes)
    assert shown is not None and shown.startswith("internimage pretrain: config error: ")
    assert "'second_bad_key'" in shown and "first_bad_key" not in shown
