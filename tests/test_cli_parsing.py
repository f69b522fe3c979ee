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


@pytest.mark.parametrize("args, says", [
    (("--structure", "channel", "--near-best", "0.3"), "--near-best"),  # near-best moves per-layer sparsities
    (("--near-best", "1.5"), "--near-best"),
])
def test_near_best_is_checked_before_any_work(tmp_path, qlp, args, says):
    (tmp_path / "m.onnx").write_bytes(b"not read: the options are checked first")
    run = qlp("search", "m.onnx", *args, cwd=tmp_path)
    assert run.code == 2 and says in run.line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_near_best_defaults_to_half_in_weight_mode_and_off_in_channel_mode():
    """The search's default (0.5) reaches weight-mode searches unless --near-best says otherwise; channel mode,
    whose groups have no per-layer sparsities to move, never gets near-best episodes."""
    from pathlib import Path

    from qlp_compress.search.curriculum import SearchSettings
    from qlp_compress.workflows.commands import Choice, RunOptions
    from qlp_compress.workflows.options import search_settings as _search_settings

    run = RunOptions(model=Path("m.onnx"))
    assert _search_settings(Choice(), run, 0.9).near_best == SearchSettings(0.9).near_best == 0.5
    assert _search_settings(Choice(near_best=0.0), run, 0.9).near_best == 0.0
    assert _search_settings(Choice(near_best=0.25), run, 0.9).near_best == 0.25
