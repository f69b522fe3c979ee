"""int8 (onnxruntime static quantization): against the float model's outputs, zeros read back from the files,
calibration on the reward split, the CLI end to end, and bad input as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_task, run_app
from onnx import TensorProto, helper, numpy_helper

from qlp_compress.base import machine
from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.data import load_dataset, make_splits, materialize
from qlp_compress.deploy import export, quantize
from qlp_compress.deploy.engine import open_session
from qlp_compress.workflows import DataSettings, quantize_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small LeNet-5 trained on a learnable 4-class .npz task, and a copy of it with a random half of every
    weight layer set to zero (random, not by magnitude: large weights among the zeros)."""
    root = tmp_path_factory.mktemp("int8")
    make_tiny_task(root, n=1500, n_train=1000, steps=80)
    proto = onnx.load(str(root / "lenet.onnx"))
    rng = np.random.default_rng(0)
    names = set(export.weight_initializers(proto))
    for tensor in proto.graph.initializer:
        if tensor.name in names:
            w = numpy_helper.to_array(tensor).copy()
            w[rng.random(w.shape) < 0.5] = 0
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    onnx.save(proto, str(root / "pruned.onnx"))
    return root


def splits_of(root: Path):
    return make_splits(load_dataset(str(root / "data.npz")))


