"""The stderr console every part writes progress, warnings and errors to (results go to stdout)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
quiet = False  # --quiet: no progress (errors and warnings still show); read by qlp_compress.report.progress


def set_quiet(value: bool) -> None:
    global quiet
    quiet = value
