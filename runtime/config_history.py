"""What a run's config was before a resume changed it: ``RUN/config_history/``.

Every start of a run publishes the resolved config it runs with as ``RUN/config.yaml``
(runtime/checkpoint.py ``publish_config``). A SLURM job reruns its command line at each
requeue, so it reads the user's ``--config`` file again, maybe weeks later: an edit made
since (the file copied for the next experiment and changed) changes the running run's
``optim.lr``, batch size or objective weights without a word, and the replaced
``config.yaml`` took the record of what the run had trained with along. Now a start whose
config differs from the one the run last started with keeps the old one
(``config_history/config-<UTC time>.yaml``) and says, on rank 0, which keys changed and
how. (Changing a config on resume is legitimate, a lower lr after a divergence; the
checkpoint's own checks refuse what cannot be resumed, a model hash that differs.)

Both files are the redacted dumps of launch/config.py ``dump_config``: no credential
reaches the history or the log. Cost: one small file read and compare per start, one
file per change.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

HISTORY_DIR = "config_history"
NAMED_CHANGES = 12  # keys a warning names (its count says how many changed)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def changed_keys(previous: str, new: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of what differs between two config dumps
    (a key absent on one side: None there), sorted by key."""
    old, now = _flat(yaml.safe_load(previous) or {}), _flat(yaml.safe_load(new) or {})
    return [(key, old.get(key), now.get(key)) for key in sorted(old.keys() | now.keys())
            if old.get(key) != now.get(key)]


def keep_previous(run_dir: Path, previous: str, new: str) -> Path | None:
    """Where ``previous`` (the config the run last started with) was kept, and the changes
    logged, when ``new`` (the one this start publishes) differs from it; None when they
    are the same."""
    if previous == new:
        return None
    try:
        changes = changed_keys(previous, new)
    except yaml.YAMLError:  # a config.yaml edited by hand: kept all the same
        changes = [("(config.yaml, not YAML)", None, None)]
    if not changes:  # the same settings, written otherwise
        return None
    folder = run_dir / HISTORY_DIR
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = folder / f"config-{stamp}.yaml"
    n = 1
    while kept.exists():  # two starts within a second
        n += 1
        kept = folder / f"config-{stamp}-{n}.yaml"
    kept.write_text(previous)
    named = "; ".join(f"{key}: {old!r} -> {now!r}" for key, old, now in changes[:NAMED_CHANGES])
    more = f"; and {len(changes) - NAMED_CHANGES} more" if len(changes) > NAMED_CHANGES else ""
    log.warning("%s: this start's config differs from the one the run last started with "
                "in %d key(s): %s%s (the previous config is kept in %s)", run_dir,
                len(changes), named, more, kept)
    return kept