def held_out_images(root: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(root / "data.npz")
    return d["x_test"].astype(np.float32) / 255, d["y_test"]


def logits(model: Path | bytes, x: np.ndarray) -> np.ndarray:
    session = open_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def stored_weights(proto: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Read independently of the library: for every Conv/Gemm in graph order, its weight as stored in the file
    (a float initializer, or the raw int8 initializer behind a DequantizeLinear) and the int8 zero point."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w = node.input[1]
        if w in inits:
            out.append((inits[w], None))
        else:
            dq = producer[w]
            assert dq.op_type == "DequantizeLinear"
            out.append((inits[dq.input[0]], inits[dq.input[2]]))
    return out


def int8_of(tiny: Path, model: str, **settings) -> tuple[bytes, dict]:
    splits = splits_of(tiny)
    return quantize.quantize_int8((tiny / model).read_bytes(), splits.reward,
                                  quantize.QuantizeSettings(**settings), model)


def test_int8_agrees_with_the_float_model(tiny):
    int8, info = int8_of(tiny, "lenet.onnx")
    x, _ = held_out_images(tiny)
    reference, got = logits(tiny / "lenet.onnx", x), logits(int8, x)
    assert np.isfinite(got).all()
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.98
    spread = reference.max() - reference.min()
    assert np.abs(got - reference).max() < 0.1 * spread  # close to the float logits, not just the same argmax
    # what the file is: QDQ, int8 weights with zero point 0 (symmetric) per channel, uint8 activations
    proto = onnx.load_from_string(int8)
    weights = stored_weights(proto)
    assert all(w.dtype == np.int8 and (zp == 0).all() and zp.size == w.shape[0] for w, zp in weights)
    # right on every CPU: 7-bit weights, so u8×s8 pairs cannot overflow 16 bits on x86 without VNNI
    assert all(np.abs(w.astype(int)).max() <= 64 for w, _ in weights)
    assert max(np.abs(w.astype(int)).max() for w, _ in weights) > 32  # the 7 bits are used, not fewer
    inits = {t.name: t for t in proto.graph.initializer}
    activation_zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(t.data_type == TensorProto.UINT8 for t in activation_zero_points)
    assert info["calibration_images"] == 100 and info["float_layers"] == []  # the whole reward split (1000 / 10)


def test_zeros_stay_exactly_zero_read_back_from_the_files(tiny, tmp_path):
    splits = splits_of(tiny)
    out = tmp_path / "pruned.int8.onnx"
    info = quantize.write_int8((tiny / "pruned.onnx").read_bytes(), out, splits.reward, splits.test,
                               quantize.QuantizeSettings())
    floats = stored_weights(onnx.load(str(tiny / "pruned.onnx")))
    int8s = stored_weights(onnx.load(str(out)))
    assert len(floats) == len(int8s) == 5
    zeros = 0
    for (f, _), (q, zp) in zip(floats, int8s, strict=True):
        assert q.shape == f.shape and q.dtype == np.int8
        zp = zp.reshape(-1, *[1] * (q.ndim - 1))
        assert ((q == zp) | (f != 0)).all()  # every float zero is the zero point (0) in the int8 file
        assert (zp == 0).all()
        zeros += int((f == 0).sum())
    assert info["zeros"]["float_zeros"] == zeros > 0
    # `evaluate` reads an int8 file's sparsity: at least the float zeros (small weights may round to zero too)
    _, sparsity = export.onnx_sparsity(onnx.load(str(out)))
    assert sparsity >= zeros / sum(f.size for f, _ in floats)


def test_a_lost_zero_is_caught(tiny):
    int8, _ = int8_of(tiny, "pruned.onnx")
    float_proto, int8_proto = onnx.load(str(tiny / "pruned.onnx")), onnx.load_from_string(int8)
    quantize.check_zeros_kept(float_proto, int8_proto)  # the real output passes
    f = stored_weights(float_proto)[1][0]
    producer = {o: n for n in int8_proto.graph.node for o in n.output}
    second = [n for n in int8_proto.graph.node if n.op_type in ("Conv", "Gemm")][1]
    tensor = next(t for t in int8_proto.graph.initializer if t.name == producer[second.input[1]].input[0])
    q = numpy_helper.to_array(tensor).copy()
    q.flat[np.flatnonzero(f == 0)[0]] = 3
    tensor.CopyFrom(numpy_helper.from_array(q, tensor.name))
    with pytest.raises(QLPError, match="zero in the float model but not in the int8 model"):
        quantize.check_zeros_kept(float_proto, int8_proto)


def test_calibration_reads_the_reward_split(tiny, tmp_path, monkeypatch):
    seen = []
    get_next = quantize.CalibrationImages.get_next

    def recording(self):
        batch = get_next(self)
        if batch is not None:
            seen.append(next(iter(batch.values())))
        return batch

    monkeypatch.setattr(quantize.CalibrationImages, "get_next", recording)
    result = quantize_file(tiny / "lenet.onnx", tmp_path / "q.onnx", DataSettings(str(tiny / "data.npz")),
                           quantize.QuantizeSettings(calibration_images=70, batch_size=32))
    fed = np.concatenate(seen)
    reward, _ = materialize(splits_of(tiny).reward, limit=70)
    np.testing.assert_array_equal(fed, reward.numpy())  # the first 70 reward-split images, nothing else
    x_test, _ = held_out_images(tiny)
    flat_test = {row.tobytes() for row in x_test.reshape(len(x_test), -1)}
    assert not any(row.tobytes() in flat_test for row in fed.reshape(len(fed), -1))
    assert result["calibration_images"] == 70 and result["calibration_split"] == "reward"


def test_keep_float_leaves_first_and_last_layers_in_float(tiny):
    int8, info = int8_of(tiny, "lenet.onnx", keep_float=("first", "last"))
    kinds = [zp is None for _, zp in stored_weights(onnx.load_from_string(int8))]
    assert kinds == [True, False, False, False, True]
    assert len(info["float_layers"]) == 2
    x, _ = held_out_images(tiny)
    assert (logits(int8, x).argmax(1) == logits(tiny / "lenet.onnx", x).argmax(1)).mean() >= 0.98


def test_loss_over_the_limit_warns(capsys):
    quiet = quantize.compare_accuracy(0.90, 0.895, max_loss=1.0)
    loud = quantize.compare_accuracy(0.90, 0.85, max_loss=1.0)
    assert not quiet["warning"] and loud["warning"] and loud["loss_points"] == pytest.approx(5.0)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "5.00 points" in err and "--int8-max-loss" in err


def test_cpu_capability_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
                    "model name\t: Test Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    cpu = machine.cpu_capability(info)
    assert cpu["model"] == "Test Xeon" and cpu["model_number"] == 143
    assert cpu["avx512_vnni"] and cpu["amx"] and cpu["avx2"] and not cpu["avx_vnni"]
    assert machine.describe_cpu(cpu) == "Test Xeon (family 6, model 143): AVX2, AVX-512, AVX-512 VNNI, AMX; no AVX-VNNI"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 1\nflags\t\t: fpu avx2 fma\n")
    assert machine.describe_cpu(machine.cpu_capability(info)) == (
        "AMD EPYC (family 23, model 1): AVX2; no AVX-512, no AVX-512 VNNI, no AVX-VNNI, no AMX")
    assert "unknown" in machine.describe_cpu(machine.cpu_capability(tmp_path / "missing"))


@pytest.mark.parametrize(("text", "expected"), [("first,last", ("first", "last")), ("last", ("last",)),
                                                ("none", ()), ("", ()), (" first , first ", ("first",))])
def test_keep_float_values(text, expected):
    assert quantize.parse_keep_float(text) == expected


def test_bad_settings_are_usage_errors():
    for call in (lambda: quantize.parse_keep_float("middle"), lambda: quantize.settings_for("int4"),
                 lambda: quantize.settings_for("int8", calibration_images=0),
                 lambda: quantize.settings_for("int8", max_loss=float("nan"))):
        with pytest.raises(UsageError):
            call()
    assert quantize.settings_for("none") is None


# ------------------------------------------------------------------------------------------- the CLI


def ok(*args, cwd: Path):
    """A run that must succeed: Typer's app in this process (CliRunner)."""
    return run_app(*args, cwd=cwd)


def accuracy_of(path: Path, tiny: Path) -> float:
    x, y = held_out_images(tiny)
    return float((logits(path, x).argmax(1) == y).mean())


def test_cli_quantize_any_float_onnx(tiny, tmp_path):
    out = tmp_path / "lenet.int8.onnx"
    result = ok("quantize", tiny / "pruned.onnx", "--out", out, "--data", tiny / "data.npz", "--calibration-images",
                "64", "--keep-float", "first,last", cwd=tmp_path)
    assert "int8 test accuracy" in " ".join(result.stdout.split())  # the result line, on stdout
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    meta = export.read_metadata(proto)
    assert float(meta["qlp.int8_test_accuracy"]) == pytest.approx(accuracy_of(out, tiny), abs=1e-4)
    assert float(meta["qlp.float_test_accuracy"]) == pytest.approx(accuracy_of(tiny / "pruned.onnx", tiny), abs=1e-4)
    assert meta["qlp.calibration_images"] == "64" and meta["qlp.keep_float"] == "first,last"
    assert [zp is None for _, zp in stored_weights(proto)] == [True, False, False, False, True]


@pytest.mark.slow
def test_cli_prune_and_search_with_int8(tiny, tmp_path):
    data = ("--data", str(tiny / "data.npz"), "--device", "cpu")
    ok("prune", tiny / "lenet.onnx", "--method", "lamp", "--sparsity", "0.8", "--finetune-epochs", "0.2",
       "--quantize", "int8", "--out", "p", *data, cwd=tmp_path)
    out = tmp_path / "p"
    report = json.loads((out / "report.json").read_text())
    assert report["measured"]["int8"]["accuracy"] == pytest.approx(accuracy_of(out / "model.int8.onnx", tiny))
    assert report["int8"]["accuracy"]["float_accuracy"] == pytest.approx(accuracy_of(out / "model.onnx", tiny))
    assert report["cpu"]["model"] and "int8" in (out / "report.md").read_text()
    assert {r["batch"] for r in report["measured"]["int8"]["latency"]} == {1, 64}
    floats = stored_weights(onnx.load(str(out / "model.onnx")))
    for (f, _), (q, _) in zip(floats, stored_weights(onnx.load(str(out / "model.int8.onnx"))), strict=True):
        assert (q[f == 0] == 0).all()
    assert report["int8"]["zeros"]["float_zeros"] == sum(int((f == 0).sum()) for f, _ in floats)

    ok("search", tiny / "lenet.onnx", "--sparsity", "0.7", "--episodes", "4", "--stages", "1", "--reward-images",
       "100", "--finetune-epochs", "0", "--no-sparse-storage", "--quantize", "int8", "--keep-float", "last",
       "--out", "s", *data, cwd=tmp_path)
    assert json.loads((tmp_path / "s" / "report.json").read_text())["int8"]["keep_float"] == ["last"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "s" / "model.int8.onnx")), full_check=True)


