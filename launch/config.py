"""Typed dataclass configs loaded from YAML with dotted ``a.b=value`` overrides.

Every key is checked against the dataclass: unknown keys and values of the wrong type fail
before any compute, with a message naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from runtime.redact import config_hash, is_secret, public_dict, secrets_set

T = TypeVar("T")
__all__ = ["REFUSED_STATUS", "ConfigError", "build", "check_output_dir", "config_hash",
           "dump_config", "flag_override", "load_config", "parse_overrides", "read_config_file",
           "to_dict"]


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# Every command's exit status for a refused start: a bad config or flag, a checkpoint it
# will not resume (launch/cli.py, launch/commands/refusals.py). The same command line is
# refused again, so a job that ended so is not requeued (launch/slurm/after_exit.py).
REFUSED_STATUS = 2


def refuse_plan_flags(args: Any, *flags: str) -> None:
    """Refuse (``ConfigError``) the dry-run-only ``flags`` (argparse names, e.g.
    ``gpus_per_node``) given to a start: a start trains on the processes its launcher
    starts."""
    for flag in flags:
        if getattr(args, flag, None) is not None and not args.dry_run:
            raise ConfigError(f"--{flag.replace('_', '-')} is for --dry-run: a start trains on "
                              "the processes its launcher starts (WORLD_SIZE)")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "model.name=internimage_t"]`` into a nested dict.

    Values are parsed as YAML scalars/lists (``1e-4`` -> float, ``[1,2]`` -> list,
    ``true`` -> bool); anything else stays a string.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                # the key only: the value may be a credential
                raise ConfigError(f"override {key.strip()!r} conflicts with another override "
                                  f"of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise message
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        # a config class may list keys it has renamed (old -> new): name the new key
        renamed = [k for k in unknown if k in getattr(cls, "RENAMED_KEYS", {})]
        if renamed:
            raise ConfigError(f"key '{where}{renamed[0]}' was renamed: use "
                              f"'{where}{cls.RENAMED_KEYS[renamed[0]]}'")
        raise ConfigError(f"unknown key '{where}{unknown[0]}'; allowed keys"
                          f"{' under ' + prefix if prefix else ''}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        try:
            kwargs[name] = _coerce(value, hints[name], key)
        except ConfigError:
            if not is_secret(fields[name]):
                raise
            # the usual message quotes the value: never for a credential
            raise ConfigError(f"{key}: expected {_type_name(hints[name])}, got a "
                              f"{type(value).__name__} (value not shown: a credential; quote "
                              "it in YAML)") from None
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # dataclasses validate in __post_init__ and name the key
        raise ConfigError(str(err)) from None
    except ArithmeticError as err:
        # a check that divided by a value before range-checking it (a ZeroDivisionError,
        # an OverflowError): still one line, naming the section, never a traceback
        where = prefix or cls.__name__
        raise ConfigError(f"{where}: a value out of range ({type(err).__name__}: {err}); "
                          f"check the counts and sizes under {where}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples as lists), ready for YAML/JSON.

    Credentials (fields declared with ``runtime.redact.secret_field``) are None: this is
    what gets written, so it never holds them.
    """
    return json.loads(json.dumps(public_dict(cfg)))


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None) -> T:
    """Load ``cls`` from an optional YAML file plus dotted overrides (overrides win)."""
    data = read_config_file(path) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    return build(cls, data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (``ConfigError`` if missing, not YAML, or not a
    mapping), not yet checked against a dataclass."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def flag_override(key: str, value: Any) -> str:
    """The ``key=value`` override of a command-line flag's ``value``, read back as that
    string (or number): written bare, the override parser reads it as YAML, so
    ``--output-dir "runs/exp #3"`` became ``runs/exp`` (a comment), ``2024-06-01`` a date
    and ``12:30`` the integer 750."""
    return f"{key}={json.dumps(value) if isinstance(value, str) else value}"


def check_output_dir(output_dir: str | Path, key: str = "run.output_dir") -> None:
    """Refuse a run directory that cannot be one: ``output_dir`` itself, or one of the
    folders above it, exists but is not a directory (a file, a broken link). A
    ``ConfigError`` naming ``key`` and what is in the way, raised when the config is loaded
    (a dry run and `internimage submit` too): before, the start failed after its setup
    with a ``FileExistsError``/``NotADirectoryError`` traceback from creating the folder.
    A path that does not exist yet is fine (the start creates it and its parents); an empty
    one is refused (an unset shell variable: the run wrote into the current directory)."""
    if not str(output_dir).strip():
        raise ConfigError(f"{key}: empty; give the run's directory (an unset variable?)")
    path = Path(output_dir).absolute()
    for folder in (path, *path.parents):
        if not os.path.lexists(folder):
            continue  # created by the start
        if folder.is_dir():  # follows a link to a directory
            return  # the folders above a directory are directories
        what = ("a file" if folder.is_file() else "a broken link" if folder.is_symlink()
                else "a special file")
        if folder == path:
            raise ConfigError(f"{key}: {output_dir} is {what}, not a directory")
        raise ConfigError(f"{key}: {output_dir} cannot be created: {folder} is {what}")


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (every run records what it ran with).

    Credentials are written as null; a header comment names those that were set and the
    environment variables that can provide them again (e.g. when resuming from this file).
    """
    header = ""
    omitted = secrets_set(cfg)
    if omitted:
        where = ", ".join(f"{k} ({env})" if env else k for k, env in omitted.items())
        header = (f"# credentials set for this run but not written: {where}; give them "
                  "again or through those environment variables\n")
    Path(path).write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
