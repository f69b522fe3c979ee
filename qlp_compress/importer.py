"""Turn a user's model file into a torch module the tool can prune and fine-tune.

Accepted: ONNX graphs (converted with onnx2torch and checked against onnxruntime), TorchScript files
(exported to ONNX and converted the same way, so that their Conv/Linear layers become ordinary modules),
whole pickled `nn.Module`s (only with `trust_pickle`: unpickling runs code from the file) and state dicts
of a zoo architecture (`arch`). Every failure is a QLPError or UsageError with a one-line message.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from qlp_compress import export, zoo
from qlp_compress.errors import QLPError, UsageError
from qlp_compress.io import check_file_size, check_size, sha256_file
from qlp_compress.onnx_rewrite import rewrite_for_conversion

if TYPE_CHECKING:  # onnx2torch (and the torchvision it imports) loads on the first conversion, not on import
    from onnx2torch.onnx_node import OnnxNode

# onnx2torch's Slice indexes with a list; torch warns about it on every forward (the result is correct)
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")

MIN_OPSET = 13  # onnx2torch converts opset 13+ well; older graphs are converted up to it
DOWN_OPSETS = (17, 13)  # tried, in order, when onnx2torch has no converter for an operator of a newer opset
VERIFY_BATCH = 2  # images in the batch the conversion is checked on
REEXPORT_HINT = "re-export it with standard operators at opset 13–17 (torch.onnx.export(..., opset_version=17))"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")  # checkpoint wrappers


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module  # eval mode, CPU, float32
    source: Path  # the file it came from
    sha256: str  # of that file
    format: str  # "onnx", "torchscript", "pytorch-module" or "state-dict"
    input_name: str  # kept on export ("input" when the source has none)
    output_name: str  # kept on export ("logits" when the source has none)
    input_shape: tuple[int, ...] | None  # (C, H, W) when the file fixes it, else None
    num_classes: int | None  # when known
    metadata: dict[str, str]  # ONNX metadata_props of the source (empty for PyTorch)


@dataclass(frozen=True)
class _Request:
    """What load_model was asked, passed to the loader of the file's format."""

    path: Path
    arch: str | None
    trust_pickle: bool
    num_classes: int | None
    in_channels: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    verify_input_shape: tuple[int, ...] | None