@pytest.mark.slow
def test_cli_finetune_and_export_with_int8(tiny, tmp_path):
    data = ("--data", str(tiny / "data.npz"))
    ok("finetune", tiny / "pruned.onnx", "--finetune-epochs", "0.1", "--quantize", "int8", "--out", "t.onnx",
       "--device", "cpu", *data, cwd=tmp_path)
    tuned = stored_weights(onnx.load(str(tmp_path / "t.onnx")))
    for (f, _), (q, _) in zip(tuned, stored_weights(onnx.load(str(tmp_path / "t.int8.onnx"))), strict=True):
        assert (q[f == 0] == 0).all()
    ok("export", tiny / "lenet.onnx", "--quantize", "int8", "--out", "e.onnx", *data, cwd=tmp_path)
    x, _ = held_out_images(tiny)
    agree = logits(tmp_path / "e.int8.onnx", x).argmax(1) == logits(tiny / "lenet.onnx", x).argmax(1)
    assert agree.mean() >= 0.98


@pytest.fixture(scope="module")
def bad(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_int8")
    for name in ("lenet.onnx", "data.npz"):
        (root / name).write_bytes((tiny / name).read_bytes())
    (root / "junk.onnx").write_bytes(b"not a model at all\n" * 30)
    model = make_tiny_task(tmp_path_factory.mktemp("pt"), n=60, n_train=50, steps=1)
    torch.save(model.state_dict(), root / "lenet.pt")
    splits = splits_of(root)
    quantize.write_int8((root / "lenet.onnx").read_bytes(), root / "done.int8.onnx", splits.reward, splits.test,
                        quantize.QuantizeSettings(calibration_images=32))
    # a float16 model: float16 input and weights, same graph
    proto = onnx.load(str(root / "lenet.onnx"))
    for tensor in proto.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del proto.graph.value_info[:]
    onnx.save(proto, str(root / "half.onnx"))
    # uint8 input, cast to float inside
    proto = onnx.load(str(root / "lenet.onnx"))
    name = proto.graph.input[0].name
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    for node in proto.graph.node:
        node.input[:] = [f"{name}_f" if i == name else i for i in node.input]
    proto.graph.node.insert(0, helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
    onnx.save(proto, str(root / "bytes_in.onnx"))
    (root / "existing.onnx").write_bytes(b"keep me")
    return root


BAD = {
    "not_onnx": (("junk.onnx",), 1, ("not an ONNX", "give a .onnx")),
    "pytorch_file": (("lenet.pt",), 2, ("PyTorch file", "export")),
    "already_quantized": (("done.int8.onnx",), 2, ("already quantized", "float model")),
    "float16_model": (("half.onnx",), 2, ("float16", "float32")),
    "uint8_input": (("bytes_in.onnx",), 2, ("uint8 input", "float32")),
    "bad_keep_float": (("lenet.onnx", "--keep-float", "middle"), 2, ("--keep-float", "'middle'", "first,last")),
    "no_calibration_images": (("lenet.onnx", "--calibration-images", "0"), 2, ("--calibration-images", "at least")),
    "out_exists": (("lenet.onnx", "--out", "existing.onnx"), 2, ("already exists", "--force")),
    "out_is_input": (("lenet.onnx", "--out", "lenet.onnx", "--force"), 2, ("is the input", "choose another --out")),
}


@pytest.mark.parametrize("name", list(BAD))
def test_quantize_bad_input_is_one_line(bad, qlp, name):
    args, code, says = BAD[name]
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    out = () if "--out" in args else ("--out", "new.int8.onnx")
    run = qlp("quantize", *args, *out, "--data", "data.npz", "--quiet", cwd=bad)  # no phase line on a slow machine
    assert run.code == code, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [run.line], run.stderr
    for word in says:
        assert word.lower() in run.line.lower(), (word, run.line)
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before


def test_bad_quantize_option_on_prune_fails_before_any_work(bad, qlp):
    run = qlp("prune", "lenet.onnx", "--data", "data.npz", "--quantize", "int4", "--out", "never", cwd=bad)
    assert run.code == 2 and "--quantize" in run.line
    assert not (bad / "never").exists()


def test_quantizes_without_pre_processing_when_it_fails(tiny, monkeypatch):
    import onnxruntime.quantization as ortq

    real = ortq.quant_pre_process
    calls = []

    def symbolic_fails(*args, **kwargs):
        calls.append(kwargs.get("skip_symbolic_shape", False))
        if not kwargs.get("skip_symbolic_shape"):
            raise RuntimeError("symbolic shape inference failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ortq, "quant_pre_process", symbolic_fails)
    _, info = int8_of(tiny, "pruned.onnx")
    assert calls == [False, True] and info["preprocess"].startswith("quant_pre_process without symbolic")

    def always_fails(*args, **kwargs):
        raise RuntimeError("no pre-processing today")

    monkeypatch.setattr(ortq, "quant_pre_process", always_fails)
    int8, info = int8_of(tiny, "pruned.onnx")
    assert info["preprocess"].startswith("none: pre-processing failed")
    x, _ = held_out_images(tiny)
    assert (logits(int8, x).argmax(1) == logits(tiny / "pruned.onnx", x).argmax(1)).mean() >= 0.98
    assert info["zeros"]["float_zeros"] > 0  # checked, and kept, without pre-processing too


def test_int8_weights_in_sparse_storage_load_with_the_same_outputs(tiny):
    """What docs/benchmarks_int8.md reports: int8 sparse_initializer passes onnx.checker (not full_check) and
    onnxruntime gives identical outputs."""
    int8, _ = int8_of(tiny, "pruned.onnx")
    sparse = export.to_sparse_storage(int8, max_density=0.6)
    proto = onnx.load_from_string(sparse)
    assert proto.graph.sparse_initializer
    assert all(s.values.data_type == TensorProto.INT8 for s in proto.graph.sparse_initializer)
    onnx.checker.check_model(proto)
    x, _ = held_out_images(tiny)
    np.testing.assert_array_equal(logits(sparse, x), logits(int8, x))
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(int8).graph.initializer}
    for tensor in proto.graph.sparse_initializer:  # densified, each is the int8 initializer it replaced
        values, indices = numpy_helper.to_array(tensor.values), numpy_helper.to_array(tensor.indices)
        dense = np.zeros(stored[tensor.values.name].size, np.int8)
        dense[indices] = values
        np.testing.assert_array_equal(dense.reshape(tuple(tensor.dims)), stored[tensor.values.name])


# ------------------------------------------------------------------------------------------- every CPU


def test_full_8_bit_weights_are_caught_as_not_portable(tiny):
    """The file property that makes int8 right on CPUs without VNNI is checked, and the check is not blind: the
    full 8-bit form (what the tool wrote before) has weights beyond ±64 and is refused."""
    int8, info = int8_of(tiny, "lenet.onnx")
    assert info["quantized_layers"] == 5 and max(map(abs, info["weight_range"])) <= quantize.PORTABLE_WEIGHT_LIMIT
    quantize.check_portable(onnx.load_from_string(int8))
    full, _ = int8_of(tiny, "lenet.onnx", weight_bits=8)
    assert max(np.abs(w.astype(int)).max() for w, _ in stored_weights(onnx.load_from_string(full))) > 64
    with pytest.raises(QLPError, match="beyond the ±64"):
        quantize.check_portable(onnx.load_from_string(full))


def test_portable_int8_agrees_with_float_as_closely_as_full_8_bits_does_on_a_vnni_cpu(tiny):
    """7-bit weights cost little: the logits stay within 10 % of their spread of the float logits (the agreement
    test above), and the scale of the logits is kept (the overflow shrank them to about 0.68×)."""
    int8, _ = int8_of(tiny, "lenet.onnx")
    x, _ = held_out_images(tiny)
    reference, got = logits(tiny / "lenet.onnx", x), logits(int8, x)
    scale = float((got * reference).sum() / (reference * reference).sum())
    assert 0.95 < scale < 1.05


def test_keep_float_that_leaves_nothing_to_quantize_is_refused(tiny, tmp_path):
    """A Flatten→Linear model with --keep-float first,last: no layer would be quantized; the file must not be
    written and labelled int8."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 4)).eval()
    (tmp_path / "gemm.onnx").write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    splits = splits_of(tiny)
    with pytest.raises(UsageError, match="nothing would be quantized"):
        quantize.quantize_int8((tmp_path / "gemm.onnx").read_bytes(), splits.reward,
                               quantize.QuantizeSettings(keep_float=("first", "last")))
    int8, info = quantize.quantize_int8((tmp_path / "gemm.onnx").read_bytes(), splits.reward,
                                        quantize.QuantizeSettings())
    assert info["quantized_layers"] == 1 and len(stored_weights(onnx.load_from_string(int8))) == 1


@pytest.mark.parametrize("images", [64, 63])
def test_a_fixed_batch_file_quantizes_with_any_image_count(tiny, tmp_path, images):
    """A Conv+Gemm exported at a fixed batch of 7 (no dynamic axes): `quantize` makes it batch-free, as `export`
    does, and the int8 file agrees with the original file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 26 * 26, 4)).eval()
    torch.onnx.export(model, (torch.rand(7, 1, 28, 28),), str(tmp_path / "fixed7.onnx"), dynamo=False,
                      opset_version=17)
    out = tmp_path / "q.onnx"
    result = quantize_file(tmp_path / "fixed7.onnx", out, DataSettings(str(tiny / "data.npz")),
                           quantize.QuantizeSettings(calibration_images=images, speed_batches=()))
    assert result["calibration_images"] == images
    x, _ = held_out_images(tiny)
    reference = np.concatenate([logits(tmp_path / "fixed7.onnx", x[i:i + 7]) for i in range(0, 497, 7)])
    got = logits(out, x[:497])  # an untrained model: near-tied logits, so compare values, not the top-1
    assert np.abs(got - reference).max() < 0.1 * (reference.max() - reference.min())


