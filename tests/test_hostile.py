"""Hostile and broken inputs through the real command line (issue 12), one test per defect found in review.

Most runs call `qlp_compress.cli.main` in this process (capturing file descriptors 1 and 2, so onnxruntime's C++
logs count too); runs that need signals, kill -9, a file-size limit or a fresh interpreter run as subprocesses.
Every failing run must print one `error:` line that names the real problem and the fix, with no traceback, and
leave every file the user had as it was."""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import Run, make_tiny_task, run_app, start_paused, wait_for
from onnx import TensorProto, helper, numpy_helper

from qlp_compress.base import io as qio
from qlp_compress.base import outputs
from qlp_compress.base.errors import QLPError
from qlp_compress.deploy import export
from qlp_compress.deploy.engine import open_session

DEVICE = ("--device", "cpu")
ENV = {"OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ running the CLI
# (in this process: the `qlp` fixture in conftest.py)


def run_cli(*args, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlp_compress", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **ENV}, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small trained LeNet-5 (lenet.onnx) on a learnable 4-class 28×28 task (data.npz), and a finished
    `prune` run of it (base/, whose policy.json belongs to lenet.onnx)."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_task(root, n=700, n_train=600, steps=40)
    with open(root / "lenet_module.pkl", "wb") as f:
        pickle.dump(model, f, protocol=4)  # a whole module as a plain pickle
    run_app("prune", "lenet.onnx", "--data", "data.npz", "--method", "uniform", "--sparsity", "0.5", "--out", "base",
            "--finetune-epochs", "0", *DEVICE, cwd=root)
    return root


@pytest.fixture
def work(tiny, tmp_path) -> Path:
    """A fresh folder with the tiny model, its data and the finished run, for tests that write."""
    for name in ("lenet.onnx", "data.npz", "lenet_module.pkl"):
        shutil.copy(tiny / name, tmp_path / name)
    shutil.copytree(tiny / "base", tmp_path / "base")
    return tmp_path


def prune_args(model: str = "lenet.onnx", data: str = "data.npz", out: str = "out", *extra) -> tuple:
    return ("prune", model, "--data", data, "--method", "uniform", "--sparsity", "0.5", "--out", out,
            "--finetune-epochs", "0", *DEVICE, *extra)


SEARCH = ("--data", "data.npz", "--sparsity", "0.6", "--episodes", "12", "--stages", "1", "--reward-images", "50",
          "--bn-recalibrate", "0", "--finetune-epochs", "0", "--no-sparse-storage", *DEVICE)


# ------------------------------------------------------------------------------------------------ 1. CIFAR-10


def _py2_str(b: bytes) -> bytes:
    """A Python 2 str as cPickle writes it (protocol 2): SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(i: int) -> bytes:
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def py2_cifar_pickle(rows: np.ndarray, labels: list[int], name: bytes) -> bytes:
    """A batch as the CIFAR-10 authors wrote it: Python 2 cPickle, protocol 2, of a dict of str keys, a uint8
    array (numpy.core.multiarray._reconstruct + ndarray.__setstate__) and a list of int labels."""
    n = len(rows)
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
             + b"\x87R(" + _py2_int(1) + _py2_int(n) + _py2_int(3072) + b"\x86"
             + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) * 2 + _py2_int(0) + b"tb"
             + b"\x89" + _py2_str(rows.tobytes()) + b"tb")
    files = b"](" + b"".join(_py2_str(name + b"_%d.png" % i) for i in range(n)) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(name) + _py2_str(b"labels")
            + b"](" + b"".join(_py2_int(v) for v in labels) + b"e" + _py2_str(b"data") + array
            + _py2_str(b"filenames") + files + b"u.")


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(folder: Path, style: str, per_batch: int = 4, seed: int = 0) -> dict[str, tuple]:
    """CIFAR-10 in `style`: "py2" (as the authors pickled it), "py3-protocol2", "py3" (default protocol) or
    "bin" (cifar-10-batches-bin records). Returns each batch's images (N, 3, 32, 32) and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = {}
    for name in CIFAR_NAMES:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        rows = images.reshape(per_batch, 3072)  # 1024 red, 1024 green, 1024 blue, row by row
        if style == "bin":
            records = np.concatenate([labels.astype(np.uint8)[:, None], rows], axis=1)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
        elif style == "py2":
            (folder / name).write_bytes(py2_cifar_pickle(rows, labels.tolist(), name.encode()))
        else:
            doc = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": rows,
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
            (folder / name).write_bytes(pickle.dumps(doc, protocol=2 if style == "py3-protocol2" else None))
        batches[name] = images, labels
    return batches


def cifar_classifier(path: Path) -> None:
    """A small image classifier for CIFAR-10's shape: (N, 3, 32, 32) → 10 logits."""
    rng = np.random.default_rng(3)
    kernel = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "kernel")
    fc = numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "kernel"], ["c"]),
                               helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["f"]),
                               helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [kernel, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def test_cifar_pickles_are_read_exactly_as_numpy_wrote_them() -> None:
    """The restricted reader gives what an unrestricted pickle.load gives, for each way a batch can be pickled."""
    from qlp_compress.data.cifar import read_cifar10_pickle as _read_cifar10_pickle

    rng = np.random.default_rng(0)
    rows, labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [3, 0, 9]
    doc = {b"labels": labels, b"data": rows}
    for raw in (py2_cifar_pickle(rows, labels, b"x"), pickle.dumps(doc, protocol=2), pickle.dumps(doc),
                pickle.dumps(doc, protocol=5)):
        reference = pickle.loads(raw, encoding="bytes")  # what the CIFAR-10 page says to do (runs anything)
        np.testing.assert_array_equal(reference[b"data"], rows)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qlp-cifar-{os.getpid()}"
        path.write_bytes(raw)
        try:
            x, y = _read_cifar10_pickle(path)
        finally:
            path.unlink()
        np.testing.assert_array_equal(x, rows.reshape(3, 3, 32, 32))
        np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("style", ["py2", "py3-protocol2", "py3", "bin"])
def test_cifar10_versions_through_the_cli(tmp_path, qlp, style) -> None:
    """evaluate --data cifar10 reads each version, and its accuracy is onnxruntime's on the test batch."""
    batches = write_cifar(tmp_path / ("cifar-10-batches-bin" if style == "bin" else "cifar-10-batches-py"), style,
                          per_batch=20)
    cifar_classifier(tmp_path / "cifar.onnx")
    run = qlp("evaluate", "cifar.onnx", "--data", "cifar10", "--data-dir", ".", "--repeats", "1", *DEVICE, "--json",
              cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    images, labels = batches["test_batch"]
    logits = open_session(tmp_path / "cifar.onnx").run(None, {"x": images.astype(np.float32) / 255})[0]
    result = json.loads(run.stdout)
    assert result["test_images"] == 20
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))


