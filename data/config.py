"""Typed configuration shared by every task's shard I/O: object storage access and retries.

``check`` is the one validation helper of the project's typed configs: ``launch.config``
turns the ``ValueError('key: message')`` it raises into a config error naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.redact import has_credential, redact_url, secret_field


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ValueError('key: message')`` unless ``ok``; the launcher turns it into a
    config error naming the key. Shared by every typed config of the project."""
    if not ok:
        raise ValueError(f"{key}: {message}")


def check_positive_finite(value: float, key: str) -> None:
    """``key`` must be a finite number > 0 (``inf`` and ``nan`` pass ``> 0`` checks or
    fail only later: an infinite lr trains until the loss is non-finite)."""
    check(math.isfinite(value) and value > 0, key, f"must be finite and > 0, got {value}")


def check_no_credentials(urls: Sequence[str] | str, key: str) -> None:
    """Shard URLs or patterns of a config (``key``'s) must not hold a credential's value (a
    presigned URL's signature, ``user:password@``, a token in a ``pipe:`` command): a
    config's values are written to the run's ``config.yaml`` and, through ``submit``, to
    the job's pickled command line and ``slurm_jobs.jsonl``, where only the credential
    fields (``data.s3.key``...) are left out."""
    for url in [urls] if isinstance(urls, str) else urls:
        check(not has_credential(url), key,
              f"{redact_url(url)!r} holds a credential, which the run would write to its "
              "config.yaml (and `submit` to the job's command line): list such URLs in a "
              ".txt shard list (the config keeps only its path), or let a pipe: command "
              "read it from the environment ($VAR, expanded when the command runs)")


# ~1.9 years: "never" for any job, and well inside what torch's millisecond count holds
MAX_COLLECTIVE_TIMEOUT_MIN = 1e6


def check_collective_timeout(minutes: float | None,
                             key: str = "run.collective_timeout_min") -> None:
    """A collective timeout in minutes (runtime/dist.py ``init_distributed``): unset (None,
    DeepSpeed's default) or a finite number > 0 and at most
    :data:`MAX_COLLECTIVE_TIMEOUT_MIN`. Pre-training's and fine-tuning's ``RunConfig``."""
    if minutes is None:
        return
    # at least a second: a smaller value rounds to a zero timedelta (1e-9 minutes does),
    # which torch takes, and no collective of a healthy job returns that fast
    check(math.isfinite(minutes) and 1 / 60 <= minutes <= MAX_COLLECTIVE_TIMEOUT_MIN, key,
          f"must be > 0 minutes, at least 1/60 (one second) and at most "
          f"{MAX_COLLECTIVE_TIMEOUT_MIN:g} (unset: DeepSpeed's default), got {minutes}")


def check_adamw(lr: float, betas: Sequence[float], eps: float | None = None) -> None:
    """``optim.lr``, ``optim.betas`` and (where a task has the key) ``optim.eps`` of every
    task's AdamW: torch's AdamW refuses betas outside [0, 1) and a negative eps only when
    the optimizer is built, after the model ("Invalid beta parameter"); an eps of 0 it
    takes, but then a weight whose gradient stayed 0 updates by 0/0."""
    check_positive_finite(lr, "optim.lr")
    check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas",
          f"needs two values, each in [0, 1), got {list(betas)}")
    if eps is not None:
        check_positive_finite(eps, "optim.eps")


def check_dcn_backend(value: str) -> None:
    """``model.dcn_backend`` (every task's): ``auto`` or a name in the DCNv3 op's backend
    registry (the op raises only at the first forward, after the run directory is
    written)."""
    from ops.dcnv3 import available_backends  # models imports it anyway: no extra cost

    names = ["auto", *available_backends()]
    check(value in names, "model.dcn_backend", f"must be one of {'|'.join(names)}, got "
          f"{value!r}")


def check_shard_list_policy(value: str) -> None:
    """``data.on_shard_list_change`` (every streamed task's): what a resume does when its
    source's shard list changed since the save, or a source was added or removed
    (data/loader.py, data/state.py): ``error`` or ``restart``."""
    check(value in ("error", "restart"), "data.on_shard_list_change",
          f"must be 'error' or 'restart', got {value!r}")


@dataclass
class S3Config:
    """Object storage access (any S3-compatible endpoint) and retry policy for shard reads.

    Unset fields fall back to the standard AWS environment variables (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION).
    ``key``/``secret``/``token`` are credentials: a run's written ``config.yaml`` holds
    ``null`` for them (give them again, or through those variables, when resuming), and
    ``internimage submit`` hands them to the job through those variables.
    ``retries``/``backoff`` apply to every remote shard (s3://, http(s)://, pipe:), both to
    opening it and to resuming a read that broke mid-stream.
    ``prefetch_bytes``: how much of the next shard a stream fetches in the background while
    it decodes the current one (:class:`data.storage.ShardPrefetcher`); 0 turns it off.
    ``auth_grace_s``: how long a stream goes on retrying while the store refuses its reads
    (403 ``AccessDenied``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``,
    ``ExpiredToken``, 401, no credentials found) and no other read of it succeeds, before it
    ends the run with :class:`data.shard_schedule.StorageAccessError`: long enough for a
    credential refresher to rotate a session token (each refused read re-reads the
    credentials, see :func:`data.storage.forget_filesystem`), short enough not to hold 512
    GPUs idle; 0 ends the run at the first refused read.
    """

    endpoint_url: str | None = None
    # Credentials: never in a repr, a written config or the config hash (runtime.redact).
    key: str | None = secret_field(env="AWS_ACCESS_KEY_ID")
    secret: str | None = secret_field(env="AWS_SECRET_ACCESS_KEY")
    token: str | None = secret_field(env="AWS_SESSION_TOKEN")
    region: str | None = None
    anon: bool = False
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    block_size: int = 16 * 2**20
    # First bytes of the next shard fetched while the current one is decoded (0: off);
    # per source stream, so a node holds up to workers x sources x this much.
    prefetch_bytes: int = 32 * 2**20
    # Refusals (bad or expired credentials) are the store answering, not an outage: they end
    # the run after this long without a successful read, where an outage is waited out.
    auth_grace_s: float = 300.0

    def __post_init__(self) -> None:
        check(self.retries >= 0, "s3.retries", f"must be >= 0, got {self.retries}")
        check(self.backoff >= 0, "s3.backoff", f"must be >= 0, got {self.backoff}")
        check(self.max_backoff >= self.backoff, "s3.max_backoff", "must be >= s3.backoff")
        check(self.connect_timeout > 0, "s3.connect_timeout", "must be > 0")
        check(self.read_timeout > 0, "s3.read_timeout", "must be > 0")
        check(self.block_size >= 4096, "s3.block_size", "must be >= 4096 bytes")
        check(self.prefetch_bytes >= 0, "s3.prefetch_bytes",
              f"must be >= 0 (0: no prefetch), got {self.prefetch_bytes}")
        check(self.auth_grace_s >= 0, "s3.auth_grace_s",
              f"must be >= 0 (0: end the run at the first refused read), got "
              f"{self.auth_grace_s}")
