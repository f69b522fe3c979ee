"""The output contract: the result on stdout (a table in a terminal, or one JSON document with --json), progress and
logs on stderr, --quiet for no progress; outside a terminal nothing wraps or is cut."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from rich.console import Console, RenderableType

from qlp_compress.base import messages

WIDE = 200  # columns used outside a terminal, so that tables never wrap when piped or logged


def stdout_console() -> Console:
    """Rich on stdout; outside a terminal, wide and without colour codes."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=WIDE, no_color=True, highlight=False, soft_wrap=True)


def set_quiet(quiet: bool) -> None:
    messages.set_quiet(quiet)


def _plain(value):
    """JSON for what json cannot write itself (paths, tuples of numpy numbers, ...)."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def emit(result: dict | list, as_json: bool, renderables: Callable[[], Iterable[RenderableType | str]]) -> None:
    """Print the command's result on stdout: one JSON document, or its tables and summary lines."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=_plain) + "\n")
        sys.stdout.flush()
        return
    console = stdout_console()
    for item in renderables():
        console.print(item)