def load_model(path: Path, arch: str | None = None, trust_pickle: bool = False, num_classes: int | None = None,
               in_channels: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, verify_input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Load `path` (ONNX, TorchScript, a pickled nn.Module or a state dict of zoo architecture `arch`).

    `mean`/`std` fold a normalisation into the front of the module; `verify_input_shape` (C, H, W) is the
    image shape the conversion is checked on when the file does not fix it."""
    path = Path(path)
    if not path.exists():
        raise QLPError(f"{path} does not exist; check the model path")
    if not path.is_file():
        raise QLPError(f"{path} is not a file; give the path of the model file")
    check_file_size(path, "model")
    if (mean is None) != (std is None):
        raise UsageError("--mean and --std go together; give both (one value per input channel)")
    if std is not None and not all(math.isfinite(s) and s > 0 for s in std):
        raise UsageError(f"--std must be finite numbers above zero, got {list(std)}; e.g. --std 0.353")
    if mean is not None and not all(math.isfinite(m) for m in mean):
        raise UsageError(f"--mean must be finite numbers, got {list(mean)}; e.g. --mean 0.286")
    request = _Request(path, arch, trust_pickle, num_classes, in_channels,
                       tuple(map(float, mean)) if mean is not None else None,
                       tuple(map(float, std)) if std is not None else None,
                       tuple(verify_input_shape) if verify_input_shape is not None else None)
    return LOADERS[_sniff(path)](request)


def _sniff(path: Path) -> str:
    """"torchscript", "pytorch" (torch.save: a zip or a legacy pickle) or "onnx" (anything else)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise QLPError(f"{path} cannot be read ({e.strerror}); check its permissions") from e
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise QLPError(f"{path} is a damaged zip (PyTorch) file; save the model again") from e
        return "torchscript" if any(n.split("/")[-1] == "constants.pkl" for n in names) else "pytorch"
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy (non-zip) format
        return "pytorch"
    return "onnx"


# ------------------------------------------------------------------------------------------------ ONNX


def _load_onnx(request: _Request) -> LoadedModel:
    path = request.path
    proto = read_onnx(path)
    _check_finite(proto, path)
    input_name, output_name, dims = _graph_io(proto, path)
    file_shape = tuple(d for d in dims if d is not None) if dims is not None and None not in dims else None
    shape = _verify_shape(path, dims, request.verify_input_shape)
    fixed_batch = _fixed_batch(proto)
    rewritten, changes = rewrite_for_conversion(proto, fixed_batch)
    x = _verify_batch(shape, fixed_batch)
    expected = _onnxruntime_output(proto, x, path, fixed_batch)
    proto = _free_batch(rewritten)
    if changes or fixed_batch is not None:  # the batch-free, rewritten graph must compute what the file does
        _check_rewrite(proto, x, expected, path, fixed_batch, changes)
    module = onnx_to_torch(proto, path, lambda m: _check_faithful(m, x, expected, path, "onnxruntime"))
    return LoadedModel(
        module=_normalised(module, request, shape[0]), source=path, sha256=sha256_file(path), format="onnx",
        input_name=input_name, output_name=output_name, input_shape=file_shape,
        num_classes=int(expected.shape[1]) if expected.ndim == 2 else None, metadata=export.read_metadata(proto))


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
    import onnxruntime as ort

    from qlp_compress.runtime import ir_version_message, max_ir_version

    for reader, limit in ((f"onnxruntime {ort.__version__}", max_ir_version()), (f"onnx {onnx.__version__}",
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


def _check_finite(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse NaN or inf in the stored float tensors: magnitude order and accuracy mean nothing for them."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    for tensor in _tensors(proto.graph):
        if tensor.data_type not in floats:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as e:  # its data does not fit its shape and type
            raise QLPError(f"{path} is a damaged ONNX file: tensor {tensor.name[:80]!r} does not hold the data its "
                           f"shape {list(tensor.dims)[:8]} and type need ({_first_line(e)[:100]}); export or download "
                           "it again") from e
        if not np.isfinite(values.astype(np.float64)).all():
            raise QLPError(f"tensor {tensor.name!r} of {path} holds NaN or inf values; re-export the model from a "
                           "healthy checkpoint")


def _graph_io(proto: onnx.ModelProto, path: Path) -> tuple[str, str, tuple[int | None, ...] | None]:
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


def _verify_batch(shape: tuple[int, ...], fixed_batch: int | None = None) -> np.ndarray:
    """Real-looking images: pixel values uniform in [0, 1], fixed seed. A file that fixes its batch size B gets
    2·B images, run B at a time through the file itself and all at once through the batch-free rewrite."""
    n = VERIFY_BATCH * (fixed_batch or 1)
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)


def _onnxruntime_output(proto: onnx.ModelProto, x: np.ndarray, path: Path, fixed_batch: int | None) -> np.ndarray:
    """The file's own outputs on `x`: `fixed_batch` images at a time when it fixes its batch size."""
    import onnxruntime as ort

    from qlp_compress.runtime import open_session

    session = open_session(proto.SerializeToString(), name=path)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure is reported below, in one line
    step = fixed_batch or len(x)
    try:
        return np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i : i + step]}, quiet)[0]
                               for i in range(0, len(x), step)])
    except Exception as e:
        raise QLPError(f"onnxruntime cannot run {path} on a batch of {step} images of shape {list(x.shape[1:])} "
                       f"({_first_line(e)}); check that the file is an image classifier taking (N, C, H, W)") from e


