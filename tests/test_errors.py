"""Reliability through the real command line: bad input, interruption, kill -9, a full disk, and safe loading.
Every failure must be one line on stderr that names the problem and the fix, exit 2 (usage) or 1 (failure) or 130
(interrupted), show no traceback (unless --debug), and leave every file the user had byte-identical.

The bad-input cases call the entry point `main()` in this process (the `qlp` fixture); interruption and kill -9 run
the command line in a subprocess that waits at a known point for the signal (tests/paused_cli.py), and one --debug
run is `python -m qlp_compress` (the real interpreter, its exit code)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_task, run_app, start_paused, wait_for
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from qlp_compress import cli
from qlp_compress.base import io as qio
from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import atomic_path, atomic_write_bytes, load_checkpoint
from qlp_compress.deploy import export

DEVICE = ("--device", "cpu")
# one torch thread per run: tiny models gain nothing from more, and on a busy machine several spin against each
# other (a tiny search here: 6 s with one thread, 19 s with two, beside a training job)
ENV = {"OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ helpers


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "qlp_compress", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **ENV, **(env or {})})


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run; fails unless there is exactly one and no traceback."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checked_onnx(path: Path, full: bool = True) -> onnx.ModelProto:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=full)
    return proto


def check_complete(path: Path) -> None:
    """An output file is whole: JSON parses, ONNX passes onnx.checker, PNG ends with its IEND chunk."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".onnx":
        checked_onnx(path, full=not path.name.endswith(".sparse.onnx"))  # sparse Conv weights fail shape inference
    elif path.suffix == ".png":
        raw = path.read_bytes()
        assert raw.startswith(b"\x89PNG\r\n\x1a\n") and raw[-12:-4] == b"\0\0\0\0IEND", path
    elif path.suffix == ".md":
        assert path.read_text().strip(), path
    else:
        raise AssertionError(f"unexpected file {path}")


def check_outputs(out: Path) -> None:
    """A finished run: every output present and whole, and no work folder or temporary file left."""
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.sparse.onnx", "policy.json", "report.json", "report.md"} <= names, names
    assert ".work" not in names and not any(n.endswith(".tmp") for n in names), names
    for p in out.iterdir():
        check_complete(p)
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["max_abs_diff"] <= 1e-4


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with a small trained LeNet-5 (ONNX and state dict) and a learnable 4-class 28×28 .npz task."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_task(root, n=3300, n_train=3000, steps=40)
    torch.save(model.state_dict(), root / "lenet.pt")
    torch.save(model, root / "lenet_module.pt")  # a whole pickled module: loading it runs code
    return root


def small_graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def image_folder(root: Path, rng: np.random.Generator) -> None:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


