"""The stderr console every part writes progress, warnings and errors to (results go to stdout)."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True)
quiet = False  # --quiet: no progress (errors and warnings still show); read by qlp_compress.report.progress


def set_quiet(value: bool) -> None:
    """Progress on or off; always off on a rank of a torchrun job other than 0 (rank 0 shows the job's progress)."""
    global quiet
    quiet = value or os.environ.get("RANK", "0") != "0"
