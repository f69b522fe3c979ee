"""Rewrite ONNX constructs that onnx2torch cannot convert into equivalent ones it can.

Each rewrite is exact under a condition it checks on the graph itself; the importer then proves the rewritten
graph equal to the original with onnxruntime (the same images through both) before it converts anything.
The rewrites come from what torch's exporters write today:

- `Reshape` with `allowzero=1` (the dynamo exporter's default): with a constant shape holding no 0 entry,
  allowzero changes nothing, so it becomes allowzero=0, which onnx2torch converts.
- A fixed batch size baked into a constant `Reshape` shape (`x.view(1, -1)` from a file exported at batch 1,
  without dynamic axes): when the reshaped tensor's first axis is the batch axis and the shape's first entry
  is that batch size, the entry becomes 0 ("copy the input's first dimension"), which is the same at the
  exported batch size and follows any other batch size.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def rewrite_for_conversion(proto: onnx.ModelProto, fixed_batch: int | None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `proto` with the rewrites above applied, and one line per rewritten node (empty: unchanged).

    `fixed_batch` is the batch size the file fixed on its input (None when its batch axis is symbolic);
    `proto` must still record it, so that shape inference can tell which tensors carry the batch axis."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    constants = _constant_values(out.graph)
    first_dims = _first_dims(out) if fixed_batch is not None else {}
    changes: list[str] = []
    for node in out.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        shape = constants.get(node.input[1])
        if shape is None or shape.ndim != 1 or shape.dtype != np.int64:
            continue
        new_shape, label = shape.copy(), node.name or node.output[0]
        carries_batch = (fixed_batch is not None and len(shape) > 0 and shape[0] == fixed_batch
                         and first_dims.get(node.input[0]) == fixed_batch)
        if carries_batch and (_allowzero(node) == 0 or 0 not in shape):
            new_shape[0] = 0
            changes.append(f"Reshape {label}: the fixed batch size {fixed_batch} → the input's batch size")
        if _allowzero(node) == 1 and 0 not in shape:  # then allowzero changes nothing (and a new 0 means "copy")
            _set_allowzero(node, 0)
            changes.append(f"Reshape {label}: allowzero=1 → 0 (its shape has no 0 entry)")
        if not np.array_equal(new_shape, shape):
            name = _fresh_name(out.graph, f"{node.input[1]}_batch_free")
            out.graph.initializer.append(numpy_helper.from_array(new_shape, name))
            node.input[1] = name
    return out, changes


def _allowzero(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "allowzero"), 0)


def _set_allowzero(node: onnx.NodeProto, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == "allowzero":
            attribute.i = value


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values that are initializers or outputs of Constant nodes (with a tensor value)."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attribute = next((a for a in node.attribute if a.name == "value"), None)
            if attribute is not None and attribute.HasField("t"):
                tensors[node.output[0]] = attribute.t
    values = {}
    for name, tensor in tensors.items():  # only int64 vectors can be Reshape shapes; damaged ones are skipped
        if tensor.data_type == onnx.TensorProto.INT64 and len(tensor.dims) == 1:
            try:
                values[name] = numpy_helper.to_array(tensor)
            except Exception:
                continue
    return values


def _first_dims(proto: onnx.ModelProto) -> dict[str, int]:
    """The first dimension of every tensor whose shape inference fixes it (the batch axis for most)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        return {}
    dims = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shape = value.type.tensor_type.shape
        if value.type.HasField("tensor_type") and shape.dim and shape.dim[0].HasField("dim_value"):
            dims[value.name] = int(shape.dim[0].dim_value)
    return dims


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name
