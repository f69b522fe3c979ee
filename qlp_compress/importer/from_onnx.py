"""ONNX graphs → torch modules: onnx2torch, with the compatibility rewrites (onnx_rewrite, onnx2torch_compat), opset
conversion when a converter is missing, and a check against onnxruntime on the original file."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx, nn

from qlp_compress.base.errors import QLPError, UsageError, first_line
from qlp_compress.base.io import sha256_file
from qlp_compress.deploy import engine, export
from qlp_compress.importer.model import (
    DOWN_OPSETS,
    MIN_OPSET,
    REEXPORT_HINT,
    LoadedModel,
    Request,
    carry_names,
    normalised,
    verify_batch,
)
from qlp_compress.importer.onnx2torch_compat import linear_from_matmul, unsupported_operators
from qlp_compress.importer.onnx_file import check_finite, read_onnx
from qlp_compress.importer.onnx_rewrite import rewrite_for_conversion

# onnx2torch's Slice indexes with a list; torch warns about it on every forward (the result is correct)
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")

def load_onnx(request: Request) -> LoadedModel:
    path = request.path
    proto = read_onnx(path)
    check_finite(proto, path)
    input_name, output_name, dims = graph_io(proto, path)
    file_shape = tuple(d for d in dims if d is not None) if dims is not None and None not in dims else None
    shape = _verify_shape(path, dims, request.verify_input_shape)
    fixed_batch = _fixed_batch(proto)
    rewritten, changes = rewrite_for_conversion(proto, fixed_batch)
    x = verify_batch(shape, fixed_batch)
    expected = _onnxruntime_output(proto, x, path, fixed_batch)
    proto = _free_batch(rewritten)
    if changes or fixed_batch is not None:  # the batch-free, rewritten graph must compute what the file does
        _check_rewrite(proto, x, expected, path, fixed_batch, changes)
    module, names = onnx_to_torch(proto, path, lambda m: check_faithful(m, x, expected, path, "onnxruntime"))
    final = normalised(module, request, shape[0])
    return LoadedModel(
        module=final, source=path, sha256=sha256_file(path), format="onnx",
        input_name=input_name, output_name=output_name, input_shape=file_shape,
        num_classes=int(expected.shape[1]) if expected.ndim == 2 else None, metadata=export.read_metadata(proto),
        layer_names=carry_names(names, module, final))


def graph_io(proto: onnx.ModelProto, path: Path) -> tuple[str, str, tuple[int | None, ...] | None]:
    """The single image input and logits output: their names, and the input's dims after the batch axis
    (None for a symbolic one; no tuple when the file records no input shape)."""
    constants = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in constants]
    outputs = list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise QLPError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; the tool compresses image "
                       "classifiers with one input (images) and one output (logits): re-export it that way")
    for kind, value in (("input", inputs[0]), ("output", outputs[0])):
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise QLPError(f"the {kind} {value.name!r} of {path} is {onnx.TensorProto.DataType.Name(elem)}, not "
                           "FLOAT; re-export the model in float32 (quantise after compression)")
    if not inputs[0].type.tensor_type.HasField("shape"):
        return inputs[0].name, outputs[0].name, None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2:
        raise QLPError(f"the input of {path} has rank {len(dims)}; the tool feeds batches of images (N, C, H, W)")
    fixed = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])
    return inputs[0].name, outputs[0].name, fixed


def _verify_shape(path: Path, dims: tuple[int | None, ...] | None,
                  verify_input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The image shape to check the conversion on: the file's when it fixes it, else `verify_input_shape`."""
    if dims is not None and None not in dims:
        return tuple(d for d in dims if d is not None)
    if verify_input_shape is None:
        raise UsageError(f"the image size of {path} is symbolic; pass the image shape (--data) so the conversion "
                         "can be checked on images of that size")
    if dims is not None and (len(dims) != len(verify_input_shape)
                             or any(d not in (None, v) for d, v in zip(dims, verify_input_shape, strict=True))):
        shown = ["?" if d is None else d for d in dims]
        raise UsageError(f"{path} takes images of shape {shown} but the data has {list(verify_input_shape)}; pick "
                         "the data set the model was trained on")
    return verify_input_shape