class _Payload:
    """A pickle that calls `function(*args)` when it is loaded."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when loaded: through builtins, os, and a numpy helper that runs code."""
    import numpy.testing._private.utils as numpy_utils

    return {
        "builtins.open": pickle.dumps(_Payload(open, str(marker), "w"), protocol=2),
        "os.system": pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2),
        "numpy runstring": pickle.dumps(_Payload(numpy_utils.runstring, f"open({str(marker)!r}, 'w')", {}),
                                        protocol=2),
        "inside the dict": pickle.dumps({b"data": _Payload(open, str(marker), "w"), b"labels": [1]}, protocol=2),
    }


@pytest.mark.parametrize("position", CIFAR_NAMES)
def test_poisoned_cifar_pickle_never_runs(tmp_path, qlp, position) -> None:
    cifar_classifier(tmp_path / "cifar.onnx")
    marker = tmp_path / "PWNED"
    for payload_name, payload in payloads(marker).items():
        folder = tmp_path / payload_name.replace(" ", "_") / "cifar-10-batches-py"
        write_cifar(folder, "py2")
        (folder / position).write_bytes(payload)
        before = snapshot(tmp_path)
        run = qlp("evaluate", "cifar.onnx", "--data", "cifar10", "--data-dir", folder.parent, "--repeats", "1",
                  *DEVICE, cwd=tmp_path)
        assert not marker.exists(), f"{payload_name} in {position} ran code"
        assert run.code == 1
        line = run.line
        assert position in line and "not a CIFAR-10 batch" in line and "intact copy" in line, line
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("position", CIFAR_NAMES)
def test_damaged_cifar_binary_batches(tmp_path, qlp, position) -> None:
    cifar_classifier(tmp_path / "cifar.onnx")
    damages = {
        "a pickle": lambda raw: pickle.dumps(_Payload(open, str(tmp_path / "PWNED"), "w")),
        "cut short": lambda raw: raw[:-100],
        "label 200": lambda raw: bytes([200]) + raw[1:],
        "empty": lambda raw: b"",
    }
    for damage, make in damages.items():
        folder = tmp_path / damage.replace(" ", "_") / "cifar-10-batches-bin"
        write_cifar(folder, "bin")
        path = folder / f"{position}.bin"
        path.write_bytes(make(path.read_bytes()))
        run = qlp("evaluate", "cifar.onnx", "--data", "cifar10", "--data-dir", folder.parent, "--repeats", "1",
                  *DEVICE, cwd=tmp_path)
        assert run.code == 1, (damage, run.stderr[-1000:])
        assert f"{position}.bin is not a CIFAR-10 batch" in run.line, (damage, run.line)
        assert not (tmp_path / "PWNED").exists()


