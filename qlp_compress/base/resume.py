"""A resumed run is the interrupted run, continued: the settings that shape a run's results are recorded with every
partial result it keeps (a checkpoint, or the JSON record of finished work), and `--resume` with other settings is
refused in one line that names the setting.

A record maps an option as a user types it (`--finetune-epochs`), or a thing given without an option (`model`:
the input's SHA-256), to a plain value. A partial result without a record (written by an older version) is
continued as before, under the checks it always had."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from qlp_compress.base.errors import UsageError

MISSING = "(not recorded)"


def plain(value: object) -> object:
    """`value` as JSON and torch checkpoints give it back: tuples as lists, paths as strings."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{"env": {"passes": 4}} → {"env.passes": 4}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = plain(value)
    return out


def _shown(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"SHA-256 {value[:12]}…"
    if isinstance(value, list):
        return ",".join(map(_shown, value)) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def check_same(recorded: object, current: Mapping[str, object] | None) -> None:
    """Refuse (UsageError) when `current` differs from the `recorded` settings of an interrupted run, naming the
    first setting that differs; nothing to check when either is missing."""
    if not isinstance(recorded, Mapping) or not recorded or not current:
        return
    current = plain(current)
    for key in [*current, *(k for k in recorded if k not in current)]:
        old, new = plain(recorded.get(key, MISSING)), current.get(key, MISSING)
        if old == new:
            continue
        if key.startswith("--"):
            raise UsageError(f"--resume with other settings: the interrupted run used {key} {_shown(old)}, this "
                             f"command says {_shown(new)}; rerun with the same value, or pass --force instead of "
                             "--resume to start over")
        raise UsageError(f"--resume with other settings: the interrupted run used another {key} ({_shown(old)}; "
                         f"this command's: {_shown(new)}); rerun with the same {key} and options, or pass --force "
                         "instead of --resume to start over")