def _graph_values(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    constants = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in constants] + list(proto.graph.output)


def _fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size the file fixes on its input or output (files exported without dynamic axes), else None."""
    dims = [v.type.tensor_type.shape.dim[0] for v in _graph_values(proto) if v.type.tensor_type.shape.dim]
    return next((int(d.dim_value) for d in dims if d.HasField("dim_value") and d.dim_value > 0), None)


def _free_batch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose input and output batch dimension is symbolic."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    if _fixed_batch(out) is not None:
        for value in _graph_values(out):
            if value.type.tensor_type.shape.dim:
                value.type.tensor_type.shape.dim[0].Clear()
                value.type.tensor_type.shape.dim[0].dim_param = "batch"
        del out.graph.value_info[:]  # shapes inferred at the old batch size
    return out


def batch_free(proto: onnx.ModelProto, path: Path, image_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The graph with a symbolic batch axis: unchanged when it has one, else rewritten as `load_onnx` does and
    checked against the file itself in onnxruntime (a QLPError names the fix when the graph depends on it)."""
    fixed_batch = _fixed_batch(proto)
    if fixed_batch is None:
        return proto
    rewritten, changes = rewrite_for_conversion(proto, fixed_batch)
    x = verify_batch(image_shape, fixed_batch)
    expected = _onnxruntime_output(proto, x, path, fixed_batch)
    free = _free_batch(rewritten)
    _check_rewrite(free, x, expected, path, fixed_batch, changes)
    return free


def _onnxruntime_output(proto: onnx.ModelProto, x: np.ndarray, path: Path, fixed_batch: int | None) -> np.ndarray:
    """The file's own outputs on `x`: `fixed_batch` images at a time when it fixes its batch size."""
    session = engine.open_session(proto.SerializeToString(), name=path)
    step = fixed_batch or len(x)
    try:
        return engine.outputs(session, x, step)
    except Exception as e:
        raise QLPError(f"onnxruntime cannot run {path} on a batch of {step} images of shape {list(x.shape[1:])} "
                       f"({first_line(e)}); check that the file is an image classifier taking (N, C, H, W)") from e


def _check_rewrite(proto: onnx.ModelProto, x: np.ndarray, expected: np.ndarray, path: Path,
                   fixed_batch: int | None, changes: list[str]) -> None:
    """onnxruntime parity between the file and its batch-free, rewritten graph, all images in one batch."""
    try:
        got = _onnxruntime_output(proto, x, path, None)
        agree, diff, _ = engine.outputs_agree(got, expected)
    except QLPError as e:
        agree, diff = False, str(e)
    if agree:
        return
    if fixed_batch is not None:
        raise QLPError(f"{path} was exported with a fixed batch size of {fixed_batch} that its graph depends on "
                       f"(batch-free graph: {diff}); re-export it with a dynamic batch axis "
                       "(torch.onnx.export(..., dynamic_axes={input_name: {0: 'batch'}}))")
    raise QLPError(f"rewriting {path} for onnx2torch changed its outputs ({'; '.join(changes)[:200]}); "
                   f"{REEXPORT_HINT}, and report the file")


class _Unconvertible(Exception):
    """onnx2torch has no converter for some operator of a graph (the message names them)."""


