"""PyTorch files → torch modules: TorchScript (exported to ONNX and converted, so its layers become ordinary
modules), whole pickled modules (only with --trust-pickle: unpickling runs code from the file) and state dicts of a
zoo architecture."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from qlp_compress.base.errors import QLPError, UsageError, first_line
from qlp_compress.base.io import sha256_file
from qlp_compress.deploy import export
from qlp_compress.importer.from_onnx import check_faithful, onnx_to_torch
from qlp_compress.importer.model import (
    STATE_DICT_KEYS,
    LoadedModel,
    Request,
    carry_names,
    check_stats,
    normalised,
    verify_batch,
)
from qlp_compress.train import zoo


def load_torchscript(request: Request) -> LoadedModel:
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
    x = verify_batch(shape)
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
    module, names = onnx_to_torch(onnx.load_from_string(model_bytes), path,
                                  lambda m: check_faithful(m, x, reference, path, "the TorchScript module"))
    final = normalised(module, request, shape[0])
    return LoadedModel(
        module=final, layer_names=carry_names(names, module, final), source=path, sha256=sha256_file(path),
        format="torchscript",
        input_name=export.INPUT_NAME, output_name=export.OUTPUT_NAME, input_shape=None,
        num_classes=int(expected.shape[1]) if expected.ndim == 2 else None, metadata={})


def load_pytorch(request: Request) -> LoadedModel:
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


def _from_module(module: nn.Module, request: Request) -> LoadedModel:
    channels = request.verify_input_shape[0] if request.verify_input_shape else request.in_channels
    return LoadedModel(
        module=normalised(module, request, channels), source=request.path, sha256=sha256_file(request.path),
        format="pytorch-module", input_name=export.INPUT_NAME, output_name=export.OUTPUT_NAME, input_shape=None,
        num_classes=None, metadata={})


def _from_state_dict(state: Mapping[str, torch.Tensor], request: Request) -> LoadedModel:
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
        check_stats(request, in_channels)
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