def _check_rewrite(proto: onnx.ModelProto, x: np.ndarray, expected: np.ndarray, path: Path,
                   fixed_batch: int | None, changes: list[str]) -> None:
    """onnxruntime parity between the file and its batch-free, rewritten graph, all images in one batch."""
    try:
        got = _onnxruntime_output(proto, x, path, None)
        agree, diff, _ = export.outputs_agree(got, expected)
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
                  check: Callable[[nn.Module], None] | None = None) -> fx.GraphModule:
    """onnxslim, opset conversion where onnx2torch needs it, onnx2torch; MatMul/Gemm weights become nn.Linear.

    Graphs below opset 13 are converted up to it. A graph of a newer opset that onnx2torch cannot convert
    is converted down (17, then 13) and tried again; `check` (which raises QLPError) must accept a module
    converted that way, since onnx.version_converter can keep attributes the older operator ignores."""
    from onnx import version_converter

    if _opset(proto) < MIN_OPSET:
        try:
            proto = version_converter.convert_version(proto, MIN_OPSET)
        except Exception as e:
            raise QLPError(f"{path} uses opset {_opset(proto)}, which onnx.version_converter cannot bring up to "
                           f"{MIN_OPSET} ({_first_line(e)}); {REEXPORT_HINT}") from e
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
            return module
        try:
            if check is not None:
                check(module)
            return module
        except QLPError:
            continue
    raise QLPError(f"{path} uses {problem}; {REEXPORT_HINT}, or replace those layers")


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
        raise _Unconvertible(f"operators onnx2torch cannot convert: {', '.join(ops) if ops else _first_line(e)} "
                             f"(opset {_opset(proto)})") from e
    except Exception as e:
        raise QLPError(f"onnx2torch failed on {path} ({type(e).__name__}: {_first_line(e)}); {REEXPORT_HINT}") from e
    linear_from_matmul(module)
    return module.float().eval()


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def unsupported_operators(proto: onnx.ModelProto) -> list[str]:
    """Operator types in `proto` that onnx2torch's converter registry has no converter for."""
    from onnx2torch.node_converters import get_converter

    _register_compat_converters()
    versions = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}
    missing = set()
    for node in proto.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            get_converter(node.op_type, versions.get(domain, 1), domain)
        except NotImplementedError:
            missing.add(f"{domain}.{node.op_type}" if domain else node.op_type)
    return sorted(missing)


