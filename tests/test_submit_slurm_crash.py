"""A task that fails ends the whole SLURM job (real single-node SLURM).

Without srun's --kill-on-bad-exit the other tasks of a job whose rank died wait for it in
the rendezvous or the next collective until torch's timeout (minutes), holding the
allocation; with it, srun ends them as soon as one task exits non-zero.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pretrain_utils import REPO, TINY, env
from tests.slurm_cluster import SlurmCluster, running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

# From task 0's exit to the job's end: srun's kill (SIGTERM, then SIGKILL after the test
# cluster's KillWait=3) and slurmctld's bookkeeping take seconds.
BOUND_S = 45


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def _job_id(logs: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The job id: the name of the job's folder under ``logs`` (``--folder logs/%j``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = [p.name for p in logs.iterdir() if p.name.isdigit()] if logs.is_dir() else []
        if ids:
            return ids[0]
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.2)
    raise AssertionError(f"no job folder under {logs} after {timeout}s")


def _wait_for_task0_exit(log: Path, timeout: float = 120) -> None:
    """Until srun reports task 0's non-zero exit in the job's log (srun(1) prints
    "<node>: task 0: Exited with exit code N", or a range "tasks 0-1: ...")."""
    pattern = re.compile(r"tasks? 0(-\d+)?: Exited with exit code [1-9]")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and pattern.search(log.read_text(errors="replace")):
            return
        time.sleep(0.2)
    raise AssertionError(f"task 0 did not exit non-zero within {timeout}s: {log}")


def test_a_failed_task_ends_the_job_promptly(cluster: SlurmCluster, cache, tmp_path):
    """Task 0 cannot open the rendezvous (its port is taken by another process) and exits
    non-zero; task 1 has reached that port and would wait for a rendezvous that never
    comes. The job must end, FAILED, within seconds of task 0's exit."""
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    with socket.socket() as holder:  # the rendezvous port, taken (listening, never answering)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        job_env = env(cache) | {"SLURM_CONF": cluster.env["SLURM_CONF"],
                                "PATH": cluster.env["PATH"]}
        # local_cpu (this one machine's result_grace_s, 2 s: task 1, killed by srun, writes
        # no result, and --wait reports it 2 s after the job's end, not 15 s) with the taken
        # port as the profile's master_port
        profile = tmp_path / "profile.yaml"
        # (failure_requeues 0: the job's exit trap would requeue this failure, which
        # tests/test_submit_slurm.py checks; here the job must end)
        profile.write_text((REPO / "configs/launch/local_cpu.yaml").read_text()
                           + f"master_port: {port}\nfailure_requeues: 0\n")
        cmd = [sys.executable, "-m", "launch.cli", "submit", "--profile", str(profile),
               "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
               "--folder", str(logs / "%j"), "--wait",
               "pretrain", "--output-dir", str(run_dir), "--max-steps", "5", *TINY]
        proc = subprocess.Popen(cmd, env=job_env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        job_id = None
        try:
            job_id = _job_id(logs, proc)
            _wait_for_task0_exit(logs / job_id / f"{job_id}_0_log.err")
            exited = time.time()
            info = cluster.wait_job(job_id, lambda j: j.get("JobState") not in (
                "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), BOUND_S,
                f"the job to end within {BOUND_S} s of task 0's exit")
            print(f"job {job_id} ended {time.time() - exited:.1f} s after task 0 exited")
            out, err = proc.communicate(timeout=60)
        finally:
            cluster.end_submission(proc, job_id)
    assert info["JobState"] == "FAILED"
    assert proc.returncode == 1 and f"job {job_id}" in err, err[-4000:]
    assert out.strip().splitlines()[-1] == job_id
