"""The CLI's output contract and vocabulary: results on stdout (one JSON document with --json), progress on stderr,
--quiet, help that reads at 80 columns, and old option spellings that still work with a one-line note."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_tiny_task
from typer.testing import CliRunner

from qlp_compress import cli
from qlp_compress.cli.main import renamed

COMMANDS = ("search", "prune", "compare", "evaluate", "finetune", "export", "quantize", "train")


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


@pytest.mark.slow
def test_every_command_prints_one_json_document(tiny, tmp_path):
    """--json: stdout holds exactly one JSON document for every command; progress stays on stderr."""
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
    }
    assert set(runs) == set(COMMANDS)
    for command, args in runs.items():
        result = invoke(*args, "--json")
        document = json.loads(result.stdout)  # exactly one document: trailing text would fail here
        assert isinstance(document, dict), command
    assert json.loads(invoke(*runs["evaluate"], "--json").stdout)["test_images"] == 100


@pytest.mark.slow
def test_results_go_to_stdout_and_quiet_silences_progress(tiny, tmp_path):
    """A real pipe: the result table on stdout, no wrapping at 80 columns; --quiet leaves stderr empty."""
    model, data = tiny / "lenet.onnx", tiny / "data.npz"
    args = [sys.executable, "-m", "qlp_compress", "prune", str(model), "--sparsity", "0.5", "--finetune-epochs",
            "0.05", "--data", str(data), "--device", "cpu", "--out", str(tmp_path / "p")]
    loud = subprocess.run(args, capture_output=True, text=True, timeout=600, env={"COLUMNS": "80", "PATH": ""})
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "wrote " in loud.stdout and "fine-tuned" in loud.stdout  # the table and the summary line
    assert "fine-tune: step" in loud.stderr and "fine-tune: step" not in loud.stdout  # plain progress lines
    quiet = subprocess.run([*args, "--force", "--quiet"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.count("\n") == loud.stdout.count("\n")


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
