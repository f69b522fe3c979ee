"""Reading an ONNX file safely: parse, refuse damaged text and IR versions newer than onnx or onnxruntime read,
load external data only from inside the model's folder, run onnx.checker, refuse NaN or inf weights. Every
failure is a QLPError with a one-line message. Used by the importer, `evaluate` and `quantize`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qlp_compress.base.errors import QLPError, first_line
from qlp_compress.base.io import check_size


def read_onnx(path: Path) -> onnx.ModelProto:
    """Parse, load external data kept inside the model's folder, and run onnx.checker."""
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:
        if data[:1] == b"\x08":  # an ONNX file starts with its ir_version field
            raise QLPError(f"{path} is a truncated or corrupt ONNX file; export or download it again") from e
        raise QLPError(f"{path} is not an ONNX or PyTorch model file; give a .onnx, TorchScript or torch.save "
                       "file") from e
    if not proto.HasField("graph") or not proto.graph.node:
        raise QLPError(f"{path} is not an ONNX or PyTorch model file (no ONNX graph in it); give a .onnx, "
                       "TorchScript or torch.save file")
    _check_text(proto, path)
    _load_external_data(proto, path)
    _check_ir_version(proto, path)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise QLPError(f"{path} fails onnx.checker: {detail}; re-export the model or fix the graph") from e
    return proto


def _check_ir_version(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse, with the fix, a file newer than onnx's checker or onnxruntime reads (else a bare "Unsupported")."""
    from qlp_compress.deploy.engine import ORT_VERSION, ir_version_message, max_ir_version

    for reader, limit in ((f"onnxruntime {ORT_VERSION}", max_ir_version()), (f"onnx {onnx.__version__}",
                                                                                   onnx.IR_VERSION)):
        if proto.ir_version > limit:
            raise QLPError(ir_version_message(path, proto.ir_version, reader,
                                              min(max_ir_version(), onnx.IR_VERSION)))


def _check_text(message, path: Path, where: str = "model") -> None:
    """Every text field of an ONNX message must be UTF-8 (protobuf hands damaged text over as bytes, which
    onnxruntime and onnx2torch cannot read)."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else (value,)
        if field.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                raise QLPError(f"{path} is a damaged ONNX file: its {where}.{field.name} is not UTF-8 text; export "
                               "or download it again")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                _check_text(item, path, field.name)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in `graph` and its subgraphs (where external data can hide)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Check every external-data reference against the files beside the model, then load it. External data is
    read relative to the model file (wherever the current folder is) and only from the model's folder: a
    crafted file could otherwise read any file."""
    folder = path.parent.resolve()
    external = [t for t in _tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    targets = set()
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path} keeps tensor {tensor.name[:80]!r} in external data"
        if not location:
            raise QLPError(f"{where} but names no file for it (an empty location); re-export the model, or "
                           "re-save it with onnx.save_model(..., save_as_external_data=True)")
        try:
            target = (folder / location).resolve()
        except (OSError, ValueError, RuntimeError) as e:
            raise QLPError(f"{where} {location[:80]!r}, which is not a usable file name ({type(e).__name__}); "
                           "re-export the model") from e
        if not target.is_relative_to(folder):
            raise QLPError(f"{path} points its tensor {tensor.name[:80]!r} at external data {location[:80]!r} outside "
                           "the model's folder; refusing to read it: keep the data files beside the model")
        if target.is_dir():
            raise QLPError(f"{where} {location[:80]!r}, which is a folder, not a file; put the data file beside the "
                           "model under that name")
        if not target.is_file():
            raise QLPError(f"{where} {location[:80]!r}, which is missing; put that file beside the model")
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
        except ValueError:
            raise QLPError(f"{where} {location[:80]!r} at a position that is not a whole number; re-export the "
                           "model") from None
        size = target.stat().st_size
        if offset < 0 or (length is not None and length < 0) or offset + (length or 0) > size:
            raise QLPError(f"{where} {location[:80]!r}, {length if length is not None else 'all'} bytes from offset "
                           f"{offset}, but that file holds {size} bytes; copy the data file beside the model again, "
                           "or re-export the model")
        targets.add(target)
    if external:
        check_size(path.stat().st_size + sum(t.stat().st_size for t in targets), f"{path} with its external data",
                   "model")
        from onnx.external_data_helper import load_external_data_for_model

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown keys: the checks above and below decide
                load_external_data_for_model(proto, str(folder))
        except Exception as e:
            raise QLPError(f"the external data of {path} is unreadable ({type(e).__name__}); copy the data files "
                           "beside the model again") from e


def check_finite(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse NaN or inf in the stored float tensors: magnitude order and accuracy mean nothing for them."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    for tensor in _tensors(proto.graph):
        if tensor.data_type not in floats:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as e:  # its data does not fit its shape and type
            raise QLPError(f"{path} is a damaged ONNX file: tensor {tensor.name[:80]!r} does not hold the data its "
                           f"shape {list(tensor.dims)[:8]} and type need ({first_line(e)[:100]}); export or download "
                           "it again") from e
        if not np.isfinite(values.astype(np.float64)).all():
            raise QLPError(f"tensor {tensor.name!r} of {path} holds NaN or inf values; re-export the model from a "
                           "healthy checkpoint")
