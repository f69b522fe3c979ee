"""ONNX files as torch's exporters write them today import, verify and match onnxruntime on the original file.

A representative subset of benchmarks/exporter_matrix.py (which makes the full table in docs/onnx_import.md):
both exporters, the dynamo exporter's default opset and the newest, external data, a plain CNN, a CIFAR
ResNet with option-A shortcuts and MobileNetV2. Also the graph rewrites on their own, against onnxruntime, and
the error for IR versions newer than onnxruntime reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qlp_compress.base.errors import QLPError
from qlp_compress.deploy.engine import max_ir_version
from qlp_compress.importer import load_model
from qlp_compress.importer.onnx_rewrite import rewrite_for_conversion

ROOT = Path(__file__).resolve().parents[1]


def matrix():
    spec = importlib.util.spec_from_file_location("exporter_matrix", ROOT / "benchmarks" / "exporter_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["exporter_matrix"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


CELLS = [  # arch, dynamo, opset (None: the exporter's default), external data
    ("lenet5", True, None, True),  # what `torch.onnx.export(model, args, "m.onnx")` writes today
    ("lenet5", False, None, False),
]
# ResNet-56 (dynamo, opset 18, external data) repeats ResNet-20's structure and the lenet5 cell's external data at
# 3x the cost: benchmarks/exporter_matrix.py keeps it.
SLOW_CELLS = [("resnet20", True, 21, False), ("resnet20", False, 13, True), ("mobilenet_v2", True, None, False),
              ("resnet18", False, 17, False)]


def check(cell, tmp_path):
    m = matrix()
    result = m.check_cell(m.Cell(*cell), tmp_path)
    assert result["exported"], result
    assert result.get("imported"), result.get("error")
    assert result["parity"], result  # the imported module against onnxruntime on the original file
    assert result["verified"], result.get("error")  # a tiny search ran and its export verified


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "-".join(map(str, c)))
def test_exported_file_imports_searches_and_verifies(cell, tmp_path):
    check(cell, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cell", SLOW_CELLS, ids=lambda c: "-".join(map(str, c)))
def test_exported_file_imports_searches_and_verifies_bigger_models(cell, tmp_path):
    check(cell, tmp_path)


# ------------------------------------------------------------------------------------------- the rewrites


def reshape_model(shape: list[int], allowzero: int, batch: int | None) -> onnx.ModelProto:
    """x (batch, 2, 3, 4) → Reshape(shape, allowzero) → Relu."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "n", 2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], allowzero=allowzero),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.array(shape, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = min(max_ir_version(), onnx.IR_VERSION)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_allowzero_without_zero_entries_becomes_allowzero_0_with_the_same_outputs():
    model = reshape_model([-1, 24], allowzero=1, batch=None)
    rewritten, changes = rewrite_for_conversion(model, None)
    assert len(changes) == 1 and "allowzero" in changes[0]
    assert helper.get_attribute_value(rewritten.graph.node[0].attribute[0]) == 0
    x = np.random.default_rng(0).normal(size=(3, 2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(rewritten, x), run(model, x))


def test_allowzero_with_a_zero_entry_is_left_alone():
    model = reshape_model([0, -1], allowzero=1, batch=None)  # here 0 means an empty axis: not the same as copy
    rewritten, changes = rewrite_for_conversion(model, None)
    assert changes == [] and rewritten == model


@pytest.mark.parametrize("allowzero", [0, 1])
def test_a_baked_batch_entry_follows_the_batch(allowzero):
    model = reshape_model([1, 24], allowzero=allowzero, batch=1)  # x.view(1, -1) exported at batch 1
    rewritten, changes = rewrite_for_conversion(model, 1)
    assert any("fixed batch" in c for c in changes)
    rewritten.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    x = np.random.default_rng(0).normal(size=(3, 2, 3, 4)).astype(np.float32)
    per_image = np.concatenate([run(model, x[i : i + 1]) for i in range(3)])
    np.testing.assert_array_equal(run(rewritten, x), per_image)


def test_a_reshape_not_on_the_batch_axis_keeps_its_shape():
    model = reshape_model([2, 12], allowzero=0, batch=1)  # first entry is not the fixed batch size
    assert rewrite_for_conversion(model, 1)[1] == []


# --------------------------------------------------------------------------------------------- IR versions


def test_ir_version_newer_than_onnxruntime_reads_is_a_one_line_error(tmp_path):
    m = matrix()
    path = m.export_cell(m.Cell("lenet5", False, 17, False), tmp_path)
    proto = onnx.load(str(path))
    proto.ir_version = max_ir_version() + 1
    onnx.save(proto, str(path))
    with pytest.raises(QLPError, match=r"has ONNX IR version \d+, newer than onnx(runtime)? [\d.]+ reads \(up to "
                                       r"\d+\); re-save it with an older IR version .* or upgrade") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_a_linear_exported_as_matmul_is_matched_transposed():
    """The TorchScript exporter writes a Linear whose input rank it cannot tell as MatMul with the weight stored
    in × out; its zero pattern must still identify the layer."""
    from qlp_compress.deploy.export import match_layers

    rng = np.random.default_rng(0)
    keep = rng.random((10, 40)) < 0.5
    weight = rng.normal(size=(10, 40)) * keep
    assert match_layers({"onnx::MatMul_1": weight.T}, {"fc": keep}) == {"fc": "onnx::MatMul_1"}
    assert match_layers({"onnx::MatMul_1": weight.T}, {"fc": ~keep}) == {}
