"""Turn a user's model file into a torch module the tool can prune and fine-tune.

Accepted: ONNX graphs (converted with onnx2torch and checked against onnxruntime), TorchScript files
(exported to ONNX and converted the same way, so that their Conv/Linear layers become ordinary modules),
whole pickled `nn.Module`s (only with `trust_pickle`: unpickling runs code from the file) and state dicts
of a zoo architecture (`arch`). Every failure is a QLPError or UsageError with a one-line message.
"""

from __future__ import annotations

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
from torch import fx, nn

from qlp_compress import export, zoo
from qlp_compress.errors import QLPError, UsageError, first_line
from qlp_compress.io import check_file_size, sha256_file
from qlp_compress.onnx2torch_compat import linear_from_matmul, unsupported_operators
from qlp_compress.onnx_file import check_finite, read_onnx
from qlp_compress.onnx_rewrite import rewrite_for_conversion

if TYPE_CHECKING:  # onnx2torch (and the torchvision it imports) loads on the first conversion, not on import
    pass

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
    check_finite(proto, path)
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
                       f"({first_line(e)}); check that the file is an image classifier taking (N, C, H, W)") from e


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
        raise _Unconvertible(f"operators onnx2torch cannot convert: {', '.join(ops) if ops else first_line(e)} "
                             f"(opset {_opset(proto)})") from e
    except Exception as e:
        raise QLPError(f"onnx2torch failed on {path} ({type(e).__name__}: {first_line(e)}); {REEXPORT_HINT}") from e
    linear_from_matmul(module)
    return module.float().eval()


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_faithful(module: nn.Module, x: np.ndarray, expected: np.ndarray, path: Path, reference: str) -> None:
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
        raise QLPError(f"{path} is not a loadable TorchScript file ({type(e).__name__}: {first_line(e)}); "
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
                       f"({type(e).__name__}: {first_line(e)}); save a state dict and pass --arch instead") from e
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
            raise QLPError(f"{path} is a damaged PyTorch file ({first_line(e)}); save the model again") from e
        if not trust_pickle:
            raise QLPError(f"{path} is a pickled Python object (e.g. a whole nn.Module), and loading it runs code "
                           "from the file: pass --trust-pickle (only for files you trust), or save "
                           "model.state_dict() and pass --arch") from e
    except Exception as e:
        raise QLPError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {first_line(e)}); save the "
                       "model again with torch.save") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise QLPError(f"{path} cannot be unpickled ({type(e).__name__}: {first_line(e)}); run from a project "
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
        detail = lines[1] if len(lines) > 1 else first_line(e)
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
