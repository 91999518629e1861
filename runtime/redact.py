"""Credentials in typed configs: marked once on the field, then never written, hashed or printed.

A config field declared with :func:`secret_field` (S3 access key, secret key, session token)

- is left out of the dataclass ``repr`` (an exception or log line that prints a config
  cannot leak it),
- is written as ``null`` by :func:`public_dict`, the one view of a config that is ever
  serialised (``config.yaml`` of a run, the dry-run plans, JSON records),
- takes no part in :func:`config_hash`, so rotating a key never changes a run's identity.

Each secret field names the standard environment variable that provides the same credential
(``AWS_SECRET_ACCESS_KEY`` for ``data.s3.secret``): that is how a job that must not carry
the value in its files (a SLURM job's pickled command line) receives it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterator
from typing import Any

SECRET = "secret"  # dataclass field metadata: this field holds a credential
ENV = "env"  # dataclass field metadata: the environment variable with the same credential


def secret_field(env: str | None = None) -> Any:
    """A config field for a credential (default None), hidden from repr, files and hashes.

    ``env``: the environment variable the credential's consumer reads when the field is
    unset (e.g. ``AWS_ACCESS_KEY_ID`` for s3fs/botocore).
    """
    return dataclasses.field(default=None, repr=False, metadata={SECRET: True, ENV: env})


def is_secret(f: dataclasses.Field) -> bool:
    """Whether dataclass field ``f`` was declared with :func:`secret_field`."""
    return bool(f.metadata.get(SECRET))


def _secret_fields(cfg: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) of every secret field in a config instance, nested too."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        for f in dataclasses.fields(cfg):
            key = f"{prefix}{f.name}"
            value = getattr(cfg, f.name)
            if is_secret(f):
                yield key, f, value
            else:
                yield from _secret_fields(value, key + ".")
    elif isinstance(cfg, (list, tuple)):
        for i, item in enumerate(cfg):
            yield from _secret_fields(item, f"{prefix[:-1]}[{i}].")
    elif isinstance(cfg, dict):
        for k, item in cfg.items():
            yield from _secret_fields(item, f"{prefix}{k}.")


def secrets_set(cfg: Any) -> dict[str, str | None]:
    """Dotted key -> environment variable of every secret field that holds a value."""
    return {key: f.metadata.get(ENV) for key, f, value in _secret_fields(cfg)
            if value not in (None, "")}


def public_dict(cfg: Any) -> Any:
    """A config as plain nested dicts/lists with every secret field set to None.

    The only form in which a config leaves the process: YAML, JSON, hashes.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: None if is_secret(f) else public_dict(getattr(cfg, f.name))
                for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [public_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: public_dict(v) for k, v in cfg.items()}
    return cfg


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config's content without its credentials.

    Two configs that differ only in credentials hash the same: a rotated key is the same run.
    """
    blob = json.dumps(public_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def secret_keys(cls: type) -> dict[str, str | None]:
    """Dotted key -> environment variable of every secret field a config class can hold.

    Follows nested dataclass fields (also ``X | None``); lists of dataclasses are skipped,
    their items have no fixed dotted key.
    """
    out: dict[str, str | None] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_secret(f):
            out[f.name] = f.metadata.get(ENV)
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = options[0] if len(options) == 1 else None
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": env for k, env in secret_keys(tp).items()})
    return out
