"""`submit --wait` keeps waiting through a requeue (real single-node SLURM).

`scontrol requeue` sends SIGTERM to the job's processes: it kills the data-loader workers
(data.workers=1 here), the training raises and submitit writes an ("error", ...) result
for every task before SLURM requeues the job. Those results are a requeued run's, not the
job's: the wait must go on through the requeue and report how the restarted run ends.
The wait runs here in this process (launch.slurm.wait, as `submit --wait` calls it) with
a short exit grace, so that the job pending after its requeue outlasts it in seconds.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import submitit
from submitit.core.utils import pickle_load

from launch.slurm.wait import failure, wait_for
from tests.pretrain_utils import REPO, latest, losses
from tests.slurm_cluster import SlurmCluster, running_cluster
from tests.test_submit_slurm import first_job_id, job_env, release, submit_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

# The requeue lands after the first checkpoint (step 4) and before the last step: 8 steps
# and 2 saves later, seconds even on an idle machine; the restarted run then has only
# those to do (20 steps and a save every 5 made it train and save more, for no assertion)
STEPS = 12
CHECKPOINT_EVERY = 4
EXIT_GRACE_S = 15.0  # the run's processes exit after its results (loaded machine)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def test_wait_goes_on_through_a_requeue_whose_tasks_wrote_errors(cluster: SlurmCluster,
                                                                 cache, tmp_path):
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    cmd = submit_cmd(logs, run_dir, job=("--max-steps", str(STEPS), "--checkpoint-every",
                                         str(CHECKPOINT_EVERY), "data.workers=1"))
    proc = subprocess.run(cmd, env=job_env(cluster, cache), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    job = submitit.SlurmJob(folder=logs / job_id, job_id=job_id, tasks=(0, 1))
    waited: dict = {}

    def wait() -> None:
        waited["state"] = wait_for(job, poll_s=0.5, exit_grace_s=EXIT_GRACE_S)
        waited["at"] = time.time()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    t0 = time.time()
    try:
        assert first_job_id(run_dir) == job_id
        deadline = time.time() + 180
        while latest(run_dir) is None and time.time() < deadline:
            time.sleep(0.05)
        assert latest(run_dir) not in (None, f"step_{STEPS:07d}"), latest(run_dir)
        print(f"checkpoint {latest(run_dir)} at {time.time() - t0:.1f}s")
        cluster.cmd("scontrol", "requeue", job_id)  # SIGTERM, then SIGKILL
        requeued = time.time()
        cluster.wait_job(job_id, lambda j: int(j.get("Restarts", "0")) >= 1
                         and j.get("JobState") == "PENDING", 90, "the requeue")
        # the case at hand: every task of the requeued run wrote an error
        for k in (0, 1):
            assert pickle_load(job.task(k).paths.result_pickle)[0] == "error"
        # the old wait gave up EXIT_GRACE_S after the errors and returned PENDING
        time.sleep(max(0.0, requeued + EXIT_GRACE_S + 2 - time.time()))
        assert waiter.is_alive(), f"the wait returned during the requeue: {waited}"
        print(f"pending at {time.time() - t0:.1f}s")
        release(cluster, job_id)
        print(f"released at {time.time() - t0:.1f}s")
        waiter.join(timeout=240)
        assert not waiter.is_alive(), "the wait did not end with the restarted job"
    finally:
        cluster.cmd("scancel", job_id, check=False)
    print(f"wait returned {waited} at {waited.get('at', 0) - t0:.1f}s")
    assert waited["state"] == "COMPLETED"
    assert cluster.job(job_id)["JobState"] == "COMPLETED"
    assert failure(job, waited["state"]) is None
    assert latest(run_dir) == f"step_{STEPS:07d}"
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
