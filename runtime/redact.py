"""Credentials in typed configs: marked once on the field, then never written, hashed or printed;
and credentials in shard URLs and commands, removed from every text that is logged or raised
(:func:`redact_url`).

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
import re
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


# What a shard URL or ``pipe:`` command may carry; each match keeps its ``name`` part and
# loses the rest ("-u ***").
_USERINFO = re.compile(r"(?P<name>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+(?=@)")  # user:pw@
_SECRET_PARAM = re.compile(  # signed-URL and token query parameters
    r"(?i)(?P<name>[?&](?:x-amz-[a-z-]*|x-goog-[a-z-]*|[a-z_]*signature|sig|[a-z_]*token|"
    r"api_?key|key|secret|password|auth|access_?key[a-z_]*|aws_[a-z_]+)=)[^&\s]*")
# a header given to a command (curl -H, wget --header): its value, whatever the header;
# quoted, up to the closing quote (an "Authorization: Bearer ..." value has a space)
_HEADER_QUOTED = re.compile(
    r"""(?i)(?P<name>(?<![\w-])(?:-H|--header)(?:=|\s*)["'][^:"']+:)[^"']*""")
_HEADER_BARE = re.compile(r"""(?i)(?P<name>(?<![\w-])(?:-H|--header)(?:=|\s+)[^:"'\s]+:)\S*""")
# an Authorization header anywhere else (an error message may echo one)
_AUTHORIZATION = re.compile(
    r"(?i)(?P<name>\b(?:proxy-)?authorization\s*:\s*)"
    r"(?:(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)\s+)?[^\s\"',)\]]+")
_VALUE = r"""(?:"[^"]*"|'[^']*'|\S+)"""  # one shell word: quoted (spaces and all) or bare
# options that take a credential, "--opt value" or "--opt=value": curl's --user (user:pw),
# --proxy-user, --oauth2-bearer, --password, --secret-key, --token ...
_SECRET_FLAG = re.compile(
    r"(?i)(?P<name>(?<![\w-])--?[\w-]*(?:password|passwd|secret|token|key|user|auth|bearer|"
    r"credential)[\w-]*(?:=|\s+))" + _VALUE)
_SHORT_USER = re.compile(r"(?P<name>(?<![\w-])-[uU]\s*)" + _VALUE)  # curl -u alice:pw
# inline variables named like credentials before a command: AWS_SECRET_ACCESS_KEY=, HF_TOKEN=
_SECRET_ENV = re.compile(
    r"(?P<name>\b[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|KEY|CREDENTIALS?|AUTH)[A-Z0-9_]*=)"
    + _VALUE)
_REDACTIONS = (_USERINFO, _SECRET_PARAM, _HEADER_QUOTED, _HEADER_BARE, _AUTHORIZATION,
               _SECRET_FLAG, _SHORT_USER, _SECRET_ENV)


def redact_url(text: str) -> str:
    """``text`` (a shard URL, a ``pipe:`` command, an error message about one) with every
    credential it may carry replaced by ``***``: safe to log or raise.

    Removed: ``user:password@`` of any embedded URL, signed-URL query parameters,
    credential options of commands (``-u``/``--user``, ``--password``, ``--oauth2-bearer``
    ...; a quoted value whole), the value of every header given with ``-H``/``--header``
    (``Authorization: Bearer ...``) and of any ``Authorization:``, and inline variables
    named like credentials (``AWS_SECRET_ACCESS_KEY=...``, ``HF_TOKEN=...``).
    """
    for pattern in _REDACTIONS:
        text = pattern.sub(r"\g<name>***", text)
    return text


# What :func:`has_credential` ignores. The log redaction above errs on the side of hiding
# (every header's value, any option named like ``user``); a refusal must not stop what
# cannot be a credential: a value that is only shell variables ($TOKEN, ${AUTH}: expanded
# when the ``pipe:`` command runs, never written), an auth scheme word, a header not
# named for one (Accept:, Range:), an option that takes no credential (below).
_VAR_REF = re.compile(r"\$(?:\{\w+\}|\w+)")
_AUTH_SCHEME = re.compile(r"(?i)\b(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)\b")
_CREDENTIAL_HEADER = re.compile(r"(?i)auth|token|key|secret|cookie|session|password")
# options named like credentials whose value is none: a path (--key FILE, --cert,
# --credentials-file), an id (--sse-kms-key-id), a switch that takes no value at all
# (rclone's --s3-env-auth, curl's --anyauth, wget's --auth-no-challenge), a user agent
_NOT_A_SECRET_FLAG = re.compile(
    r"(?i)^--?(?:user-agent|key|cert|cacert|capath|anyauth|auth-no-challenge|[\w-]*-file|"
    r"[\w-]*-id|[\w-]*env-auth|no-[\w-]+)(?:=|\s|$)")


def has_credential(text: str) -> bool:
    """Whether ``text`` (a shard URL or ``pipe:`` command of a config) holds a credential's
    value itself: a signed URL's signature, ``user:password@``, a token in a header or an
    option, an inline ``SECRET=value``; a value that only names environment variables
    (``-H "Authorization: Bearer $HF_TOKEN"``) holds none."""
    for pattern in _REDACTIONS:
        for match in pattern.finditer(text):
            name = match.group("name")
            if pattern in (_HEADER_QUOTED, _HEADER_BARE) and not _CREDENTIAL_HEADER.search(
                    name):
                continue
            raw = match.group(0)[len(name):].strip("'\" ")
            if pattern in (_SECRET_FLAG, _SHORT_USER):
                if _NOT_A_SECRET_FLAG.match(name) or raw.startswith("-"):
                    continue  # the "value" is the next option: this one takes none
                # -u is curl's user:password, but gsutil's billing project
                if pattern is _SHORT_USER and ":" not in raw:
                    continue
            value = _AUTH_SCHEME.sub("", _VAR_REF.sub("", raw))
            if re.search(r"\w", value):
                return True
    return False


def redact_urls(urls: list[str] | str, limit: int = 3) -> str:
    """The first ``limit`` of ``urls`` (or the one pattern), redacted, for a message."""
    items = [urls] if isinstance(urls, str) else list(urls)
    more = f" ... ({len(items)} in all)" if len(items) > limit else ""
    return "[" + ", ".join(repr(redact_url(u)) for u in items[:limit]) + "]" + more