def linear_from_matmul(module: fx.GraphModule) -> None:
    """Turn onnx2torch's MatMul (and Gemm it left generic) with a constant 2-D weight into nn.Linear, folding a
    following Add of a constant bias: the weight must be a module parameter for the pruner to find it."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
    from onnx2torch.node_converters.gemm import OnnxGemm
    from onnx2torch.node_converters.matmul import OnnxMatMul

    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        op = module.get_submodule(node.target)
        args = [*node.args, *node.kwargs.values()]
        if isinstance(op, OnnxMatMul) and len(args) == 2:
            weight, bias, scale = _constant(module, args[1]), None, 1.0
        elif isinstance(op, OnnxGemm) and not op.trans_a and len(args) in (2, 3):
            weight, scale = _constant(module, args[1]), op.alpha
            weight = weight.T if weight is not None and op.trans_b else weight
            bias = _constant(module, args[2]) if len(args) == 3 else None
            if len(args) == 3 and bias is None:
                continue
        else:
            continue
        if weight is None or weight.ndim != 2 or _constant(module, args[0]) is not None:
            continue
        out_features = weight.shape[1]
        if bias is not None:
            if bias.numel() != out_features or bias.shape[-1] != out_features:
                continue
            bias = bias.reshape(-1) * op.beta
        users = list(node.users)
        add = users[0] if len(users) == 1 and bias is None else None
        if add is not None and add.op == "call_module" and not add.kwargs and len(add.args) == 2:
            add_op = module.get_submodule(add.target)
            other = add.args[1] if add.args[0] is node else add.args[0]
            candidate = _constant(module, other)
            if (isinstance(add_op, OnnxBinaryMathOperation) and add_op.math_op_function is torch.add
                    and add_op.broadcast is None and candidate is not None
                    and candidate.numel() == out_features and candidate.shape[-1] == out_features):
                bias = candidate.reshape(-1)
            else:
                add = None
        else:
            add = None
        linear = nn.Linear(weight.shape[0], out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.T * scale)
            if bias is not None:
                linear.bias.copy_(bias)
        module.add_submodule(node.target, linear)
        node.args, node.kwargs = (args[0],), {}
        if add is not None:
            add.replace_all_uses_with(node)
            graph.erase_node(add)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        used = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name, _ in list(module.named_buffers()):
            if name.startswith("initializers.") and name not in used:
                delattr(module.get_submodule("initializers"), name.split(".", 1)[1])
        module.recompile()


def _constant(module: fx.GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor behind an fx argument that reads a stored constant, else None."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(arg.target, str)):
        return None
    value: object = module
    for part in arg.target.split("."):
        value = getattr(value, part, None)
    return value.detach().float() if isinstance(value, torch.Tensor) else None


def _check_faithful(module: nn.Module, x: np.ndarray, expected: np.ndarray, path: Path, reference: str) -> None:
    """The converted module against the reference output on the same batch: close, and the same top-1."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = module(torch.from_numpy(x))
    except Exception as e:
        raise QLPError(f"the PyTorch conversion of {path} cannot run ({type(e).__name__}: {_first_line(e)}); "
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
    agree, diff, same_top1 = export.outputs_agree(got_np, expected)
    if not agree:
        raise QLPError(f"the conversion of {path} to PyTorch is not faithful (max abs diff {diff:.2e} against "
                       f"{reference}, same top-1: {same_top1}); {REEXPORT_HINT}, and report the file")


def _normalised(module: nn.Module, request: _Request, channels: int | None) -> nn.Module:
    """The module with the requested normalisation folded into its front (zoo.Normalize), eval/CPU/float32."""
    module = module.float().eval().cpu()
    if request.mean is None or request.std is None:
        return module
    _check_stats(request, channels)
    return nn.Sequential(zoo.Normalize(request.mean, request.std), module).eval()


def _check_stats(request: _Request, channels: int | None) -> None:
    assert request.mean is not None and request.std is not None
    if len(request.mean) != len(request.std):
        raise UsageError(f"--mean has {len(request.mean)} values but --std has {len(request.std)}; give one "
                         "of each per input channel")
    if channels is not None and len(request.mean) not in (1, channels):
        raise UsageError(f"--mean/--std need {channels} values (one per input channel), got {len(request.mean)}")


# ------------------------------------------------------------------------------------------------ PyTorch


def _load_torchscript(request: _Request) -> LoadedModel:
    """TorchScript hides its layers from isinstance checks: export it to ONNX and convert that, checked
    against the TorchScript module itself."""
    path = request.path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated; reading old files is still what users need
            script = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise QLPError(f"{path} is not a loadable TorchScript file ({type(e).__name__}: {_first_line(e)}); "
                       "save it again with torch.jit.save") from e
    shape = request.verify_input_shape
    if shape is None:
        raise UsageError(f"{path} is TorchScript, which does not record its input size; pass the image shape "
                         "(--data)")
    x = _verify_batch(shape)
    try:
        with torch.no_grad():
            expected = script(torch.from_numpy(x))
        model_bytes = export.to_onnx_bytes(script, shape)
    except Exception as e:
        raise QLPError(f"the TorchScript model {path} cannot run and export on images of shape {list(shape)} "
                       f"({type(e).__name__}: {_first_line(e)}); save a state dict and pass --arch instead") from e
    if not isinstance(expected, torch.Tensor):
        raise QLPError(f"{path} returns {type(expected).__name__}, not a tensor of logits; the tool compresses "
                       "image classifiers with one output")
    reference = expected.float().numpy()
    module = onnx_to_torch(onnx.load_from_string(model_bytes), path,
                           lambda m: _check_faithful(m, x, reference, path, "the TorchScript module"))
    return LoadedModel(
        module=_normalised(module, request, shape[0]), source=path, sha256=sha256_file(path), format="torchscript",
        input_name=export.INPUT_NAME, output_name=export.OUTPUT_NAME, input_shape=None,
        num_classes=int(expected.shape[1]) if expected.ndim == 2 else None, metadata={})


def _load_pytorch(request: _Request) -> LoadedModel:
    """torch.save output: a state dict (with --arch) or, with trust_pickle, a whole nn.Module."""
    obj = _torch_load(request.path, request.trust_pickle)
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        obj = next((obj[k] for k in STATE_DICT_KEYS
                    if isinstance(obj.get(k), nn.Module) or _is_state_dict(obj.get(k))), obj)
    if isinstance(obj, nn.Module):
        return _from_module(obj, request)
    if _is_state_dict(obj):
        return _from_state_dict(obj, request)
    raise QLPError(f"{request.path} holds a {type(obj).__name__}, not a model or a state dict; save "
                   "model.state_dict() (and pass --arch) or the model itself")


def _torch_load(path: Path, trust_pickle: bool) -> object:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is reported below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e):
            raise QLPError(f"{path} is a damaged PyTorch file ({_first_line(e)}); save the model again") from e
        if not trust_pickle:
            raise QLPError(f"{path} is a pickled Python object (e.g. a whole nn.Module), and loading it runs code "
                           "from the file: pass --trust-pickle (only for files you trust), or save "
                           "model.state_dict() and pass --arch") from e
    except Exception as e:
        raise QLPError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {_first_line(e)}); save the "
                       "model again with torch.save") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise QLPError(f"{path} cannot be unpickled ({type(e).__name__}: {_first_line(e)}); run from a project "
                       "where the model's classes can be imported, or save a state dict and pass --arch") from e


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _from_module(module: nn.Module, request: _Request) -> LoadedModel:
    channels = request.verify_input_shape[0] if request.verify_input_shape else request.in_channels
    return LoadedModel(
        module=_normalised(module, request, channels), source=request.path, sha256=sha256_file(request.path),
        format="pytorch-module", input_name=export.INPUT_NAME, output_name=export.OUTPUT_NAME, input_shape=None,
        num_classes=None, metadata={})