def test_cifar_folder_without_a_batch(tmp_path, qlp) -> None:
    cifar_classifier(tmp_path / "cifar.onnx")
    write_cifar(tmp_path / "cifar-10-batches-bin", "bin")
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").unlink()
    run = qlp("evaluate", "cifar.onnx", "--data", "cifar10", "--data-dir", ".", "--repeats", "1", *DEVICE,
              cwd=tmp_path)
    assert run.code == 1 and "data_batch_4.bin is missing" in run.line


# ------------------------------------------------------------------------------------------------ 2. labels


@pytest.mark.parametrize("labels, says", [
    (lambda y: y[:, None], ("a column", "y.reshape(-1)")),
    (lambda y: np.eye(4, dtype=np.float32)[y], ("one-hot", "y.argmax(1)")),
    (lambda y: y.astype(bool), ("dtype bool", "integer class numbers")),
    (lambda y: np.where(np.arange(len(y)) == 3, np.nan, y), ("NaN", "whole class numbers")),
    (lambda y: y + 0.5, ("fractions",)),
], ids=["column", "one-hot", "bool", "nan", "fractions"])
def test_labels_of_the_wrong_shape_or_type_are_refused(work, qlp, labels, says) -> None:
    with np.load(work / "data.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y"] = labels(arrays["y"])
    np.savez(work / "bad.npz", **arrays)
    before = snapshot(work)
    run = qlp(*prune_args(data="bad.npz"), cwd=work)
    assert run.code == 1
    for word in ("bad.npz", *says):
        assert word in run.line, (word, run.line)
    assert snapshot(work) == before and not (work / "out").exists()


def test_whole_float_labels_are_converted(work, qlp) -> None:
    """A conversion that is certain is done silently: float labels that are whole numbers."""
    with np.load(work / "data.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y"], arrays["y_test"] = arrays["y"].astype(np.float64), arrays["y_test"].astype(np.float32)
    np.savez(work / "float_labels.npz", **arrays)
    float_run = qlp("evaluate", "lenet.onnx", "--data", "float_labels.npz", "--repeats", "1", *DEVICE, "--json",
                    cwd=work)
    int_run = qlp("evaluate", "lenet.onnx", "--data", "data.npz", "--repeats", "1", *DEVICE, "--json", cwd=work)
    assert float_run.code == int_run.code == 0
    assert json.loads(float_run.stdout)["accuracy"] == json.loads(int_run.stdout)["accuracy"]


# ------------------------------------------------------------------------------------------------ 3. NaN models


@pytest.mark.parametrize("option, value", [("--mean", "nan"), ("--mean", "inf"), ("--std", "nan"), ("--std", "0"),
                                           ("--std", "inf"), ("--std", "-1")])
def test_mean_and_std_must_be_finite_and_std_non_zero(work, qlp, option, value) -> None:
    values = {"--mean": "0", "--std": "1", option: value}
    run = qlp("export", "lenet.onnx", "--data", "data.npz", "--out", "x.onnx", "--mean", values["--mean"],
              "--std", values["--std"], cwd=work)
    assert run.code == 2
    assert option in run.line and value in run.line.replace("-1.0", "-1"), run.line
    assert not (work / "x.onnx").exists()


