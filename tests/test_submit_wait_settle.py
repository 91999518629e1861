"""`submit --wait` on a job that SLURM preempts and requeues (PreemptMode=REQUEUE): the
job shows PREEMPTED (a final state, launch/slurm/wait.py SETTLING_STATES) before it goes
back to PENDING, and no task wrote a result. The wait must not report PREEMPTED before the
state has held for SETTLE_S, whatever the profile's result_grace_s (a file-system allowance,
2 s in the one-machine profile). The controller is scripted (``slurm_job``), the job and its
result file are submitit's own."""

from __future__ import annotations

import threading
import time

import submitit
from submitit.core.utils import cloudpickle_dump

import launch.slurm.wait as wait
from launch.slurm.wait import SlurmJobInfo

# seconds since the wait's start -> what `scontrol show job` says from then on
SCRIPT = [(0.0, "RUNNING", 0), (0.5, "PREEMPTED", 0), (2.0, "PENDING", 1),
          (2.5, "RUNNING", 1), (3.5, "COMPLETED", 1)]


def test_a_preemption_that_requeues_is_waited_through_with_a_short_result_grace(
        tmp_path, monkeypatch):
    job = submitit.SlurmJob(folder=tmp_path / "4242", job_id="4242", tasks=(0,))
    result = job.task(0).paths.result_pickle
    start = time.time()

    def scripted(job_id: str) -> SlurmJobInfo:
        now = time.time() - start
        _, state, restarts = [row for row in SCRIPT if row[0] <= now][-1]
        return SlurmJobInfo(state, restarts)

    def requeued_run_writes_its_result() -> None:  # the restarted run, before it ends
        time.sleep(3.0)
        cloudpickle_dump(("success", None), result)

    monkeypatch.setattr(wait, "slurm_job", scripted)
    monkeypatch.setattr(wait, "SETTLE_S", 4.0)  # longer than PREEMPTED holds here
    writer = threading.Thread(target=requeued_run_writes_its_result, daemon=True)
    writer.start()
    state = wait.wait_for(job, poll_s=0.1, grace_s=0.5, exit_grace_s=30)
    writer.join(timeout=30)
    assert state == "COMPLETED"
    assert time.time() - start >= 3.5


def test_a_preemption_that_holds_is_reported_after_settling(tmp_path, monkeypatch):
    """No requeue comes (PreemptMode=CANCEL, or requeue refused): PREEMPTED is the job's
    end, reported once it has held for SETTLE_S."""
    job = submitit.SlurmJob(folder=tmp_path / "4243", job_id="4243", tasks=(0,))
    monkeypatch.setattr(wait, "slurm_job", lambda job_id: SlurmJobInfo("PREEMPTED", 0))
    monkeypatch.setattr(wait, "SETTLE_S", 1.5)
    start = time.time()
    assert wait.wait_for(job, poll_s=0.1, grace_s=0.2) == "PREEMPTED"
    assert 1.5 <= time.time() - start < 10