def onnx_to_torch(proto: onnx.ModelProto, path: Path,
                  check: Callable[[nn.Module], None] | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """onnxslim, opset conversion where onnx2torch needs it, onnx2torch; MatMul/Gemm weights become nn.Linear.
    Returns the module and the readable name (base.names) of each module that computes a weight op.

    Graphs below opset 13 are converted up to it. A graph of a newer opset that onnx2torch cannot convert
    is converted down (17, then 13) and tried again; `check` (which raises QLPError) must accept a module
    converted that way, since onnx.version_converter can keep attributes the older operator ignores."""
    from onnx import version_converter

    if _opset(proto) < MIN_OPSET:
        try:
            proto = version_converter.convert_version(proto, MIN_OPSET)
        except Exception as e:
            raise QLPError(f"{path} uses opset {_opset(proto)}, which onnx.version_converter cannot bring up to "
                           f"{MIN_OPSET} ({first_line(e)}); {REEXPORT_HINT}") from e
    proto = _slim(proto)
    problem = None
    for candidate in _down_converted(proto):
        try:
            module = _convert(candidate, path)
        except _Unconvertible as e:
            problem = problem or str(e)
            continue
        if problem is None:  # the graph as given: its check failing is the answer
            if check is not None:
                check(module)
            return module, module_layer_names(candidate)
        try:
            if check is not None:
                check(module)
            return module, module_layer_names(candidate)
        except QLPError:
            continue
    raise QLPError(f"{path} uses {problem}; {REEXPORT_HINT}, or replace those layers")


def module_layer_names(proto: onnx.ModelProto) -> dict[str, str]:
    """onnx2torch's module name of every Conv/Gemm/MatMul node → the layer's readable name, from the weight
    initializer's name and the node's name (base.names.layer_name)."""
    from onnx2torch.onnx_graph import OnnxGraph

    from qlp_compress.base.names import layer_name

    constants = {t.name for t in proto.graph.initializer}
    out = {}
    for module_name, node in OnnxGraph(proto.graph).nodes.items():
        slot = export.WEIGHT_OPS.get(node.operation_type)
        if slot is not None and len(node.input_values) > slot:
            weight = node.input_values[slot]
            out[module_name] = layer_name(weight if weight in constants else None, node.name)
    return out


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return export.simplify(proto)
    except Exception:
        return proto  # simplifying is an optimisation; the graph converts without it, and is checked the same way


def _down_converted(proto: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """The graph itself, then (lazily) the same graph at each of DOWN_OPSETS below its own."""
    from onnx import version_converter

    yield proto
    for target in DOWN_OPSETS:
        if target < _opset(proto):
            try:
                yield version_converter.convert_version(proto, target)
            except Exception:
                continue  # no adapter for some operator


def _convert(proto: onnx.ModelProto, path: Path) -> fx.GraphModule:
    from onnx2torch import convert

    missing = unsupported_operators(proto)
    if missing:
        raise _Unconvertible(f"operators onnx2torch cannot convert: {', '.join(missing)} (opset {_opset(proto)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(proto)
    except NotImplementedError as e:
        ops = sorted(set(re.findall(r"operation_type='(\w+)'", str(e))))
        raise _Unconvertible(f"operators onnx2torch cannot convert: {', '.join(ops) if ops else first_line(e)} "
                             f"(opset {_opset(proto)})") from e
    except Exception as e:
        raise QLPError(f"onnx2torch failed on {path} ({type(e).__name__}: {first_line(e)}); {REEXPORT_HINT}") from e
    linear_from_matmul(module)
    return module.float().eval()


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_faithful(module: nn.Module, x: np.ndarray, expected: np.ndarray, path: Path, reference: str) -> None:
    """The converted module against the reference output on the same batch: close, and the same top-1."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = module(torch.from_numpy(x))
    except Exception as e:
        raise QLPError(f"the PyTorch conversion of {path} cannot run ({type(e).__name__}: {first_line(e)}); "
                       f"{REEXPORT_HINT}") from e
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != expected.shape:
        shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise QLPError(f"the conversion of {path} to PyTorch is not faithful: output {shape} against "
                       f"{list(expected.shape)} from {reference}; {REEXPORT_HINT}")
    got_np = got.float().numpy()
    for side, out in ((reference, expected), ("its PyTorch conversion", got_np)):
        if not np.isfinite(out).all():
            raise QLPError(f"{path} outputs NaN or inf on images in [0, 1] ({side}); re-export the model from a "
                           "healthy checkpoint")
    agree, diff, same_top1 = engine.outputs_agree(got_np, expected)
    if not agree:
        raise QLPError(f"the conversion of {path} to PyTorch is not faithful (max abs diff {diff:.2e} against "
                       f"{reference}, same top-1: {same_top1}); {REEXPORT_HINT}, and report the file")