def nan_output_model(path: Path) -> None:
    """A classifier with finite weights whose output is NaN for every image in [0, 1]: log(-(x + 1))."""
    rng = np.random.default_rng(0)
    kernel = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "kernel")
    fc = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "fc")
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["a"]), helper.make_node("Neg", ["a"], ["n"]),
                               helper.make_node("Log", ["n"], ["l"]), helper.make_node("Conv", ["l", "kernel"], ["c"]),
                               helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["f"]),
                               helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [kernel, fc, one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def test_a_model_that_outputs_nan_is_refused(work, qlp) -> None:
    nan_output_model(work / "nan_out.onnx")
    run = qlp("export", "nan_out.onnx", "--data", "data.npz", "--out", "x.onnx", cwd=work)
    assert run.code == 1 and "NaN or inf" in run.line and "re-export" in run.line
    assert not (work / "x.onnx").exists()


def test_verification_fails_on_non_finite_output_on_either_side() -> None:
    from qlp_compress.train.zoo import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", 1, 4, (0.2,), (0.3,)).eval()

    class NaNOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x) * float("nan")

    good, nan_bytes = export.to_onnx_bytes(model, (1, 28, 28)), export.to_onnx_bytes(NaNOut(), (1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    export.verify_onnx(model, good, x, {"conv": model[1].features[0].weight != 0})  # the healthy pair passes
    with pytest.raises(QLPError, match=r"NaN or inf.*\(PyTorch\)"):
        export.verify_onnx(NaNOut(), good, x, {})
    with pytest.raises(QLPError, match=r"NaN or inf.*\(onnxruntime\)"):
        export.verify_onnx(model, nan_bytes, x, {})


# ------------------------------------------------------------------------------------------------ 4. policy files


def edited_policy(tiny: Path, folder: Path, **changes) -> Path:
    doc = json.loads((tiny / "base" / "policy.json").read_text())
    doc.update(changes)
    path = folder / "edited.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("changes, says", [
    ({"method": "/../../../../outside"}, "method"),
    ({"method": "lamp/../../x"}, "method"),
    ({"target_sparsity": float("nan")}, "target_sparsity"),
    ({"target_sparsity": 1.5}, "target_sparsity"),
    ({"target_sparsity": 0}, "target_sparsity"),
    ({"layers": [{"name": "x", "weights": -3, "sparsity": 0.5}]}, "layer entry"),
    ({"seed": "zero"}, "seed"),
], ids=["path-escape", "path-in-name", "nan-target", "target-above-1", "target-0", "negative-weights", "seed-text"])
def test_a_policy_file_is_checked_before_it_is_used(tiny, work, qlp, changes, says) -> None:
    nested = work / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(work / "lenet.onnx", nested / "lenet.onnx")
    policy = edited_policy(tiny, work, **changes)
    before = snapshot(work)
    run = qlp("prune", "a/b/lenet.onnx", "--policy", policy.name, "--data", "data.npz", *DEVICE, cwd=work)
    assert run.code == 1
    assert "not a valid policy.json" in run.line and says in run.line and "rerun the search" in run.line
    assert snapshot(work) == before
    assert sorted(p.name for p in work.iterdir()) == sorted(["a", "base", "data.npz", "edited.json", "lenet.onnx",
                                                             "lenet_module.pkl"])
    assert sorted(p.name for p in nested.iterdir()) == ["lenet.onnx"]  # no MODEL.METHOD-S/ folder, nothing outside


