"""ONNX export, metadata, and reading sparsity back from an ONNX file."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from qlp_compress.io import atomic_write_bytes

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op type → input slot of its weight


def to_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], input_name: str = INPUT_NAME,
                  output_name: str = OUTPUT_NAME, opset: int = OPSET) -> bytes:
    """Export `model` (eval mode, on CPU) with a dynamic batch axis; simplified with onnxslim."""
    import onnxslim

    model = model.eval().cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about folding strided slices
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), buffer, dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    proto = onnxslim.slim(onnx.load_from_string(buffer.getvalue()))
    return proto.SerializeToString()


def with_metadata(model_bytes: bytes, metadata: Mapping[str, object]) -> bytes:
    """Add (or replace) `metadata_props`; values are stored as strings."""
    proto = onnx.load_from_string(model_bytes)
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))
    return proto.SerializeToString()


def save_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...],
              metadata: Mapping[str, object] | None = None) -> bytes:
    """Export, check with onnx.checker and write atomically; returns the bytes written."""
    data = to_onnx_bytes(model, input_shape)
    if metadata:
        data = with_metadata(data, metadata)
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    atomic_write_bytes(path, data)
    return data


def read_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def weight_initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The prunable weights of an ONNX graph: the constant weight input of Conv, Gemm and MatMul nodes,
    dense or stored as `sparse_initializer` (densified here)."""
    constants = {t.name: t for t in proto.graph.initializer}
    sparse = {s.values.name: s for s in proto.graph.sparse_initializer}
    out = {}
    for node in proto.graph.node:
        slot = WEIGHT_OPS.get(node.op_type)
        if slot is None or len(node.input) <= slot:
            continue
        name = node.input[slot]
        if name in constants:
            out[name] = numpy_helper.to_array(constants[name])
        elif name in sparse:
            out[name] = numpy_helper.to_array(onnx.helper.make_tensor(
                name, sparse[name].values.data_type, sparse[name].dims, _densify(sparse[name]).ravel()))
        if name in out and out[name].ndim < 2:  # a constant vector on a MatMul is not a layer weight
            del out[name]
    return out


def _densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
    if indices.ndim == 2:  # coordinate form: one row per value
        indices = np.ravel_multi_index(indices.T, tuple(sparse.dims))
    dense[indices] = values
    return dense.reshape(tuple(sparse.dims))


def onnx_sparsity(proto: onnx.ModelProto) -> tuple[dict[str, tuple[int, int]], float]:
    """Per weight initializer (element count, zero count), and the global sparsity over all of them."""
    per_layer = {name: (int(w.size), int((w == 0).sum())) for name, w in weight_initializers(proto).items()}
    total = sum(n for n, _ in per_layer.values())
    return per_layer, (sum(z for _, z in per_layer.values()) / total if total else 0.0)