def test_int8_slower_than_float_here_is_said_in_one_line_and_reported(tiny, monkeypatch, capsys):
    from qlp_compress.deploy import engine

    def timed(reference, candidate, shape, batch, threads, rounds, per_round):
        return {"dense_ms": 1.0, "pruned_ms": 1.25 if batch == 64 else 0.8, "speedup": 0.8 if batch == 64 else 1.25}

    monkeypatch.setattr(engine, "measure_speedup", timed)
    info = quantize.compare_speed((tiny / "lenet.onnx").read_bytes(), (tiny / "lenet.onnx").read_bytes(),
                                  (1, 28, 28), (1, 64))
    assert info["int8_slower"] and [b["batch"] for b in info["batches"]] == [1, 64]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "slower than the float model" in err[0] and "0.80× at batch 64" in err[0]
    assert "1.25" not in err[0] and info["cpu"] in err[0]
    from qlp_compress.report.documents import _int8_speed_lines
    assert "slower than float" in " ".join(_int8_speed_lines(info))
    monkeypatch.setattr(engine, "measure_speedup", lambda *a, **k: {"dense_ms": 1.0, "pruned_ms": 0.5,
                                                                    "speedup": 2.0})
    lenet = (tiny / "lenet.onnx").read_bytes()
    assert not quantize.compare_speed(lenet, lenet, (1, 28, 28), (1, 64))["int8_slower"]
    assert capsys.readouterr().err == ""
