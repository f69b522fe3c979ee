"""The CLI's output contract and vocabulary: results on stdout (one JSON document with --json), progress on stderr,
--quiet, help that reads at 80 columns, and old option spellings that still work with a one-line note."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import make_tiny_task
from rich.cells import cell_len
from typer.testing import CliRunner

from qlp_compress import cli
from qlp_compress.cli.main import renamed

COMMANDS = ("search", "prune", "compare", "evaluate", "finetune", "export", "quantize", "train", "optimize")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    make_tiny_task(root, n=700, n_train=600, steps=40)
    return root


def invoke(*args: str):
    result = CliRunner().invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "80"})
    assert result.exit_code == 0, (result.stdout[-1500:], result.stderr[-1500:], result.exception)
    return result


def test_help_reads_at_80_columns():
    """Every option name in full, every line within 80 columns, no <bool> metavar, an example first, and the
    commands in the order a user meets them (search first)."""
    top = invoke("--help").stdout
    listed = [line.split()[0] for line in top.split("Commands:")[1].splitlines() if line.strip()]
    assert listed[0] == "search" and set(listed) == set(COMMANDS)
    for command in COMMANDS:
        text = invoke(command, "--help").stdout
        assert max(len(line) for line in text.splitlines()) <= 80, command
        assert "<bool>" not in text and "…" not in text, command
        body = text.split("Arguments:")[0]
        assert "Example: qlp-compress " + command in body, command
        for option in ("--finetune-epochs", "--reward-finetune-steps", "--reward-finetune-from", "--reward-size"):
            if option in text:
                assert f"{option} " in text  # the full name, followed by its metavar or a space


def documented(command: str, document: dict, folder: Path, model: Path) -> None:
    """What the README's output contract and each command's result line promise its --json document holds."""
    if command in ("search", "prune"):  # the same content as report.json, and the folder it is in
        out = Path(document["out"])
        assert out == folder / command[0]
        assert {k: v for k, v in document.items() if k != "out"} == json.loads((out / "report.json").read_text())
    elif command == "compare":  # the rows, as compare.json holds them
        assert document["rows"] == json.loads((folder / "c" / "compare.json").read_text())["rows"]
        assert [r["method"] for r in document["rows"]] == ["lamp", "uniform"]
    elif command == "optimize":  # the same content as optimize.json, and the folder it is in
        out = Path(document["out"])
        assert out == folder / "o" and document["chosen"] == "dense" and "time budget" in document["stopped"]
        assert {k: v for k, v in document.items() if k != "out"} == json.loads((out / "optimize.json").read_text())
    elif command == "evaluate":  # the measurements: accuracy, latency, size, sparsity
        assert {"accuracy", "test_images", "latency", "file_bytes", "weights", "global_sparsity", "layers"} <= set(
            document)
        assert 0 <= document["accuracy"] <= 1 and document["test_images"] == 100
        assert all(lat["median_ms"] > 0 for lat in document["latency"])
        assert document["file_bytes"] == model.stat().st_size
    else:  # the file written, and the figures its result line shows
        path = Path(document["path"])
        assert path.is_file() and path.parent == folder, document["path"]
        shown = {"finetune": ("accuracy", "global_sparsity"), "export": ("bytes", "max_abs_diff"),
                 "quantize": ("accuracy", "bytes", "float_bytes", "zeros"),
                 "train": ("test_accuracy", "data", "train_seconds")}[command]
        assert set(shown) <= set(document), (command, sorted(document))
        if command in ("export", "quantize"):
            assert document["bytes"] == path.stat().st_size
        if command == "export":
            assert document["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_every_command_prints_one_json_document(tiny, tmp_path):
    """--json: stdout holds exactly one JSON document for every command, holding what the README's output contract
    says (report.json for search and prune, compare's rows, evaluate's measurements); progress stays on stderr."""
    model, data = tiny / "lenet.onnx", tiny / "data.npz"
    common = ("--data", data, "--device", "cpu")
    small_search = ("--episodes", "4", "--stages", "1", "--reward-images", "64", "--finetune-epochs", "0.05")
    runs = {
        "train": ("train", "lenet5", "--out", tmp_path / "t.onnx", "--epochs", "0.05", *common),
        "search": ("search", model, "--sparsity", "0.5", *small_search, "--out", tmp_path / "s", *common),
        "prune": ("prune", model, "--sparsity", "0.5", "--finetune-epochs", "0", "--out", tmp_path / "p", *common),
        "compare": ("compare", model, "--sparsity", "0.5", "--method", "lamp,uniform", "--finetune-epochs", "0",
                    "--out", tmp_path / "c", *common),
        "finetune": ("finetune", tmp_path / "p" / "model.onnx", "--out", tmp_path / "f.onnx", "--finetune-epochs",
                     "0.05", *common),
        "export": ("export", model, "--out", tmp_path / "e.onnx", "--data", data, "--device", "cpu"),
        "quantize": ("quantize", model, "--out", tmp_path / "q.onnx", "--data", data, "--calibration-images", "32"),
        "evaluate": ("evaluate", model, "--data", data, "--repeats", "2"),
        "optimize": ("optimize", model, "--max-loss", "1", "--time-budget", "0.001", "--batch", "4", "--threads", "1",
                     "--reward-images", "16",
                     "--out", tmp_path / "o", *common),  # the budget is spent at once: the answer is the dense model
    }
    assert set(runs) == set(COMMANDS)
    for command, args in runs.items():
        result = invoke(*args, "--json")
        document = json.loads(result.stdout)  # exactly one document: trailing text would fail here
        assert isinstance(document, dict), command
        documented(command, document, tmp_path, model)


def table_blocks(text: str) -> list[list[str]]:
    """The tables in a command's output: runs of lines drawn with box characters."""
    blocks, current = [], []
    for line in text.splitlines():
        if any(c in line for c in "│┃━─┏┗┡└┌╇"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return [*blocks, current] if current else blocks


def test_outside_a_terminal_nothing_wraps_and_nothing_is_cut(tiny, tmp_path):
    """Outside a terminal (here at COLUMNS=80) results are laid out wide: every table's lines are whole rows of one
    width, nothing is cut short with an ellipsis, and each `wrote` line is one line that ends its sentence."""
    model, data = tiny / "lenet.onnx", tiny / "data.npz"
    outputs = [invoke("prune", model, "--sparsity", "0.5", "--finetune-epochs", "0", "--out", tmp_path / "p",
                      "--data", data, "--device", "cpu", "--no-sparse-storage").stdout,
               invoke("evaluate", tmp_path / "p" / "model.onnx", "--data", data, "--repeats", "1").stdout]
    for text in outputs:
        assert "…" not in text and "..." not in text
        blocks = table_blocks(text)
        assert blocks, text
        for block in blocks:
            assert len({cell_len(line) for line in block}) == 1, block  # a wrapped row would break the frame
    wrote = [line for line in outputs[0].splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0].endswith(")") and str(tmp_path / "p") in wrote[0], outputs[0]
    assert cell_len(wrote[0]) > 80  # wider than the 80 columns asked, and still one line


def in_terminal(args, columns: int) -> tuple[str, str]:
    """The CLI's stdout when stdout is a terminal `columns` wide, without colour codes, and its stderr (a pipe)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1", "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "qlp_compress", *map(str, args)], stdout=child,
                               stderr=subprocess.PIPE, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal is closed once the run ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", b"".join(chunks).decode()).replace("\r", "")
    return shown, stderr.decode()


@pytest.mark.slow
def test_results_go_to_stdout_and_quiet_silences_progress(tiny, tmp_path, qlp, monkeypatch):
    """Outside a terminal (file descriptors 1 and 2 captured, COLUMNS=80): the result table on stdout, not wrapped,
    plain progress lines on stderr. A real terminal of 80 columns with --quiet: the same result within 80 columns,
    and nothing on stderr."""
    model, data = tiny / "lenet.onnx", tiny / "data.npz"
    args = ["prune", str(model), "--sparsity", "0.5", "--finetune-epochs", "0.05", "--data", str(data), "--device",
            "cpu", "--out", str(tmp_path / "p")]
    monkeypatch.setenv("COLUMNS", "80")
    loud = qlp(*args, cwd=tmp_path)
    assert loud.code == 0, loud.stderr[-2000:]
    assert "wrote " in loud.stdout and "fine-tuned" in loud.stdout  # the table and the summary line
    assert "fine-tune: step" in loud.stderr and "fine-tune: step" not in loud.stdout  # plain progress lines
    for block in table_blocks(loud.stdout):
        assert len({cell_len(line) for line in block}) == 1, block
    wrote = [line for line in loud.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and cell_len(wrote[0]) > 80

    quiet, errors = in_terminal([*args, "--force", "--quiet"], columns=80)
    assert errors == ""
    lines = [line for line in quiet.splitlines() if line.strip()]
    assert table_blocks(quiet) and max(cell_len(line) for line in lines) <= 80, quiet
    assert " ".join(wrote[0].split()) in " ".join(quiet.split())  # the same result, folded to the terminal
    shown, _ = in_terminal(["evaluate", str(model), "--data", str(data), "--repeats", "1", "--quiet"], columns=80)
    assert table_blocks(shown) and max(cell_len(line) for line in shown.splitlines()) <= 80, shown


def test_old_spellings_still_work_with_a_note(capsys):
    assert renamed(["finetune", "m.onnx", "--epochs", "3", "--out", "o.onnx"]) == [
        "finetune", "m.onnx", "--finetune-epochs", "3", "--out", "o.onnx"]
    assert renamed(["compare", "m.onnx", "--methods=lamp,erk"]) == ["compare", "m.onnx", "--method", "lamp,erk"]
    assert renamed(["search", "m.onnx", "--no-finetune"]) == ["search", "m.onnx", "--finetune-epochs", "0"]
    assert renamed(["train", "resnet20", "--epochs", "3"]) == ["train", "resnet20", "--epochs", "3"]  # train's own
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 3 and all(n.startswith("note: --") and "deprecated" in n for n in notes)


def test_compare_resume_keeps_the_rows_measured_before_an_interruption(tiny, tmp_path):
    """An interrupted compare left one row in OUT/.work/compare.json: --resume keeps it as it is (it is not measured
    again) and measures only the missing cell; the rows of another model are refused (issue 24: a resume continues
    the same run or refuses), and --force without --resume starts over."""
    import hashlib

    model, data = tiny / "lenet.onnx", tiny / "data.npz"
    out = tmp_path / "c"
    (out / ".work").mkdir(parents=True)
    kept = {"method": "lamp", "target": 0.5, "achieved": 0.5, "dense_accuracy": 0.5, "pruned_accuracy": 0.123,
            "finetuned_accuracy": None, "best_reward": None, "search_seconds": 0.0, "sparsities": []}
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    (out / ".work" / "compare.json").write_text(json.dumps({"model_sha256": sha, "rows": [kept]}))
    args = ("compare", model, "--sparsity", "0.5", "--method", "lamp,uniform", "--finetune-epochs", "0", "--out", out,
            "--data", data, "--device", "cpu", "--json")
    rows = json.loads(invoke(*args, "--resume").stdout)["rows"]
    assert [(r["method"], r["pruned_accuracy"] == 0.123) for r in rows] == [("lamp", True), ("uniform", False)]
    assert json.loads((out / "compare.json").read_text())["rows"] == rows
    (out / ".work").mkdir()
    (out / ".work" / "compare.json").write_text(json.dumps({"model_sha256": "another", "rows": [kept]}))
    refused = CliRunner().invoke(cli.app, [str(a) for a in (*args, "--resume", "--force")])
    assert type(refused.exception).__name__ == "UsageError" and "another model" in str(refused.exception)
    rows = json.loads(invoke(*args, "--force").stdout)["rows"]
    assert [r["method"] for r in rows] == ["lamp", "uniform"] and rows[0]["pruned_accuracy"] != 0.123