def test_a_valid_policy_still_applies(tiny, work, qlp) -> None:
    run = qlp("prune", "lenet.onnx", "--policy", "base/policy.json", "--data", "data.npz", "--out", "again",
              "--no-sparse-storage", "--finetune-epochs", "0", *DEVICE, cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads((work / "again" / "policy.json").read_text())["layers"] == \
        json.loads((work / "base" / "policy.json").read_text())["layers"]


def test_deeply_nested_policy(work, qlp) -> None:
    (work / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    run = qlp("prune", "lenet.onnx", "--policy", "deep.json", "--data", "data.npz", "--out", "o", *DEVICE, cwd=work)
    assert run.code == 1 and "deep.json is not a valid policy.json (nested too deeply)" in run.line


# ------------------------------------------------------------------------------------------------ 5. external data


@pytest.fixture
def external(work) -> Path:
    """sub/model.onnx with its weights in sub/w.bin."""
    (work / "sub").mkdir()
    onnx.save_model(onnx.load(str(work / "lenet.onnx")), str(work / "sub" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    return work


def test_external_data_is_read_relative_to_the_model(external, qlp) -> None:
    work = external
    here = qlp("evaluate", "lenet.onnx", "--data", "data.npz", "--repeats", "1", *DEVICE, "--json", cwd=work)
    there = qlp("evaluate", "sub/model.onnx", "--data", "data.npz", "--repeats", "1", *DEVICE, "--json", cwd=work)
    assert here.code == there.code == 0, there.stderr[-2000:]
    assert json.loads(there.stdout)["accuracy"] == json.loads(here.stdout)["accuracy"]
    assert json.loads(there.stdout)["weights"] == json.loads(here.stdout)["weights"]
    (work / "elsewhere").mkdir()
    exported = qlp("export", "../sub/model.onnx", "--data", "../data.npz", "--out", "x.onnx", cwd=work / "elsewhere")
    assert exported.code == 0, exported.stderr[-2000:]
    weights = [export.weight_initializers(onnx.load(str(path))) for path in (work / "elsewhere" / "x.onnx",
                                                                            work / "lenet.onnx")]
    np.testing.assert_array_equal(*(np.sort(np.concatenate([w.ravel() for w in ws.values()])) for ws in weights))


def _edit_external(work: Path, **entries: str) -> None:
    proto = onnx.load(str(work / "sub" / "model.onnx"), load_external_data=False)
    tensor = proto.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key in entries:
            entry.value = entries.pop(entry.key)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    onnx.save(proto, str(work / "sub" / "model.onnx"))


@pytest.mark.parametrize("entries, says", [
    ({"location": ""}, "empty location"),
    ({"location": "folder"}, "which is a folder"),
    ({"location": "gone.bin"}, "which is missing"),
    ({"location": "../data.npz"}, "outside the model's folder"),
    ({"length": str(10**12)}, "but that file holds"),
    ({"offset": str(10**12)}, "but that file holds"),
    ({"offset": "x"}, "not a whole number"),
], ids=["empty", "folder", "missing", "outside", "huge-length", "huge-offset", "bad-offset"])
def test_external_data_messages_name_the_problem(external, qlp, entries, says) -> None:
    work = external
    (work / "sub" / "folder").mkdir()
    _edit_external(work, **entries)
    for command in (("evaluate", "sub/model.onnx", "--data", "data.npz", "--repeats", "1", *DEVICE),
                    ("export", "sub/model.onnx", "--data", "data.npz", "--out", "x.onnx")):
        run = qlp(*command, cwd=work)
        assert run.code == 1
        assert [line for line in run.stderr.splitlines() if line.strip()] == [run.line]  # nothing else printed
        assert says in run.line and "…" not in run.line, run.line


# ------------------------------------------------------------------------------------------------ 6. outputs as a set


def full_disk_for(name: str, where: Path | None = None):
    """os.replace that fails with ENOSPC, once, when it would put a file called `name` in place (in `where` only,
    when given); other renames work."""
    real, failed = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name and (where is None or Path(dst).parent.resolve() == where.resolve()) \
                and not failed:
            failed.append(dst)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    return replace


@pytest.mark.parametrize("where", ["writing model.onnx", "putting report.md in place"])
def test_a_failed_force_run_leaves_the_previous_outputs(work, qlp, monkeypatch, where) -> None:
    before = snapshot(work)
    if where == "writing model.onnx":
        monkeypatch.setattr(qio.os, "replace", full_disk_for("model.onnx"))
    else:  # the files are complete and the swap into the folder fails half-way: it is rolled back
        monkeypatch.setattr(outputs.os, "replace", full_disk_for("report.md", work / "base"))
    run = qlp(*prune_args(out="base"), "--sparsity", "0.7", "--force", cwd=work)
    monkeypatch.undo()
    assert run.code == 1
    assert "No space left on device" in run.line and ("nothing was overwritten" in run.line
                                                      or "the previous files are as they were" in run.line)
    assert snapshot(work) == before  # every old output, byte for byte, and nothing new (no .work left)


def test_export_writes_its_two_files_together(work, qlp, monkeypatch) -> None:
    """export --sparse-storage writes FILE.onnx and FILE.sparse.onnx: a failure at the second keeps the first."""
    args = ("export", "lenet.onnx", "--data", "data.npz", "--out", "e.onnx", "--sparse-storage")
    assert qlp(*args, cwd=work).code == 0
    (work / "e.onnx").write_bytes(b"the user's own e.onnx")  # so that a rewrite would show
    before = snapshot(work)
    monkeypatch.setattr(outputs.os, "replace", full_disk_for("e.sparse.onnx", work))
    run = qlp(*args, "--force", cwd=work)
    monkeypatch.undo()
    assert run.code == 1 and "No space left on device" in run.line and "previous files are as they were" in run.line
    assert snapshot(work) == before


@pytest.mark.slow
def test_an_interrupted_force_run_holds_its_lock_keeps_the_previous_outputs_and_resumes(work, qlp,
                                                                                        tmp_path_factory) -> None:
    """prune --force into an existing folder, stopped in its fine-tuning's second epoch (a point the code reaches,
    tests/paused_cli.py): while it runs, a second run there (--resume) is refused; SIGINT then leaves the old
    outputs, all of them, and the checkpoint; `prune --resume` (the advice given) continues, and the finished run
    replaces every output."""
    old = {name: data for name, data in snapshot(work / "base").items()}
    args = (*prune_args(out="base"), "--sparsity", "0.7", "--finetune-epochs", "3", "--force")
    marker = tmp_path_factory.mktemp("pause") / "paused"
    process = start_paused(*args, cwd=work, pause="step:1:.work/finetune.ckpt", marker=marker)
    try:
        wait_for(marker, process)
        second = qlp(*args, "--resume", cwd=work)
        assert process.poll() is None  # paused: the first run still holds the folder
        assert second.code == 1 and "another qlp-compress run is using base" in second.line, second.stderr[-2000:]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    line = Run(130, "", stderr).line
    assert "fine-tune interrupted" in line and "--resume" in line
    now = snapshot(work / "base")
    assert {k: v for k, v in now.items() if not k.startswith(".work")} == old
    assert ".work/finetune.ckpt" in now and not any(k.startswith(".work/out") for k in now)

    resumed = qlp(*args, "--resume", cwd=work)
    assert resumed.code == 0, resumed.stderr[-2000:]
    new = snapshot(work / "base")
    assert new.keys() == old.keys() and all(new[k] != old[k] for k in ("model.onnx", "policy.json", "report.json"))
    assert json.loads(new["policy.json"])["target_sparsity"] == 0.7
    assert json.loads(new["report.json"])["finetune"]["epochs"] == 3


def test_resume_never_replaces_a_finished_run(work, qlp) -> None:
    before = snapshot(work)
    run = qlp("search", "lenet.onnx", *SEARCH, "--out", "base", "--resume", cwd=work)
    assert run.code == 2 and "finished run" in run.line and "nothing to resume" in run.line and "--force" in run.line
    assert snapshot(work) == before


def test_finetune_resume_never_overwrites_its_output(work, qlp) -> None:
    shutil.copy(work / "base" / "model.onnx", work / "tuned.onnx")
    before = snapshot(work)
    run = qlp("finetune", "base/model.onnx", "--data", "data.npz", "--finetune-epochs", "0.1", "--out", "tuned.onnx",
              "--resume", *DEVICE, cwd=work)
    assert run.code == 2 and "tuned.onnx already exists" in run.line and "--force" in run.line
    assert snapshot(work) == before
    (work / ".other.onnx.qlp-ckpt").write_bytes(b"an interrupted run's")  # nor is the checkpoint started over
    run = qlp("finetune", "base/model.onnx", "--data", "data.npz", "--finetune-epochs", "0.1", "--out", "other.onnx",
              *DEVICE, cwd=work)
    assert run.code == 2 and ".other.onnx.qlp-ckpt already exists" in run.line and "--resume" in run.line
    assert (work / ".other.onnx.qlp-ckpt").read_bytes() == b"an interrupted run's"
    assert not (work / "other.onnx").exists()
    run = qlp("finetune", "base/model.onnx", "--data", "data.npz", "--finetune-epochs", "0.1", "--out", "tuned.onnx",
              "--force", *DEVICE, cwd=work)
    assert run.code == 0 and (work / "tuned.onnx").read_bytes() != before["tuned.onnx"]


@pytest.mark.parametrize("killed_at", [2, 5, 10], ids=["first-move", "moving-old-away", "moving-new-in"])
def test_a_swap_cut_short_by_kill_9_is_finished_by_the_next_run(work, monkeypatch, killed_at) -> None:
    """The journal: a run killed while it moves the previous files away or the new ones in."""
    old = snapshot(work / "base")
    run = outputs.OutputRun(work / "base", force=True, resume=False)
    run.__enter__()
    for name in ("model.onnx", "policy.json", "report.md"):
        (run.staging / name).write_text(f"new {name}")
    moves = []
    real = os.replace

    def killed(src, dst):
        if len(moves) == killed_at:  # the new record and the journal, then 7 previous files out (the record too),
            #                          then 4 new ones in
            raise SystemExit("killed")  # stands for kill -9: nothing after it runs
        moves.append(dst)
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", killed)
    with pytest.raises(SystemExit):
        run.commit()
    monkeypatch.undo()
    run.lock.release(delete=False)  # the kernel releases a killed process's lock
    assert (work / "base" / ".work" / "commit.json").exists()
    outputs.OutputRun(work / "base", force=True, resume=True).__enter__()  # the next run finishes the swap first
    now = snapshot(work / "base")
    assert {k: now[k] for k in ("model.onnx", "policy.json", "report.md")} == \
        {k: f"new {k}".encode() for k in ("model.onnx", "policy.json", "report.md")}
    assert not any(k in now for k in old if k not in ("model.onnx", "policy.json", "report.md", ".qlp-outputs.json"))
    assert json.loads(now[".qlp-outputs.json"])["files"] == ["model.onnx", "policy.json", "report.md"]


# ------------------------------------------------------------------------------------------------ 7. advice that works


def test_debug_after_the_command_name(work, qlp) -> None:
    (work / "junk.onnx").write_text("not a model\n" * 10)
    for args in (("--debug", *prune_args("junk.onnx")), (*prune_args("junk.onnx"), "--debug")):
        run = qlp(*args, cwd=work)
        assert run.code == 1
        assert "Traceback" in run.stderr and "QLPError" in run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("error: junk.onnx is not an ONNX or PyTorch model")


@pytest.mark.parametrize("bad, says", [
    (("--episodes", "0"), "--episodes must be at least 1"),
    (("--episodes", "3", "--stages", "4"), "too few for 4 curriculum stages"),
    (("--passes", "0"), "--passes must be at least 1"),
    (("--lr", "nan"), "--lr must be a finite number > 0"),
    (("--seed", "-1"), "--seed must be a whole number"),
    (("--reward-images", "0"), "--reward-images must be at least 1"),
    (("--reward-images", "-5"), "--reward-images must be at least 1"),
    (("--stages", "0"), "--stages must be at least 1"),
    (("--stages", "-3"), "--stages must be at least 1"),
    (("--bn-recalibrate", "-1"), "--bn-recalibrate must be at least 0"),
    (("--finetune-epochs", "nan"), "--finetune-epochs must be a finite number ≥ 0"),
    (("--reward-size", "0"), "--reward-size must be at least 1"),
    (("--reward-finetune-from", "nan"), "--reward-finetune-from must lie in (0, 1]"),
    (("--method", "/../x"), "--method must be one of"),
], ids=lambda v: v if isinstance(v, str) else "_".join(v))
def test_arguments_are_checked_before_anything_is_written(work, qlp, bad, says) -> None:
    before = snapshot(work)
    run = qlp("search", "lenet.onnx", *SEARCH, "--out", "new", *bad, cwd=work)
    assert run.code == 2 and says in run.line, run.line
    assert snapshot(work) == before and not (work / "new").exists()


@pytest.mark.slow
def test_the_corrected_command_runs_after_a_refused_one(work, qlp) -> None:
    assert qlp("search", "lenet.onnx", *SEARCH, "--out", "new", "--episodes", "0", cwd=work).code == 2
    run = qlp("search", "lenet.onnx", *SEARCH, "--out", "new", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert len(json.loads((work / "new" / "policy.json").read_text())["search"]["rewards"]) == 12


@pytest.mark.parametrize("command", [
    ("evaluate", "lenet.onnx", "--data", "data.npz", "--repeats", "0"),
    ("prune", "lenet.onnx", "--data", "data.npz", "--min-density", "1"),
    ("compare", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.5", "--method", ","),
    ("compare", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.5", "--method", "lamp,../x"),
    ("finetune", "lenet.onnx", "--data", "data.npz", "--out", "t.onnx", "--finetune-epochs", "nan"),
    ("finetune", "lenet.onnx", "--data", "data.npz", "--out", "t.onnx", "--lr", "-1"),
    ("train", "lenet5", "--data", "data.npz", "--out", "t.onnx", "--epochs", "0"),
    ("train", "lenet5", "--data", "data.npz", "--out", "t.onnx", "--batch-size", "0"),
    ("train", "lenet5", "--data", "data.npz", "--out", "t.onnx", "--schedule", "linear"),
    ("train", "nosuch", "--data", "data.npz", "--out", "t.onnx"),
], ids=lambda c: "_".join(c[:1] + c[-2:]))
def test_other_commands_refuse_bad_values_at_once(work, qlp, command) -> None:
    before = snapshot(work)
    run = qlp(*command, *DEVICE, cwd=work)
    assert run.code == 2, run.stderr[-2000:]
    assert run.line.startswith("error: --") or "architecture" in run.line
    assert snapshot(work) == before


# ------------------------------------------------------------------------------------------------ 8. plain messages


@pytest.mark.parametrize("arrays, says", [
    ({"x": np.zeros((0, 1, 28, 28), np.uint8), "y": np.zeros(0, np.int64)}, "holds no images"),
    ({"x": np.zeros((1, 1, 28, 28), np.uint8), "y": np.zeros(1, np.int64)}, "holds 1 image(s)"),
    ({"x": np.zeros((40, 1, 28, 28), np.uint16), "y": np.arange(40) % 4}, "dtype uint16"),
    ({"x": np.full((40, 1, 28, 28), np.nan, np.float32), "y": np.arange(40) % 4}, "NaN or inf pixel values"),
    ({"x": np.zeros((40, 1, 28, 28), np.uint8), "y": np.arange(40) % 4, "x_test": np.zeros((8, 1, 20, 20), np.uint8),
      "y_test": np.arange(8) % 4}, "`x_test` have shape [1, 20, 20]"),
    ({"x": np.zeros((40, 1, 28, 28), np.uint8), "y": np.arange(40) % 4, "x_test": np.zeros((8, 1, 28, 28), np.uint8)},
     "no `y_test`"),
], ids=["empty", "one-image", "uint16", "nan-pixels", "test-20x20", "x_test-alone"])
def test_data_sets_that_cannot_work_are_refused_before_the_search(work, qlp, arrays, says) -> None:
    np.savez(work / "odd.npz", **arrays)
    before = snapshot(work)
    run = qlp("search", "lenet.onnx", *SEARCH, "--data", "odd.npz", "--out", "new", cwd=work)
    assert run.code == 1 and "odd.npz" in run.line and says in run.line, run.line
    assert "--reward-size" not in run.line and "must lie in [0, 1]" not in run.line
    assert snapshot(work) == before and not (work / "new").exists()


def test_an_output_path_with_brackets(work, qlp) -> None:
    run = qlp("export", "lenet.onnx", "--data", "data.npz", "--out", "we[/b]ird.onnx", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert (work / "we[" / "b]ird.onnx").is_file() and "wrote we[/b]ird.onnx" in run.stdout  # the result line


@pytest.mark.slow
def test_full_disk_while_saving_the_search_checkpoint(work) -> None:
    """The first file a search writes is its checkpoint: with writes limited to 20 kB (as on a full disk) the run
    stops with the one-line message, not torch's RuntimeError."""

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = run_cli("search", "lenet.onnx", *SEARCH, "--out", "full", cwd=work, preexec_fn=small_files)
    assert result.returncode == 1, result.stderr[-2000:]
    line = Run(1, result.stdout, result.stderr).line
    assert "search.ckpt failed (File too large)" in line and "nothing was overwritten" in line


def _damaged(work: Path, how: str) -> str:
    """lenet.onnx damaged in one of the ways the fuzz run found (a case each, kept as a regression test)."""
    proto = onnx.load(str(work / "lenet.onnx"))
    if how == "non-UTF-8 text":  # protobuf will not store invalid text: store valid text, then damage its bytes
        proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batQh"
    elif how == "data type":
        weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
        weight.data_type = TensorProto.FLOAT16  # its raw data now holds twice as many values as its shape
    elif how == "group":
        conv = [n for n in proto.graph.node if n.op_type == "Conv"][1]
        next(a for a in conv.attribute if a.name == "group").i = 4  # 6 input channels are not 4 groups
    raw = proto.SerializeToString().replace(b"batQh", b"bat\xdbh")
    (work / "damaged.onnx").write_bytes(raw)
    return "damaged.onnx"


@pytest.mark.parametrize("how, evaluate_says, export_says", [
    ("non-UTF-8 text", "is not UTF-8 text", "is not UTF-8 text"),
    ("data type", "onnxruntime cannot load", "does not hold the data its shape"),
    ("group", "onnxruntime cannot", "damaged.onnx"),
])
def test_damage_the_fuzz_run_found(work, qlp, how, evaluate_says, export_says) -> None:
    name = _damaged(work, how)
    for command, says in ((("evaluate", name, "--data", "data.npz", "--repeats", "1", *DEVICE), evaluate_says),
                          (("export", name, "--data", "data.npz", "--out", "x.onnx"), export_says)):
        run = qlp(*command, cwd=work)
        assert run.code == 1, run.stderr[-2000:]
        assert [line for line in run.stderr.splitlines() if line.strip()] == [run.line]
        assert says in run.line, run.line


# ------------------------------------------------------------------------------------------------ 10. messages


@pytest.mark.slow
def test_resume_with_other_settings_gives_advice_that_works(work, qlp, monkeypatch) -> None:
    from qlp_compress.search import curriculum as search

    real, calls = search._play_episode, []

    def interrupted_at_11(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "_play_episode", interrupted_at_11)
    assert qlp("search", "lenet.onnx", *SEARCH, "--out", "s", cwd=work).code == 130
    monkeypatch.setattr(search, "_play_episode", real)
    other = ("--episodes", "14")
    run = qlp("search", "lenet.onnx", *SEARCH, *other, "--out", "s", "--resume", cwd=work)
    assert run.code == 2 and "other settings" in run.line and "--force instead of --resume" in run.line
    assert "without --resume" not in run.line
    run = qlp("search", "lenet.onnx", *SEARCH, *other, "--out", "s", "--force", cwd=work)  # the advice, followed
    assert run.code == 0, run.stderr[-2000:]
    assert len(json.loads((work / "s" / "policy.json").read_text())["search"]["rewards"]) == 14


# ------------------------------------------------------------------------------------------------ 11. one line


@pytest.mark.slow
def test_huge_external_data_length_is_one_line(external) -> None:
    work = external
    _edit_external(work, length=str(10**12))  # (export's message: in this process, test_external_data_messages...)
    result = run_cli("evaluate", "sub/model.onnx", "--data", "data.npz", "--repeats", "1", *DEVICE, cwd=work)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sub/model.onnx keeps tensor"), result.stderr
    assert "but that file holds" in lines[0] and len(lines[0]) < 400


@pytest.mark.slow
def test_refused_pickle_is_one_line(work) -> None:
    result = run_cli(*prune_args("lenet_module.pkl"), "--quiet", cwd=work)  # no phase line on a slow machine
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--trust-pickle" in lines[0], result.stderr


def test_a_finished_run_removes_the_temporaries_a_kill_left(tmp_path) -> None:
    """A kill -9 during an atomic write leaves a hidden `.NAME.*.tmp` in OUT/.work; the resumed run, once its files
    are in place, removes it with .work (it is never an output), and leaves the user's own files alone."""
    out = tmp_path / "run"
    (out / ".work").mkdir(parents=True)
    stray = out / ".work" / ".search.ckpt.k1ll3d.tmp"
    stray.write_bytes(b"cut short")
    (out / "notes.txt").write_text("the user's")
    with outputs.OutputRun(out, force=True, resume=True) as run:
        (run.staging / "policy.json").write_text("{}")
        run.commit()
    assert sorted(p.name for p in out.iterdir()) == [".qlp-outputs.json", "notes.txt", "policy.json"]
