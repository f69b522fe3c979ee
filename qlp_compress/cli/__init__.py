"""The command line: Typer commands that parse, call one workflow, and print.

May import: base, report, workflows."""

from qlp_compress.cli.commands import app
from qlp_compress.cli.main import main

__all__ = ["app", "main"]
