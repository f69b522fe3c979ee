"""What an int8 file must be, read from the file itself: a float model that can be quantized, every float zero still
exactly zero, and weights within the range every CPU computes exactly (see qlp_compress.deploy.quantize)."""

from __future__ import annotations

import numpy as np
import onnx

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.deploy import export

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "QAttention"}
PORTABLE_WEIGHT_LIMIT = 64  # |int8 weight| ≤ 64: no 16-bit overflow in u8×s8 pairs (2·255·64 < 2¹⁵) on any x86 CPU


def check_float_model(proto: onnx.ModelProto, name: str) -> None:
    """A model that can be quantized: float32 input, float32 weights, not already quantized."""
    quantized = sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS})
    if quantized:
        raise UsageError(f"{name} is already quantized (it has {', '.join(quantized)} nodes); give the float "
                         "model it came from")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UsageError(f"{name} has {len(inputs)} inputs; int8 quantization here takes an image classifier "
                         "with one image input")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise UsageError(f"{name} takes {onnx.TensorProto.DataType.Name(elem).lower()} input, not float32; "
                         "quantize the float32 model")
    if not weight_inputs(proto):
        raise UsageError(f"{name} has no Conv, Gemm or MatMul with a constant weight; nothing to quantize")
    odd = {onnx.TensorProto.DataType.Name(t.data_type).lower() for t in weight_tensors(proto)
           if t.data_type != onnx.TensorProto.FLOAT}
    if odd:
        raise UsageError(f"{name} holds {', '.join(sorted(odd))} weights, not float32; quantize the float32 model")


def weight_inputs(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, weight name) of every Conv/Gemm/MatMul whose weight is an initializer, in graph order."""
    constants = {t.name for t in proto.graph.initializer} | {s.values.name for s in proto.graph.sparse_initializer}
    found = []
    for node in proto.graph.node:
        slot = export.WEIGHT_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in constants:
            found.append((node, node.input[slot]))
    return found


def weight_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    by_name = {t.name: t for t in proto.graph.initializer} | {s.values.name: s.values
                                                               for s in proto.graph.sparse_initializer}
    return [by_name[w] for _, w in weight_inputs(proto)]


def layer_weights(proto: onnx.ModelProto) -> list[np.ndarray]:
    """The weight of every Conv/Gemm/MatMul in graph order, as stored: float, or int8 dequantized."""
    return list(export.weight_initializers(proto).values())


def check_zeros_kept(float_proto: onnx.ModelProto, int8_proto: onnx.ModelProto) -> dict:
    """Every weight that is exactly zero in the float model is exactly zero in the int8 model.

    The layers are paired in graph order (pre-processing folds BatchNorm into the convolutions, which
    renames weights but keeps their order, shape and zero positions). Raises QLPError otherwise."""
    before, after = layer_weights(float_proto), layer_weights(int8_proto)
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after, strict=False)):
        raise QLPError(f"cannot pair the int8 model's {len(after)} weight layers with the float model's "
                       f"{len(before)}; rerun with --debug and report it")
    zeros = rounded = 0
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        zero = a == 0
        lost = int(np.count_nonzero(b[zero]))
        if lost:
            raise QLPError(f"weight layer {i} has {lost} weights that are zero in the float model but not in the "
                           "int8 model; rerun with --debug and report it")
        zeros += int(zero.sum())
        rounded += int(((b == 0) & ~zero).sum())
    return {"layers": len(before), "weights": int(sum(a.size for a in before)), "float_zeros": zeros,
            "rounded_to_zero": rounded}


def quantized_weights(int8_proto: onnx.ModelProto) -> list[np.ndarray]:
    """The stored integer weight of every Conv/Gemm/MatMul whose weight comes through a DequantizeLinear."""
    inits = {t.name: t for t in int8_proto.graph.initializer}
    producer = {o: n for n in int8_proto.graph.node for o in n.output}
    found = []
    for node in int8_proto.graph.node:
        slot = export.WEIGHT_OPS.get(node.op_type)
        dq = producer.get(node.input[slot]) if slot is not None and len(node.input) > slot else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            found.append(onnx.numpy_helper.to_array(inits[dq.input[0]]))
    return found


def check_portable(int8_proto: onnx.ModelProto, name: str = "the int8 model") -> dict:
    """What makes the file right on every CPU, read from the file: at least one weight layer is quantized, and
    every int8 weight is within ±PORTABLE_WEIGHT_LIMIT (no u8×s8 overflow without VNNI). Raises QLPError."""
    weights = quantized_weights(int8_proto)
    if not weights:
        raise QLPError(f"{name} holds no quantized weight layer; rerun with --debug and report it")
    low, high = min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)
    signed = all(w.dtype == np.int8 for w in weights)
    if not signed or max(-low, high) > PORTABLE_WEIGHT_LIMIT:
        raise QLPError(f"{name} has weights in [{low}, {high}] ({weights[0].dtype}), beyond the ±"
                       f"{PORTABLE_WEIGHT_LIMIT} that every CPU computes exactly; rerun with --debug and report it")
    return {"quantized_layers": len(weights), "weight_range": [low, high]}


