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

from launch.slurm import wait
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
def test_a_long_log_is_read_from_its_end_only(tmp_path, monkeypatch):
    """A weeks-long attempt's log (4 MiB here, read with a 64 KiB bound in place of the
    real 256 KiB: the same code at a smaller scale; its start line at the top, an earlier
    attempt's refusal before it): the report reads a bounded end of each log, and still
    finds the last attempt's refusal there (the attempt began before that end)."""
    monkeypatch.setattr(wait, "LOG_TAIL_BYTES", 64 << 10)
    body = "".join(f"step {i} loss 1.234 lr 1e-4 throughput 123.4 img/s\n"
                   for i in range(1000)).encode()
    job = _failed_job(tmp_path, {k: "" for k in (0, 1)})
    for task in (0, 1):
        paths = job.task(task).paths
        with open(paths.stderr, "wb") as f:
            f.write((_start(0, task) + FIRST + "\n" + _start(1, task)).encode())
            while f.tell() < 4 << 20:
                f.write(body)
            f.write((LAST + "\n" + _trace(task, 2)).encode())
        with open(paths.stdout, "wb") as f:
            while f.tell() < 4 << 20:
                f.write(body)
    before = _bytes_read()
    why = failure(job, "FAILED")
    read = _bytes_read() - before
    assert why.split("\n", 1)[0] == f"job {JOB_ID} ended in state FAILED: {LAST}"
    assert "RuntimeError: `internimage pretrain --output-dir /r` exited with status 2" in why
    # 4 x 64 KiB of logs, and whatever else the report reads; any one whole log is 4 MiB
    assert read < 2 << 20, f"read {read} bytes of logs of 4 x 4 MiB"


def _bar(i: int, n: int = 100_000) -> str:
    """One redraw of a progress bar as tqdm writes it to a file: a carriage return before
    it, no newline after it (the next redraw overwrites it on a terminal)."""
    return f"\rtrain: {100 * i // n:3d}%|{'#' * (10 * i // n):<10}| {i:6d}/{n} [00:12<00:34]"


def _bars(first: int, last: int) -> str:
    return "".join(_bar(i) for i in range(first, last + 1))  # ~52 bytes a redraw


def _shown_bars(why: str) -> list[str]:
    """The lines of the stderr log's tail in the report that are whole redraws of the bar
    (a redraw the tail's bound cut would not be one)."""
    tail = why.split("_log.err <==\n", 1)[1].split("\n==> ", 1)[0].split("\n")
    bars = [line for line in tail if line.startswith("train: ")]
    for line in bars:  # whole, not the end of one the bound cut
        assert _bar(int(line.rsplit("| ", 1)[1].split("/")[0])).lstrip("\r") == line, line
    return bars


def test_a_log_ending_in_a_progress_bar_shows_its_last_redraws(tmp_path):
    """The task was killed (a crash of the node, say) while a progress bar was redrawn
    with carriage returns and no newline: the log's whole last 256 KiB is one bar's
    redraws. The report shows the last of them, not an empty log tail."""
    job = _failed_job(tmp_path, {k: "" for k in (0, 1)}, status=1)
    path = Path(job.task(0).paths.stderr)
    path.write_text(_start(0) + "step 1 loss 1.0\n" + _bars(1, 10_000))
    bars = _shown_bars(failure(job, "NODE_FAIL"))
    assert bars and bars[-1] == _bar(10_000).lstrip("\r")


def test_redraws_at_the_start_of_a_logs_end_are_not_dropped(tmp_path):
    """The bar's redraws fill the log's last 256 KiB but for its last few lines: the
    report shows the last redraws before those lines, as it would for a shorter log, not
    the few lines alone."""
    job = _failed_job(tmp_path, {k: "" for k in (0, 1)}, status=1)
    path = Path(job.task(0).paths.stderr)
    path.write_text(_start(0) + "step 1 loss 1.0\n" + _bars(1, 10_000) + "\n"
                    + "RuntimeError: CUDA error: an illegal memory access was encountered\n")
    why = failure(job, "FAILED")
    assert "RuntimeError: CUDA error: an illegal memory access" in why
    bars = _shown_bars(why)
    assert bars and bars[-1] == _bar(10_000).lstrip("\r")


def test_the_start_line_is_the_one_job_py_logs():
    """ATTEMPT_START is built from the format the job logs with, and matches a whole line
    of it (whatever the job id, master and run dir hold)."""
    from launch.slurm.job import START_LINE

    for args in (("4242", 0, 2, "node1", 0, 0, 3, "/r"),
                 ("4242_7", 15, 16, "gpu-a (b)", 12, 3, 100, "/runs/my run (2)")):
        line = START_LINE % args
        assert ATTEMPT_START.search(f"2024-01-01 00:00:00,000 INFO launch.slurm.job: {line}")
        assert ATTEMPT_START.fullmatch(line) is not None
    assert not ATTEMPT_START.search("job 4242 task 0/2 (master node1) started")


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