def _from_state_dict(state: Mapping[str, torch.Tensor], request: _Request) -> LoadedModel:
    """A zoo architecture (built with its front Normalize) loaded with `state`: the state dict of the whole
    zoo model ("0.mean", "1.conv1.weight", ...) or of the bare architecture ("conv1.weight", ...)."""
    path, arch = request.path, request.arch
    if arch is None:
        raise UsageError(f"{path} holds only weights (a state dict); pass --arch with its architecture "
                         f"({', '.join(zoo.ARCHS)})")
    if arch not in zoo.ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(zoo.ARCHS)}")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from nn.DataParallel
    has_norm = "0.mean" in state and "0.std" in state
    body = {k[2:]: v for k, v in state.items() if k.startswith("1.")} if has_norm else state
    kernels = [v for v in body.values() if v.ndim == 4]
    matrices = [v for v in body.values() if v.ndim == 2]
    in_channels = request.in_channels or (int(kernels[0].shape[1]) if kernels else None)
    num_classes = request.num_classes or (int(matrices[-1].shape[0]) if matrices else None)
    if in_channels is None or num_classes is None:
        raise UsageError(f"cannot tell the input channels and classes of {path}; pass --data")
    if request.mean is not None and request.std is not None:
        _check_stats(request, in_channels)
        mean, std = request.mean, request.std
    elif has_norm:
        mean, std = tuple(state["0.mean"].flatten().tolist()), tuple(state["0.std"].flatten().tolist())
    else:  # a bare architecture: it sees the [0, 1] pixels as they are, unless --mean/--std say otherwise
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    if len(mean) == 1 and in_channels > 1:
        mean, std = mean * in_channels, std * in_channels
    model = zoo.build_model(arch, in_channels, num_classes, mean, std)
    try:
        model[1].load_state_dict(body, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else _first_line(e)
        raise QLPError(f"{path} does not fit --arch {arch} with {num_classes} classes and {in_channels} input "
                       f"channels ({detail[:200]}); check --arch and --data") from e
    return LoadedModel(
        module=model.float().eval().cpu(), source=path, sha256=sha256_file(path), format="state-dict",
        input_name=export.INPUT_NAME, output_name=export.OUTPUT_NAME, input_shape=None, num_classes=num_classes,
        metadata={})


LOADERS: dict[str, Callable[[_Request], LoadedModel]] = {
    "onnx": _load_onnx,
    "torchscript": _load_torchscript,
    "pytorch": _load_pytorch,
}


# ------------------------------------------------------------------------------- onnx2torch compatibility


def _axes_input_to_attribute(node: OnnxNode, graph) -> OnnxNode:
    """Reduce* of opset 18 reads its axes from an input; the opset-13 converter wants an attribute."""
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import get_const_value

    def unsupported(why: str) -> NotImplementedError:
        return NotImplementedError(f"Converter is not implemented (operation_type='{node.operation_type}', "
                                   f"version=18: {why})")

    axes: list[int] = []
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in torch.as_tensor(get_const_value(node.input_values[1], graph)).flatten()]
        except KeyError as e:
            raise unsupported("axes computed in the graph") from e
    if not axes and node.attributes.get("noop_with_empty_axes", 0):  # the identity, which opset 13 cannot say
        raise unsupported("noop_with_empty_axes")
    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    del proto.input[1:]
    if axes:
        proto.attribute.append(onnx.helper.make_attribute("axes", axes))
    return OnnxNode(proto, unique_name=node.unique_name)


