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

from qlp_compress.base.io import atomic_write_bytes

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op type → input slot of its weight


def to_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], input_name: str = INPUT_NAME,
                  output_name: str = OUTPUT_NAME, opset: int = OPSET) -> bytes:
    """Export `model` (eval mode, on CPU) with a dynamic batch axis; simplified with onnxslim.

    BatchNorm stays a separate op (TrainingMode.PRESERVE, no Conv+BN fusion in onnxslim): folding it would
    rescale each output channel, so a re-imported model would lose its BatchNorm (no BN training in
    fine-tuning, no --bn-recalibrate) and its magnitude order. onnxruntime fuses Conv+BN itself when it
    loads the file, so inference speed is the same.

    The graph's input and output are named afterwards: the TorchScript exporter refuses names such as
    "191" (which it exports itself when a user gives none), so imported models could not keep them."""
    proto = simplify(export_graph(model, torch.zeros(1, *input_shape), opset=opset))
    _rename_value(proto.graph, "qlp_input", input_name)
    _rename_value(proto.graph, "qlp_output", output_name)
    return proto.SerializeToString()


def export_graph(model: nn.Module, example: torch.Tensor, opset: int = OPSET, fold_constants: bool = True,
                 input_name: str = "qlp_input", output_name: str = "qlp_output") -> onnx.ModelProto:
    """The one call of torch.onnx.export (TorchScript exporter, dynamic batch, BatchNorm preserved). Without
    `fold_constants`, parameters stay initializers named after the module path (the reward writes them)."""
    model = model.eval().cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about folding strided slices
        torch.onnx.export(model, (example.cpu(),), buffer, dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=fold_constants,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim, keeping BatchNorm apart from the convolutions (see to_onnx_bytes)."""
    import onnxslim

    return onnxslim.slim(proto, skip_fusion_patterns=["FusionConvBN", "FusionConvTransposeBN"])


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value `old` to `new` everywhere in `graph`; a value already called `new` moves aside."""
    if old == new:
        return
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    names.update(name for node in graph.node for name in (*node.input, *node.output))
    if new in names:
        aside = next(f"{new}_{i}" for i in range(len(names) + 1) if f"{new}_{i}" not in names)
        _rename_value(graph, new, aside)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


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
    dense or stored as `sparse_initializer` (densified here), or an int8 initializer behind a
    DequantizeLinear (a QDQ model; dequantized here, so exact zeros stay exact)."""
    constants = {t.name: t for t in proto.graph.initializer}
    sparse = {s.values.name: s for s in proto.graph.sparse_initializer}
    dequantized = {node.output[0]: node for node in proto.graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in constants
                   and all(name in constants for name in node.input[1:] if name)}
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
        elif name in dequantized:  # named after the stored int8 initializer
            node_dq = dequantized[name]
            name = node_dq.input[0]
            out[name] = _dequantize(node_dq, constants)
        if name in out and out[name].ndim < 2:  # a constant vector on a MatMul is not a layer weight
            del out[name]
    return out


def weight_nodes(proto: onnx.ModelProto) -> dict[str, str]:
    """Weight initializer name (as `weight_initializers` names it) → the name of the node that uses it."""
    constants = {t.name for t in proto.graph.initializer}
    dequantized = {node.output[0]: node.input[0] for node in proto.graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in constants}
    out = {}
    for node in proto.graph.node:
        slot = WEIGHT_OPS.get(node.op_type)
        if slot is not None and len(node.input) > slot:
            out.setdefault(dequantized.get(node.input[slot], node.input[slot]), node.name)
    return out


def weight_layer_names(proto: onnx.ModelProto) -> dict[str, str]:
    """Weight initializer name → the layer's readable name (qlp_compress.base.names), for every prunable weight."""
    from qlp_compress.base.names import onnx_layer_names

    return onnx_layer_names(list(weight_initializers(proto)), weight_nodes(proto))


def name_weights(model_bytes: bytes, renames: Mapping[str, str]) -> bytes:
    """The same graph with initializers renamed (old → new); a rename whose new name is already taken by another
    value of the graph is skipped. Used to give exported weights their layers' readable names."""
    proto = onnx.load_from_string(model_bytes)
    g = proto.graph
    taken = {t.name for t in g.initializer} | {v.name for v in (*g.input, *g.output, *g.value_info)} \
        | {x for node in g.node for x in (*node.input, *node.output)}
    todo = {old: new for old, new in renames.items() if old != new and new not in taken
            and any(t.name == old for t in g.initializer)}
    if len(set(todo.values())) != len(todo):  # two weights asking for one name: keep the graph's own names
        return model_bytes
    if not todo:
        return model_bytes
    for t in g.initializer:
        t.name = todo.get(t.name, t.name)
    for v in g.input:
        v.name = todo.get(v.name, v.name)
    for node in g.node:
        for i, x in enumerate(node.input):
            if x in todo:
                node.input[i] = todo[x]
    return proto.SerializeToString()


def _dequantize(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> np.ndarray:
    """A DequantizeLinear of initializers, evaluated: (q − zero_point) · scale, per tensor or along `axis`."""
    q = numpy_helper.to_array(constants[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(constants[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    if scale.ndim == 1 and q.ndim > 1:  # per channel: broadcast along `axis` (default 1)
        shape = [1] * q.ndim
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1) % q.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


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


SPARSE_STORAGE_MAX_DENSITY = 1 / 3  # a float32 value plus an int64 index take 12 bytes against 4 dense


def to_sparse_storage(model_bytes: bytes, max_density: float = SPARSE_STORAGE_MAX_DENSITY) -> bytes:
    """Move every weight initializer of density ≤ `max_density` into `sparse_initializer` (1-D int64
    linear indices, as onnx.checker requires). onnxruntime densifies them on load: this saves disk and
    download, not compute. The values are moved as stored (int8 ones too, behind their DequantizeLinear), so
    densifying gives back the same tensor."""
    proto = onnx.load_from_string(model_bytes)
    weights = weight_initializers(proto)
    keep = []
    for tensor in proto.graph.initializer:
        w = numpy_helper.to_array(tensor) if tensor.name in weights else None
        if w is None or np.count_nonzero(w) > max_density * w.size:
            keep.append(tensor)
            continue
        flat = w.ravel()
        indices = np.flatnonzero(flat).astype(np.int64)
        proto.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            numpy_helper.from_array(flat[indices], tensor.name),
            numpy_helper.from_array(indices, f"{tensor.name}.indices"), list(w.shape)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return proto.SerializeToString()


def match_layers(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Map each PyTorch layer to the ONNX weight with its shape and zero pattern.

    The exporter folds BatchNorm into convolutions and renames the weights, but folding scales whole
    output channels, so a layer's zero pattern survives: it identifies the layer. A Linear layer exported as
    MatMul stores its weight transposed (in × out), so a 2-D pattern is also looked for transposed."""
    def same_pattern(w: np.ndarray, keep: np.ndarray) -> bool:
        if w.shape == keep.shape and np.array_equal(w != 0, keep):
            return True
        return keep.ndim == 2 and w.shape == keep.T.shape and np.array_equal(w != 0, keep.T)

    unused = dict(weights)
    found = {}
    for layer, keep in masks.items():
        match = next((name for name, w in unused.items() if same_pattern(w, keep)), None)
        if match is not None:
            found[layer] = match
            del unused[match]
    return found




def verify_onnx(module: nn.Module, model_bytes: bytes, x: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> dict:
    """Check an exported file against the PyTorch model it came from; raise QLPError when it differs.

    - onnxruntime and PyTorch outputs on the batch `x` agree (outputs_agree: finite, close, same top-1);
    - every pruned layer's zero pattern (the masks) found, exactly, in one weight of the file."""
    from qlp_compress.base.errors import QLPError
    from qlp_compress.deploy import engine

    got = engine.outputs(engine.open_session(model_bytes), x.numpy())
    with torch.no_grad():
        expected = module.eval().cpu()(x).numpy()
    for side, out in (("onnxruntime", got), ("PyTorch", expected)):
        if not np.isfinite(out).all():
            raise QLPError(f"the exported model outputs NaN or inf on real images ({side}); it cannot be verified: "
                           "re-export the model from a healthy checkpoint (and check --mean/--std)")
    if got.shape != expected.shape:
        raise QLPError(f"the exported ONNX outputs shape {list(got.shape)} but the PyTorch model "
                       f"{list(expected.shape)}; rerun with --debug and report it")
    agree, max_diff, same_top1 = engine.outputs_agree(got, expected)
    if not agree:
        raise QLPError(f"the exported ONNX differs from the PyTorch model (max abs diff {max_diff:.2e}, "
                       f"same top-1: {same_top1}); rerun with --debug and report it")
    proto = onnx.load_from_string(model_bytes)
    masks_np = {name: keep.cpu().numpy() for name, keep in masks.items()}
    matched = match_layers(weight_initializers(proto), masks_np)
    missing = [name for name in masks_np if name not in matched]
    if missing:
        raise QLPError(f"the exported ONNX lost the sparsity of layer {missing[0]} ({len(missing)} layers "
                       "unmatched); rerun with --debug and report it")
    return {"max_abs_diff": max_diff, "same_top1": same_top1, "layers_matched": len(matched),
            "onnx_weight": matched}
