"""Test helpers for the data tests: a real S3-protocol server (moto's server mode, in a
subprocess so that stopping it really drops connections) and small shard builders."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1:port; start/stop/restart with bounded waits.

    moto keeps its buckets in memory: after a restart they are gone and must be uploaded
    again.
    """

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **CREDENTIALS})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto server did not answer on {self.endpoint} in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=CREDENTIALS["AWS_DEFAULT_REGION"])

    def upload(self, bucket: str, files: list[Path], prefix: str = "") -> list[str]:
        """Create ``bucket`` and upload ``files``; return their s3:// URLs."""
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        urls = []
        for f in files:
            s3.upload_file(str(f), bucket, prefix + f.name)
            urls.append(f"s3://{bucket}/{prefix}{f.name}")
        return urls


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