def _all_ones(name: str) -> Callable:
    return lambda node: all(v == 1 for v in node.attributes.get(name, [1]))


# Operator versions of opsets 16–21 that onnx2torch 1.5 has no converter for, although the previous version's
# converter computes the same thing on float tensors (the new version added types, or an input or attribute
# that the node leaves at its default). Each entry: operator, versions, the condition a node must meet (or a
# rewrite into the previous version's form). Whatever is converted is still checked against onnxruntime.
_SAME = None
_COMPAT: tuple[tuple[str, tuple[int, ...], Callable | None], ...] = (
    *((op, versions, _SAME) for op, versions in (
        ("Cast", (19, 21)), ("Constant", (19, 21)), ("ConstantOfShape", (20, 21)), ("Equal", (19,)),
        ("Flatten", (21,)), ("GreaterOrEqual", (16,)), ("LessOrEqual", (16,)), ("Identity", (19, 21)),
        ("IsInf", (20,)), ("IsNaN", (20,)), ("Reshape", (19, 21)), ("Shape", (19, 21)), ("Transpose", (21,)),
        ("Unsqueeze", (21,)), ("Split", (18,)))),
    ("AveragePool", (19,), _all_ones("dilations")),
    ("Pad", (18,), lambda node: len(node.input_values) < 4 or not node.input_values[3]),
    ("Pad", (19,), lambda node: node.attributes.get("mode", "constant") != "wrap"),
    ("Pad", (21,), _SAME),
    ("Resize", (18,), lambda node: not node.attributes.get("antialias", 0) and "axes" not in node.attributes
     and node.attributes.get("keep_aspect_ratio_policy", "stretch") == "stretch"),
    ("Resize", (19,), lambda node: node.attributes.get("coordinate_transformation_mode") != "half_pixel_symmetric"),
    ("ScatterND", (18,), lambda node: node.attributes.get("reduction", "none") not in ("max", "min")),
    *((op, (18,), _axes_input_to_attribute) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSumSquare")),
    ("ReduceMax", (20,), _SAME),
    ("ReduceMin", (20,), _SAME),
)


def _activation(make: Callable[[OnnxNode], nn.Module]) -> Callable:
    """A converter for an elementwise activation that torch has as a module."""

    def convert(node, graph):
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

        return OperationConverterResult(make(node), onnx_mapping_from_node(node))

    return convert


# Activations that became single operators in recent opsets (the exporter's default, 20, writes GELU as Gelu)
# and that onnx.version_converter cannot take back to an older opset.
_NEW_ACTIVATIONS: dict[tuple[str, int], Callable] = {
    ("Gelu", 20): _activation(lambda node: nn.GELU(approximate=node.attributes.get("approximate", "none"))),
    ("Mish", 18): _activation(lambda node: nn.Mish()),
}


@functools.cache
def _register_compat_converters() -> None:
    """Route the operator versions in _COMPAT to the previous version's converter, and add _NEW_ACTIVATIONS,
    through onnx2torch's own registry (add_converter); what a newer onnx2torch converts itself is left alone."""
    from onnx2torch.node_converters.registry import add_converter, get_converter

    def has(op: str, version: int) -> bool:
        try:
            get_converter(op, version)
            return True
        except NotImplementedError:
            return False

    for (op, version), converter in _NEW_ACTIVATIONS.items():
        if not has(op, version):
            add_converter(op, version)(converter)
    for op, versions, rule in sorted(_COMPAT, key=lambda entry: entry[1]):
        for version in versions:
            if has(op, version):
                continue
            previous = next((v for v in range(version - 1, 0, -1) if has(op, v)), None)
            if previous is not None:
                add_converter(op, version)(_compat_converter(op, version, get_converter(op, previous), rule))


def _compat_converter(op: str, version: int, previous: Callable, rule: Callable | None) -> Callable:
    def convert(node, graph):
        if rule is not None:
            result = rule(node) if rule is not _axes_input_to_attribute else rule(node, graph)
            if result is False:
                raise NotImplementedError(f"Converter is not implemented (operation_type='{op}', version={version}: "
                                          "it uses a feature of that version)")
            if result is not True:
                node = result
        return previous(node, graph)

    return convert

