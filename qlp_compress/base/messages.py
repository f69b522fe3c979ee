"""The stderr console every part writes progress, warnings and errors to (results go to stdout)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
