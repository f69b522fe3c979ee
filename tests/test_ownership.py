"""The tool deletes or replaces only what it wrote, never its input (issue 24, rows 1-6, 18, 19).

One-file outputs keep their checkpoint in a hidden `.NAME.qlp-ckpt` (never OUT itself, never a user's `OUT.ckpt`);
an output folder's record, `.qlp-outputs.json`, lists the files its last run wrote, and `--force` replaces only
those. Every refusal is one line that names the fix, and leaves every file as it was."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_task, run_app
from onnx import TensorProto, helper

from qlp_compress.base import outputs
from qlp_compress.deploy import engine

DEVICE = ("--device", "cpu")
MANIFEST = ".qlp-outputs.json"  # an output folder's record of the files its last run wrote
FINETUNE = ("--data", "data.npz", "--finetune-epochs", "0.05", *DEVICE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small trained LeNet-5 (lenet.onnx) on a learnable 4-class task (data.npz), and a finished `prune` run of it
    (base/)."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_task(root, n=700, n_train=600, steps=40)
    run_app(*prune_args(out="base"), cwd=root)
    return root


@pytest.fixture
def work(tiny, tmp_path) -> Path:
    for name in ("lenet.onnx", "data.npz"):
        shutil.copy(tiny / name, tmp_path / name)
    shutil.copytree(tiny / "base", tmp_path / "base")
    return tmp_path


def prune_args(model: str = "lenet.onnx", out: str = "out", *extra: str) -> tuple[str, ...]:
    return ("prune", model, "--data", "data.npz", "--method", "uniform", "--sparsity", "0.5", "--out", out,
            "--finetune-epochs", "0", *DEVICE, *extra)


def file_checkpoint(out: Path) -> Path:
    """Where a one-file output's checkpoint goes: hidden beside it, a name no output takes."""
    return out.parent / f".{out.name}.qlp-ckpt"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ rows 1-3: one file