@pytest.fixture(scope="module")
def bad(tiny, tmp_path_factory) -> Iterator[Path]:
    """Bad inputs beside the good ones (the good ones are copied in, so that every case works in one folder)."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    for name in ("lenet.onnx", "lenet.pt", "lenet_module.pt", "data.npz"):
        (root / name).write_bytes((tiny / name).read_bytes())
    good = (root / "lenet.onnx").read_bytes()
    (root / "junk.onnx").write_bytes(b"this is a shopping list, not a model\n" * 20)
    (root / "truncated.onnx").write_bytes(good[: len(good) // 2])
    proto = onnx.load(str(root / "lenet.onnx"))
    proto.graph.node[1].input[0] = "never_computed"
    onnx.save(proto, str(root / "checker.onnx"))
    proto = onnx.load(str(root / "lenet.onnx"))
    weight = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    array = numpy_helper.to_array(weight).copy()
    array.flat[7] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(root / "nan.onnx"))
    state = torch.load(root / "lenet.pt", weights_only=True)
    next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4).view(-1)[0] = float("inf")
    torch.save(state, root / "inf.pt")

    image = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])]
    logits = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    kernel = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "kernel")
    onnx.save(small_graph([helper.make_node("Conv", ["x", "kernel"], ["c"]),
                           helper.make_node("ThresholdedRelu", ["c"], ["t"]),
                           helper.make_node("GlobalAveragePool", ["t"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["y"])], image, logits, [kernel]),
              str(root / "odd_operator.onnx"))
    onnx.save(small_graph([helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[14, 14], strides=[14, 14]),
                           helper.make_node("Flatten", ["p"], ["y"])], image, logits),
              str(root / "no_weights.onnx"))
    k3 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "k3")
    fc = numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "fc")
    onnx.save(small_graph([helper.make_node("Conv", ["x", "k3"], ["c"]),
                           helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["f"]),
                           helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [k3, fc]),
              str(root / "any_size.onnx"))

    # external data: inside the model's folder (allowed) and pointing outside it (refused)
    (root / "ext").mkdir()
    onnx.save_model(onnx.load(str(root / "lenet.onnx")), str(root / "ext" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (root / "secret.bin").write_bytes((root / "ext" / "weights.bin").read_bytes())
    proto = onnx.load(str(root / "ext" / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (root / "evil").mkdir()
    onnx.save(proto, str(root / "evil" / "model.onnx"))

    x = rng.integers(0, 255, (60, 1, 32, 32), dtype=np.uint8)
    np.savez(root / "data32.npz", x=x, y=rng.integers(0, 4, 60))  # images of another size
    np.savez(root / "data10.npz", x=x[:, :, 2:30, 2:30], y=np.arange(60) % 10)  # ten classes
    (root / "corrupt.npz").write_bytes((root / "data.npz").read_bytes()[:5000])
    (root / "empty").mkdir()
    for split in ("train", "val"):
        (root / "no_images" / split / "a").mkdir(parents=True)
    image_folder(root / "images", rng)
    (root / "images" / "val" / "a" / "000_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "idx").mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / "idx" / stem).write_bytes(b"\x00\x00\x08\x03\x00\x00")  # a header cut short

    (root / "other_policy.json").write_text(json.dumps({
        "format": "qlp-compress/policy/v1", "method": "uniform", "target_sparsity": 0.5, "model_sha256": "0" * 64,
        "layers": [{"name": "conv", "weights": 10, "sparsity": 0.5}]}))
    (root / "broken_policy.json").write_text('{"method": "uniform", "layers": [')
    (root / "done").mkdir()
    (root / "done" / "model.onnx").write_bytes(good)
    (root / "done" / "policy.json").write_text('{"previous": "run"}\n')
    (root / "existing.onnx").write_bytes(good)
    (root / "locked").mkdir()
    os.chmod(root / "locked", 0o500)
    if os.access(root / "locked", os.W_OK):  # root ignores permissions: "locked" then is a plain file
        (root / "locked").rmdir()
        (root / "locked").write_text("a file where a folder is wanted\n")
    yield root
    if (root / "locked").is_dir():
        os.chmod(root / "locked", 0o700)


@dataclass(frozen=True)
class Case:
    """One bad input: the command line, and what the one error line must say."""

    args: tuple[str, ...]
    code: int  # 2: usage error; 1: failure
    says: tuple[str, ...]  # words the message must contain: the problem and the fix
    env: dict[str, str] = field(default_factory=dict)
    creates_nothing: bool = True  # its --out (when given) does not exist before, and must not exist after


def prune(model: str, *extra: str, data: str = "data.npz", out: str = "out/new") -> tuple[str, ...]:
    return ("prune", model, "--data", data, "--method", "uniform", "--sparsity", "0.5", "--out", out,
            "--finetune-epochs", "0", *DEVICE, *extra)


CASES: dict[str, Case] = {
    # the model file
    "missing_file": Case(("prune", "nowhere.onnx", "--data", "data.npz"), 2, ("nowhere.onnx", "does not exist")),
    "not_a_model": Case(prune("junk.onnx"), 1, ("junk.onnx", "not an ONNX or PyTorch model", "give a .onnx")),
    "truncated_onnx": Case(prune("truncated.onnx"), 1, ("truncated", "export or download it again")),
    "fails_onnx_checker": Case(prune("checker.onnx"), 1, ("onnx.checker", "never_computed", "re-export")),
    "unconvertible_operator": Case(prune("odd_operator.onnx"), 1, ("ThresholdedRelu", "re-export")),
    "no_prunable_layer": Case(prune("no_weights.onnx"), 1, ("no prunable layer", "give a model with")),
    "input_shape_mismatch": Case(prune("lenet.onnx", data="data32.npz"), 2,
                                 ("[1, 28, 28]", "[1, 32, 32]", "pick the data set")),
    "class_count_mismatch": Case(prune("lenet.onnx", data="data10.npz"), 2, ("10 classes", "pick the data set")),
    "nan_weights_onnx": Case(prune("nan.onnx"), 1, ("NaN or inf", "re-export")),
    "inf_weights_state_dict": Case(prune("inf.pt", "--arch", "lenet5"), 1, ("NaN or inf", "re-export")),
    "state_dict_without_arch": Case(prune("lenet.pt"), 2, ("state dict", "--arch")),
    "pickle_without_trust": Case(prune("lenet_module.pt"), 1, ("runs code", "--trust-pickle")),
    "external_data_outside_folder": Case(prune("evil/model.onnx"), 1, ("outside the model's folder",
                                                                        "beside the model")),
    "model_over_size_limit": Case(prune("lenet.onnx"), 1, ("lenet.onnx", "limit", "QLP_MAX_MODEL_BYTES"),
                                  env={"QLP_MAX_MODEL_BYTES": "100000"}),
    # the sparsity
    **{f"sparsity_{name}": Case(("prune", "lenet.onnx", "--data", "data.npz", "--sparsity", value, "--out",
                                 "out/new", *DEVICE), 2, ("--sparsity", "between 0 and 1", "e.g. --sparsity 0.9"))
       for name, value in (("0", "0"), ("1", "1"), ("minus_half", "-0.5"), ("1.5", "1.5"), ("nan", "nan"))},
    "sparsity_not_a_number": Case(("prune", "lenet.onnx", "--sparsity", "lots"), 2, ("--sparsity", "--help")),
    "search_sparsity_1": Case(("search", "lenet.onnx", "--data", "data.npz", "--sparsity", "1", "--out", "out/new",
                               *DEVICE), 2, ("between 0 and 1",)),
    "search_unknown_demonstration": Case(("search", "lenet.onnx", "--data", "data.npz", "--demonstrations",
                                          "lamp,snip", "--out", "out/new", *DEVICE), 2,
                                         ("'snip'", "--demonstrations", "none")),
    # policy.json
    "policy_for_another_model": Case(("prune", "lenet.onnx", "--policy", "other_policy.json", "--data", "data.npz",
                                      "--out", "out/new", *DEVICE), 2, ("another model", "its own policy")),
    "policy_malformed": Case(("prune", "lenet.onnx", "--policy", "broken_policy.json", "--data", "data.npz", "--out",
                              "out/new", *DEVICE), 1, ("not a valid policy.json", "rerun the search")),
    # the data
    "data_folder_missing": Case(prune("lenet.onnx", data="nowhere/images"), 2, ("does not exist", "--data")),
    "data_file_missing": Case(prune("lenet.onnx", data="nowhere.npz"), 2, ("does not exist", "--data")),
    "data_dir_missing": Case(prune("lenet.onnx", "--data-dir", "nowhere", data="fashion-mnist"), 2,
                             ("--data-dir nowhere", "check the path")),
    "data_dir_empty": Case(prune("lenet.onnx", "--data-dir", "empty", data="fashion-mnist"), 1,
                           ("not found in --data-dir empty", "train-images-idx3-ubyte", "apt-get install")),
    "data_dir_corrupt_idx": Case(prune("lenet.onnx", "--data-dir", "idx", data="fashion-mnist"), 1,
                                 ("not a valid idx file", "intact copy")),
    "npz_corrupt": Case(prune("lenet.onnx", data="corrupt.npz"), 1, ("corrupt.npz", "not a readable .npz",
                                                                     "numpy.savez")),
    "npz_over_size_limit": Case(prune("lenet.onnx"), 1, ("data.npz", "limit", "QLP_MAX_DATA_BYTES"),
                                env={"QLP_MAX_DATA_BYTES": "100000"}),
    "image_folder_empty": Case(prune("any_size.onnx", data="empty"), 1, ("train/", "val/")),
    "image_folder_without_images": Case(prune("any_size.onnx", data="no_images"), 1,
                                        ("no valid file", "put images in")),
    "image_folder_corrupt_png": Case(prune("any_size.onnx", data="images"), 1,
                                     ("000_broken.png", "not a readable image", "replace or remove it")),
    # the outputs and the device
    "out_folder_exists": Case(prune("lenet.onnx", out="done"), 2, ("already exists", "--force"),
                              creates_nothing=False),
    "out_file_exists": Case(("export", "lenet.onnx", "--data", "data.npz", "--out", "existing.onnx"), 2,
                            ("already exists", "--force"), creates_nothing=False),
    "out_unwritable": Case(prune("lenet.onnx", out="locked/new"), 1, ("cannot", "choose")),
    "out_under_a_file": Case(prune("lenet.onnx", out="lenet.onnx/new"), 1, ("is a file", "choose another --out")),
    "export_out_under_a_file": Case(("export", "lenet.onnx", "--data", "data.npz", "--out", "lenet.onnx/x.onnx"), 1,
                                    ("is a file", "choose another --out")),
    "cuda_without_gpu": Case(prune("lenet.onnx", "--device", "cuda"), 2, ("no CUDA GPU", "--device cpu")),
}
SKIP_WHEN = {"cuda_without_gpu": torch.cuda.is_available()}


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_in_one_line_and_damages_nothing(name, bad, qlp, monkeypatch):
    if SKIP_WHEN.get(name):
        pytest.skip("a CUDA GPU is present: --device cuda is valid here")
    case = CASES[name]
    for variable, value in case.env.items():
        monkeypatch.setenv(variable, value)
    before = snapshot(bad)
    run = qlp(*case.args, cwd=bad)
    assert run.code == case.code, (run.code, run.stderr[-2000:])
    line = run.line
    for word in case.says:
        assert word.lower() in line.lower(), (word, line)
    assert snapshot(bad) == before  # every file the user had is byte-identical, and nothing was added
    if case.creates_nothing and "--out" in case.args:
        assert not (bad / case.args[case.args.index("--out") + 1]).exists()


@pytest.mark.slow
def test_debug_shows_the_traceback(bad):
    result = run_cli("--debug", "prune", "junk.onnx", "--data", "data.npz", "--out", "out/debug", *DEVICE, cwd=bad)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "QLPError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: junk.onnx is not an ONNX or PyTorch model")


def test_trusted_pickle_and_external_data_inside_the_folder_load(bad, tmp_path):
    """The two refusals above are about safety, not ability: the same files load when allowed."""
    run_app("export", "lenet_module.pt", "--trust-pickle", "--data", "data.npz", "--out",
            tmp_path / "from_pickle.onnx", cwd=bad)
    run_app("export", "ext/model.onnx", "--data", "data.npz", "--out", tmp_path / "from_ext.onnx", cwd=bad)
    reference = export.weight_initializers(checked_onnx(bad / "lenet.onnx"))
    for name in ("from_pickle.onnx", "from_ext.onnx"):
        weights = export.weight_initializers(checked_onnx(tmp_path / name))
        assert sorted(w.size for w in weights.values()) == sorted(w.size for w in reference.values())
        np.testing.assert_array_equal(np.sort(np.concatenate([w.ravel() for w in weights.values()])),
                                      np.sort(np.concatenate([w.ravel() for w in reference.values()])))


# ------------------------------------------------------------------------------------------------ full disk


def full_disk_for(name: str):
    """os.replace that fails with ENOSPC when it would put `name` in place (other renames work)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    return replace


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous model")
    monkeypatch.setattr(qio.os, "replace", full_disk_for("model.onnx"))
    with pytest.raises(QLPError, match=r"No space left on device.*free some disk space.*nothing was overwritten"):
        atomic_write_bytes(target, b"a new model" * 1000)
    assert target.read_bytes() == b"the previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left

    def write_fails(tmp: Path) -> None:  # the disk fills up while the file is written
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(QLPError, match="No space left on device"), atomic_path(target) as tmp:
        write_fails(tmp)
    assert target.read_bytes() == b"the previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_full_disk_through_the_cli(bad, tmp_path, monkeypatch, capsys):
    """The real command in this process, with the disk full when export puts its file in place."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(qio.os, "replace", full_disk_for("model.onnx"))
    monkeypatch.setattr(sys, "argv", ["qlp-compress", "export", str(bad / "lenet.onnx"), "--data",
                                      str(bad / "data.npz"), "--out", str(out), "--force", "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "free some disk space" in lines[0]
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# ------------------------------------------------------------------------------------------------ interruption

# One run (24 episodes in 2 stages, the answer chosen among 3 candidates, 3 fine-tuning epochs) is stopped at every
# kind of point, each time resumed by the next process: SIGINT and SIGTERM in the search and in the fine-tuning,
# SIGINT in the choice of the answer, kill -9 in the search and once model.onnx is staged (policy.json with it). Each
# process stops where the code reaches a known point (tests/paused_cli.py), never after a guessed time, so the test
# proves the same on a fast machine and a loaded one. The first search checkpoint comes at episode 10.
EPISODES, EPOCHS = 24, 3
RUN = ("search", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.8", "--episodes", str(EPISODES), "--stages",
       "2", "--reward-size", "2700", "--reward-images", "400", "--finetune-epochs", str(EPOCHS), *DEVICE)
KILL = "kill -9"


def stopped(args: tuple, pause: str, how: int | str, cwd: Path, marker: Path) -> subprocess.CompletedProcess:
    """Run the CLI until it reaches `pause` (see tests/paused_cli.py), then signal it (or kill -9 it)."""
    process = start_paused(*args, cwd=cwd, pause=pause, marker=marker)
    try:
        wait_for(marker, process, timeout=300)
    except AssertionError:
        process.kill()
        raise
    if how == KILL:
        process.kill()  # SIGKILL: nothing runs after it
    else:
        process.send_signal(how)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def interrupted(result: subprocess.CompletedProcess, says: str) -> str:
    """A run stopped by SIGINT or SIGTERM: exit 130 and one error line that says how to resume."""
    assert result.returncode == 130, result.stderr[-2000:]
    line = error_line(result)
    assert says in line and "--resume" in line, line
    return line


def killed_whole(result: subprocess.CompletedProcess, out: Path) -> None:
    """A run killed by kill -9: no output in OUT before all are complete, every staged or checkpoint file whole
    (an atomic write cut short leaves only a hidden temporary name)."""
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == [".work"]
    staged = out / ".work" / "out"
    for path in staged.iterdir() if staged.is_dir() else ():
        if path.name.endswith((".tmp", ".new")):  # atomic writes cut short: hidden temporary names only
            assert path.name.startswith("."), path
            continue
        check_complete(path)
    for path in (out / ".work").glob("*.ckpt"):
        load_checkpoint(path)


@pytest.mark.slow
def test_a_run_stopped_at_every_stage_resumes_to_a_complete_result(tiny, tmp_path):
    """Each SIGINT/SIGTERM exits 130 with one line that says how to resume and keeps a checkpoint that holds every
    finished episode, candidate or epoch; each kill -9 leaves no half-written output; the choice of the answer keeps
    the candidates already measured (a changed record shows they are not measured again); the last --resume ends
    with every output complete and verified, all episodes and epochs counted."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = (*RUN, "--out", str(out))
    resume = (*args, "--resume")
    search_ckpt = out / ".work" / "search.ckpt"

    # the search: SIGINT in the episode after its first checkpoint, SIGTERM after the resumed run's first, kill -9
    line = interrupted(stopped(args, "reward:1:.work/search.ckpt", signal.SIGINT, tiny, marker),
                       "search interrupted after")
    first = load_checkpoint(search_ckpt)["progress"]["episode"]
    assert 10 <= first < EPISODES and f"after {first} episodes" in line  # the running episode is dropped
    assert [p.name for p in out.iterdir()] == [".work"]
    interrupted(stopped(resume, "reward:1:.work/search.ckpt", signal.SIGTERM, tiny, marker), "search interrupted")
    second = load_checkpoint(search_ckpt)["progress"]["episode"]
    assert max(first + 1, 20) <= second < EPISODES
    killed_whole(stopped(resume, "reward:2", KILL, tiny, marker), out)
    assert load_checkpoint(search_ckpt)["progress"]["episode"] == second

    # the choice of the answer: SIGINT while the second candidate fine-tunes
    interrupted(stopped(resume, "step:1:.work/selection.json", signal.SIGINT, tiny, marker), "interrupted")
    record = out / ".work" / "selection.json"
    document = json.loads(record.read_text())
    finished = document["candidates"]
    assert len(finished) == 1
    finished[0]["held_out_accuracy"] = 1.0  # no fine-tuned model can be this good on the held-out images
    record.write_text(json.dumps({**document, "candidates": finished}))

    # the fine-tuning: SIGINT in its second epoch, SIGTERM in its third (each after the epoch before is saved)
    finetune_ckpt = out / ".work" / "finetune.ckpt"
    for signum, epoch in ((signal.SIGINT, 0), (signal.SIGTERM, 1)):
        line = interrupted(stopped(resume, "step:1:.work/finetune.ckpt", signum, tiny, marker), "fine-tune interrupted")
        assert "finetune.ckpt" in line
        state = load_checkpoint(finetune_ckpt)
        assert state["epoch"] == epoch and len(state["history"]) == epoch + 1
        assert [p.name for p in out.iterdir()] == [".work"]
    killed_whole(stopped(resume, "written:1:.work/out/model.onnx", KILL, tiny, marker), out)

    resumed = run_cli(*resume, cwd=tiny)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_outputs(out)  # the killed writes' temporary files went with .work/
    policy = json.loads((out / "policy.json").read_text())
    assert len(policy["search"]["rewards"]) == EPISODES  # every episode, before and after the interruptions
    assert json.loads((out / "report.json").read_text())["finetune"]["epochs"] == EPOCHS
    selection = policy["search"]["selection"]
    assert len(selection["candidates"]) == 3 and selection["candidates"][0]["held_out_accuracy"] == 1.0
    assert selection["chosen"] == finished[0]["name"]
