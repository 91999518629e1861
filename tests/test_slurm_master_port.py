"""Each SLURM job gets its own rendezvous port, whatever the submitting shell exported.

sbatch passes the submitting shell's environment on (``--export=ALL``, its default), so a
MASTER_PORT set there (29500, torchrun's habit) reaches every job. submitit 1.5.4 takes an
existing MASTER_PORT as the job's port and derives one from the job id only when none is
set (submitit/helpers.py, ``TorchDistributedEnvironment._get_master_port``: a
``random.Random(job_id)`` draw in [20000, 60000]). Two jobs whose first node is the same
(shared nodes, or one-node jobs on a node with free GPUs) then both listen on 29500: the
second fails at rendezvous with EADDRINUSE, again at each requeue.
"""

from __future__ import annotations

import pytest

from launch.slurm.environment import export_distributed_env


def _task(monkeypatch, job_id: str, rank: int) -> None:
    """This process as task ``rank`` of 8 (4 per node) of job ``job_id`` on two nodes."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(key, "0")  # restored by monkeypatch after the test
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": job_id,
                       "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 4),
                       "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
                       "SLURM_NODEID": str(rank // 4),
                       "SLURM_JOB_NODELIST": "node[007-008]"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")  # exported by the submitting shell


def test_the_shells_master_port_is_not_the_jobs(monkeypatch):
    masters = {}
    for job_id in ("4101", "4102"):
        for rank in (0, 5):
            _task(monkeypatch, job_id, rank)
            info = export_distributed_env(cpus_per_task=2)
            masters.setdefault(job_id, set()).add(info.master)
    # every task of a job meets at the same address; the two jobs at different ports
    assert all(len(m) == 1 for m in masters.values()), masters
    (first,), (second,) = masters.values()
    assert first.startswith("node007:") and second.startswith("node007:")
    ports = {int(first.split(":")[1]), int(second.split(":")[1])}
    assert len(ports) == 2 and all(20000 <= p <= 60000 for p in ports), ports


@pytest.mark.parametrize("rank", [0, 5])
def test_tasks_get_their_rank_and_node_local_index(monkeypatch, rank):
    import os

    _task(monkeypatch, "4101", rank)
    info = export_distributed_env(cpus_per_task=2)
    assert (info.rank, info.local_rank, info.world_size) == (rank, rank % 4, 8)
    assert os.environ["MASTER_PORT"] == info.master.split(":")[1]
    assert os.environ["OMP_NUM_THREADS"] == "2"


def test_a_profiles_master_port_is_the_jobs(monkeypatch):
    """A cluster whose firewall opens only some ports sets the profile's master_port: every
    task takes it, whatever the shell exported."""
    from launch.slurm.profile import ClusterProfile

    for rank in (0, 5):
        _task(monkeypatch, "4101", rank)
        assert export_distributed_env(2, master_port=23456).master == "node007:23456"
    for bad in (0, 70000):
        with pytest.raises(ValueError, match="master_port"):
            ClusterProfile(master_port=bad)
