"""Argument parsing, in this process: Typer's `app` through CliRunner (exit codes and what Typer prints), and the
entry point `main()` (the same mistakes as one `error:` line that says how to fix the command line). Nothing here
loads a model: every mistake is caught before any work, so nothing is written."""

from __future__ import annotations

import pytest
from conftest import run_app

from qlp_compress import __version__

COMMANDS = ("search", "prune", "compare", "evaluate", "finetune", "export", "quantize", "train")

MISTAKES = {  # the command line, and the words Typer's message must hold
    "no_such_command": (("shrink", "m.onnx"), ("No such command", "shrink")),
    "missing_model": (("prune",), ("Missing argument",)),
    "not_a_number": (("prune", "m.onnx", "--sparsity", "lots"), ("Invalid value", "--sparsity")),
    "not_an_integer": (("evaluate", "m.onnx", "--repeats", "2.5"), ("Invalid value", "--repeats")),
    "unknown_option": (("export", "m.onnx", "--out", "e.onnx", "--sparsty", "0.5"), ("No such option", "--sparsty")),
    "option_without_value": (("search", "m.onnx", "--sparsity"), ("--sparsity", "requires an argument")),
}


def test_version(tmp_path, qlp):
    assert run_app("--version").stdout == f"{__version__}\n"
    run = qlp("--version", cwd=tmp_path)
    assert run.code == 0 and run.stdout == f"{__version__}\n" and run.stderr == ""


def test_no_command_shows_the_help_with_every_command():
    result = run_app(code=2)
    assert "Usage:" in result.output and all(command in result.output for command in COMMANDS)


@pytest.mark.parametrize("name", list(MISTAKES))
def test_typer_refuses_a_bad_command_line(tmp_path, name):
    args, says = MISTAKES[name]
    result = run_app(*args, cwd=tmp_path, code=2)
    assert all(word in result.stderr for word in says), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(MISTAKES))
def test_main_refuses_a_bad_command_line_in_one_line(tmp_path, qlp, name):
    args, says = MISTAKES[name]
    run = qlp(*args, cwd=tmp_path)
    assert run.code == 2
    assert [line for line in run.stderr.splitlines() if line.strip()] == [run.line]  # no usage block, one line
    assert all(word in run.line for word in says) and "fix the command line" in run.line and "--help" in run.line
    assert list(tmp_path.iterdir()) == []
