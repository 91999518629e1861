"""A real single-node SLURM for tests: munged, slurmctld -D and slurmd -D in a temp folder.

`running_cluster` (the body of a session-scoped fixture) installs Debian's slurm-wlm and munge where
missing, writes a slurm.conf for this machine, starts the daemons, waits until the node is
idle, points SLURM_CONF at the conf for this process (and so for the jobs it submits) and
stops everything afterwards. Tests skip, naming the reason, only where the daemons cannot
be installed or started.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = {"sbatch": "slurm-wlm", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm",
            "munged": "munge"}
SBIN = ("/usr/sbin", "/sbin")


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path=os.pathsep.join(SBIN))


def ensure_installed(timeout: float = 600) -> str | None:
    """Install the missing SLURM/munge packages with apt; the reason it failed, or None."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if _which(cmd) is None})
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM not installed ({' '.join(missing)}) and cannot apt-get install as non-root"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                       timeout=timeout, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env,
                       capture_output=True, timeout=timeout, check=True)
    except (subprocess.SubprocessError, OSError) as err:
        return f"could not install {' '.join(missing)} with apt-get: {err}"
    gone = [cmd for cmd in PACKAGES if _which(cmd) is None]
    return f"still missing after apt-get install: {gone}" if gone else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mb() -> int:
    """A bit below the machine's free memory, so slurmd never drains the node for it."""
    out = subprocess.run(["free", "-m"], capture_output=True, text=True, check=True).stdout
    total = int(out.splitlines()[1].split()[1])
    return max(256, int(total * 0.9) - 512)


def write_conf(root: Path, node: str, cpus: int) -> Path:
    """slurm.conf for one node, state and spool under ``root``, ports picked free."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "ClusterName=internimage-test",
        f"SlurmctldHost={node}",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        # Requeue (by submitit on its signal, or by `scontrol requeue`) must be allowed.
        "JobRequeue=1",
        # Short waits keep the requeue and time-out tests quick.
        "KillWait=3",
        "MinJobAge=600",
        # job ids of their own: submitit derives a job's rendezvous port from its id
        # (helpers.TorchDistributedEnvironment: random.Random(job_id) in 20000-60000), so two
        # test clusters running at once, both counting from 1, gave their first jobs the
        # same port ("EADDRINUSE" in a 3-worker run)
        f"FirstJobId={random.randint(1000, 1_000_000)}",
        "SlurmdTimeout=60",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mb()} "
        "State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class SlurmCluster:
    """A running single-node cluster; ``env`` is what client commands and jobs need."""

    root: Path
    conf: Path
    node: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
        return os.environ | {"SLURM_CONF": str(self.conf), "PATH": path}

    def cmd(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """Run a SLURM client command (sinfo, scontrol, squeue...) against this cluster."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, TimeLimit, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
        """Poll `scontrol show job` until ``predicate(info)`` holds; fail after ``timeout``."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if predicate(info):
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: timed out waiting for {what}; last: {info}\n"
                             f"{self.logs_tail()}")

    def node_state(self) -> str:
        """The node's state as sinfo gives it (idle, allocated, completing, ...)."""
        return self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).strip()

    def wait_node_idle(self, timeout: float) -> None:
        """Until the node is idle: no job on it, the last one's clean-up done."""
        deadline = time.time() + timeout
        while not self.node_state().startswith("idle"):
            if time.time() > deadline:
                raise AssertionError(f"node not idle after {timeout}s "
                                     f"(sinfo: {self.node_state()!r})\n{self.logs_tail()}")
            time.sleep(0.2)

    def end_submission(self, proc: subprocess.Popen, job_id: str | None) -> None:
        """A test's clean-up of its `internimage submit` process and job, whatever state
        they are in: the process killed if it still runs, the job cancelled."""
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if job_id is not None:
            self.cmd("scancel", job_id, check=False)

    def logs_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons this cluster started, bounded."""
        try:  # jobs' slurmstepd processes outlive slurmd: end them first
            self.cmd("scancel", "--partition=debug", check=False, timeout=10)
            deadline = time.time() + 20
            while self.cmd("squeue", "-h", check=False, timeout=10).strip():
                if time.time() > deadline:
                    break
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _start_munge(root: Path) -> subprocess.Popen:
    mdir = root / "munge"
    mdir.mkdir(mode=0o700, exist_ok=True)
    key = Path("/etc/munge/munge.key")
    if not key.is_file():  # a fresh key for this cluster only
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    return subprocess.Popen(
        [_which("munged") or "munged", "-F", "--force", f"--key-file={key}",
         f"--socket={mdir / 'munge.socket'}", f"--pid-file={mdir / 'munged.pid'}",
         f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_controller(cluster: SlurmCluster, deadline: float) -> None:
    """Until `scontrol ping` says slurmctld is UP (or raise, having stopped the cluster)."""
    answer = ""
    while time.time() < deadline:
        if cluster.procs[-1].poll() is not None:
            break
        answer = cluster.cmd("scontrol", "ping", check=False, timeout=10).strip()
        if "is UP" in answer:
            return
        time.sleep(0.1)
    cluster.stop()
    raise RuntimeError(f"slurmctld not answering (scontrol ping: {answer!r})\n"
                       f"{cluster.logs_tail()}")


def start_cluster(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld -D, slurmd -D; return once the node is idle (or raise,
    with whatever was started stopped: a client command timing out included)."""
    node = socket.gethostname().split(".")[0]
    conf = write_conf(root, node, os.cpu_count() or 1)
    cluster = SlurmCluster(root, conf, node)
    try:
        return _start_daemons(cluster, root, conf, timeout)
    except BaseException:
        cluster.stop()  # bounded; a second stop of stopped daemons is a no-op
        raise


def _start_daemons(cluster: SlurmCluster, root: Path, conf: Path,
                   timeout: float) -> SlurmCluster:
    env = cluster.env
    cluster.procs.append(_start_munge(root))
    sock = root / "munge" / "munge.socket"
    deadline = time.time() + 20
    while not sock.exists() and time.time() < deadline:
        time.sleep(0.1)
    deadline = time.time() + timeout
    for daemon in ("slurmctld", "slurmd"):
        log = (root / f"{daemon}.out").open("w")
        cluster.procs.append(subprocess.Popen(
            [_which(daemon) or daemon, "-D", "-f", str(conf)], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))
        if daemon == "slurmctld":
            # slurmd registers with the controller as it starts: start it once the
            # controller answers (polled: it takes from a fraction of a second to seconds)
            _wait_for_controller(cluster, deadline)
    state = ""
    while time.time() < deadline:
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            cluster.stop()
            raise RuntimeError(f"daemon(s) exited: {dead}\n{cluster.logs_tail()}")
        state = cluster.node_state()
        if state.startswith("idle"):
            return cluster
        time.sleep(0.2)
    cluster.stop()
    raise RuntimeError(f"node not idle after {timeout}s (sinfo: {state!r})\n"
                       f"{cluster.logs_tail()}")


def running_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """Body of a session fixture: a running single-node SLURM, SLURM_CONF and PATH set for
    this process (so for `internimage submit` and its jobs) until the session ends."""
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = start_cluster(root)
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"could not start SLURM daemons: {err}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ.update({k: cluster.env[k] for k in saved})
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cluster.stop()