@pytest.mark.slow
def test_row1_an_output_named_ckpt_is_the_output_not_the_checkpoint(work, qlp) -> None:
    run = qlp("finetune", "base/model.onnx", *FINETUNE, "--out", "tuned.ckpt", "--json", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["path"] == "tuned.ckpt"
    onnx.checker.check_model(onnx.load(str(work / "tuned.ckpt")))  # the file the JSON names exists, whole
    assert not file_checkpoint(work / "tuned.ckpt").exists()  # the checkpoint went when the run finished


def test_row1_train_to_a_ckpt_name_keeps_its_output(work, qlp) -> None:
    run = qlp("train", "lenet5", "--data", "data.npz", "--epochs", "0.05", "--out", "trained.ckpt", *DEVICE,
              cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    onnx.checker.check_model(onnx.load(str(work / "trained.ckpt")))


@pytest.mark.slow
def test_row2_a_users_ckpt_beside_the_output_is_left_alone(work, qlp) -> None:
    (work / "lt.ckpt").write_text("mine\n")
    run = qlp("finetune", "base/model.onnx", *FINETUNE, "--out", "lt.onnx", cwd=work)
    assert run.code == 0, run.stderr[-2000:]  # not refused as "the checkpoint of an interrupted run"
    run = qlp("finetune", "base/model.onnx", *FINETUNE, "--out", "lt.onnx", "--force", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert (work / "lt.ckpt").read_text() == "mine\n"  # nor deleted with --force


def test_the_hidden_checkpoint_of_an_interrupted_run_still_asks_for_resume(work, qlp) -> None:
    checkpoint = file_checkpoint(work / "o.onnx")
    assert checkpoint.name == ".o.onnx.qlp-ckpt"
    checkpoint.write_bytes(b"an interrupted run's")
    run = qlp("finetune", "base/model.onnx", *FINETUNE, "--out", "o.onnx", cwd=work)
    assert run.code == 2 and "already exists" in run.line and "--resume" in run.line


def test_row3_resume_never_overwrites_the_int8_file(work, qlp) -> None:
    (work / "t.int8.onnx").write_text("mine\n")
    before = snapshot(work)
    run = qlp("finetune", "base/model.onnx", *FINETUNE, "--out", "t.onnx", "--quantize", "int8", "--resume", cwd=work)
    assert run.code == 2 and "t.int8.onnx already exists" in run.line and "--force" in run.line
    assert snapshot(work) == before


# ------------------------------------------------------------------------------------------------ rows 4-5: a folder


def test_row4_out_dot_never_replaces_the_input_or_a_users_report(work, qlp) -> None:
    folder = work / "here"
    folder.mkdir()
    shutil.copy(work / "lenet.onnx", folder / "model.onnx")
    shutil.copy(work / "data.npz", folder / "data.npz")
    (folder / "report.md").write_text("my report\n")
    before = snapshot(work)
    run = qlp("prune", "model.onnx", "--data", "data.npz", "--method", "lamp", "--sparsity", "0.5",
              "--finetune-epochs", "0", "--out", ".", "--force", *DEVICE, cwd=folder)
    assert run.code == 2 and "input" in run.line and "choose another --out" in run.line
    assert snapshot(work) == before
    (folder / "model.onnx").unlink()  # the model elsewhere: the user's report.md is still not the tool's to replace
    before = snapshot(work)
    run = qlp(*prune_args("../lenet.onnx", "."), "--force", cwd=folder)
    assert run.code == 2 and "report.md" in run.line and "did not write" in run.line and "move" in run.line
    assert snapshot(work) == before


@pytest.mark.slow
def test_row5_force_replaces_only_what_the_tool_wrote(work, qlp) -> None:
    base = work / "base"
    assert set(json.loads((base / MANIFEST).read_text())["files"]) == \
        {p.name for p in base.iterdir() if p.name != MANIFEST}
    (base / "model.int8.onnx").write_text("the user's own int8 model\n")
    (base / "notes.txt").write_text("the user's\n")
    for where in ("out", "old"):
        (base / ".work" / where).mkdir(parents=True)
        (base / ".work" / where / "mine.txt").write_text(f"the user's, in .work/{where}\n")
        before = snapshot(work)
        run = qlp(*prune_args(out="base"), "--force", cwd=work)
        assert run.code == 1 and f".work/{where}" in run.line and "mine.txt" in run.line and "move" in run.line
        assert snapshot(work) == before
        shutil.rmtree(base / ".work")
    run = qlp(*prune_args(out="base"), "--force", "--no-sparse-storage", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert (base / "model.int8.onnx").read_text() == "the user's own int8 model\n"
    assert (base / "notes.txt").read_text() == "the user's\n"
    assert not (base / "model.sparse.onnx").exists()  # the previous run's file: no mix of two runs
    assert not (base / ".work").exists()


def test_a_file_that_appears_during_the_run_is_not_replaced(work) -> None:
    out = work / "new"
    with outputs.OutputRun(out, force=True, resume=False) as run:
        (run.staging / "report.md").write_text("the run's")
        (out / "report.md").write_text("the user's, written meanwhile\n")
        with pytest.raises(outputs.QLPError, match="did not write"):
            run.commit()
    assert (out / "report.md").read_text() == "the user's, written meanwhile\n"


# ------------------------------------------------------------------------------------------------ row 6: the input


@pytest.mark.parametrize("command", [
    ("finetune", "x.onnx", *FINETUNE, "--out", "x.onnx", "--force"),
    ("export", "x.onnx", "--data", "data.npz", "--out", "x.onnx", "--force", *DEVICE),
    ("export", "x.sparse.onnx", "--data", "data.npz", "--out", "x.onnx", "--force", *DEVICE),  # its sparse form
    ("finetune", "x.int8.onnx", *FINETUNE, "--out", "x.onnx", "--quantize", "int8", "--force"),
    ("export", "x.onnx", "--data", "data.npz", "--out", "data.npz", "--force", *DEVICE),
    ("train", "lenet5", "--data", "data.npz", "--out", "data.npz", "--force", *DEVICE),
    ("prune", "base/model.onnx", "--data", "data.npz", "--out", "base", "--force", *DEVICE),
    ("prune", "base/.work/out/model.onnx", "--data", "data.npz", "--out", "base", "--force", *DEVICE),
], ids=["finetune", "export", "export-sparse", "finetune-int8", "export-data", "train-data", "prune", "prune-work"])
def test_row6_no_command_writes_over_its_input(work, qlp, command) -> None:
    for name in ("x.onnx", "x.sparse.onnx", "x.int8.onnx"):
        shutil.copy(work / "base" / "model.onnx", work / name)
    (work / "base" / ".work" / "out").mkdir(parents=True)
    shutil.copy(work / "base" / "model.onnx", work / "base" / ".work" / "out" / "model.onnx")
    before = snapshot(work)
    run = qlp(*command, cwd=work)
    assert run.code == 2 and "input" in run.line and ("choose another --out" in run.line or "copy" in run.line)
    assert snapshot(work) == before


@pytest.mark.parametrize("out", [".x.onnx.lock", ".x.onnx.qlp-ckpt", "base/.work/finetune.ckpt", "base/.work"])
def test_an_out_among_the_tools_working_files_is_refused(work, qlp, out) -> None:
    (work / "base" / ".work").mkdir()
    command = ("export", "lenet.onnx", "--data", "data.npz", "--out", out, *DEVICE)
    if out.endswith(".work"):
        command = prune_args(out=out)
    before = snapshot(work)
    run = qlp(*command, cwd=work)
    assert run.code == 2 and ("working files" in run.line or ".work" in run.line) and "--out" in run.line
    assert snapshot(work) == before


# ------------------------------------------------------------------------------------------------ row 18: the journal


@pytest.mark.parametrize("journal", ['{"new": ', '{"new": 5}', '{"new": ["../../x"]}', "[]"])
def test_row18_a_damaged_commit_json_names_the_file_and_the_fix(work, qlp, journal) -> None:
    (work / "base" / ".work" / "out").mkdir(parents=True)
    (work / "base" / ".work" / "out" / "model.onnx").write_text("staged")
    (work / "base" / ".work" / "commit.json").write_text(journal)
    before = snapshot(work)
    for extra in (("--force",), ("--resume", "--force")):
        run = qlp(*prune_args(out="base"), *extra, cwd=work)
        assert run.code == 1 and "commit.json is damaged" in run.line and "delete" in run.line
        assert snapshot(work) == before


# ------------------------------------------------------------------------------------------------ row 19: the system


def test_row19_an_output_name_too_long_for_its_working_files(work, qlp) -> None:
    for name in ("a" * 249, "a" * 249 + ".onnx"):
        before = snapshot(work)
        run = qlp("export", "lenet.onnx", "--data", "data.npz", "--out", name, *DEVICE, cwd=work)
        assert run.code == 2 and "too long" in run.line and "choose a name of at most" in run.line
        assert snapshot(work) == before


def test_row19_an_os_error_the_user_can_fix_is_one_line(work, qlp, monkeypatch) -> None:
    from qlp_compress.workflows import commands

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(commands, "evaluate_file", full)
    run = qlp("evaluate", "lenet.onnx", cwd=work)
    assert run.code == 1 and "No space left on device" in run.line and "free some disk space" in run.line


def _limit_file_size() -> None:
    limit = 100 * 1024  # lenet.onnx is about 250 KB: its float copy in the temporary folder goes over
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_row19_the_file_size_limit_during_quantize_is_one_line(work) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work)}
    result = subprocess.run([sys.executable, "-m", "qlp_compress", "quantize", "lenet.onnx", "--data", "data.npz",
                             "--out", "q.onnx", "--calibration-images", "32", "--quiet"], capture_output=True,
                            text=True, cwd=work, env=env, timeout=300, preexec_fn=_limit_file_size)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert "File too large" in lines[0] and "ulimit -f" in lines[0] and "unexpected" not in lines[0]
    assert not (work / "q.onnx").exists() and not list(work.glob("qlp-int8-*"))


def test_row19_a_huge_latency_batch_is_refused_before_anything_runs(work, qlp) -> None:
    before = snapshot(work)
    run = qlp(*prune_args(out="c"), "--structure", "channel", "--method", "l1", "--speedup", "1.2",
              "--latency-batch", "1000000", cwd=work)
    assert run.code == 2 and "--latency-batch must be at most" in run.line
    assert "onnxruntime" not in run.stderr and snapshot(work) == before


def test_a_failed_timing_run_leaves_no_onnxruntime_log_on_stderr(capfd) -> None:
    """onnxruntime's own coloured log line must not leak next to the tool's one error line."""
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.array([7, -1], dtype=np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    capfd.readouterr()
    with pytest.raises(Exception, match="Reshape"):
        engine.time_model(model.SerializeToString(), (2, 3), threads=1, repeats=1)
    assert "onnxruntime" not in capfd.readouterr().err
