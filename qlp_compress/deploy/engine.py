"""onnxruntime sessions and what is measured through them: accuracy and latency."""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.data import Dataset

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.data import iterate_batches

DEVICES = ("auto", "cpu", "cuda")
# what onnxruntime raises when a session cannot load or run a model (its exception classes share no base but Exception)
ORT_ERRORS = tuple(v for v in vars(ort.capi.onnxruntime_pybind11_state).values()
                   if isinstance(v, type) and issubclass(v, Exception))


def ort_message(e: BaseException, limit: int = 240) -> str:
    """The gist of an onnxruntime error on one line: the node and its status message, without source paths."""
    text = " ".join(str(e).split()) or type(e).__name__
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    if "Status Message:" in text:
        text = text.split("Status Message:", 1)[1].strip()
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : |/onnxruntime_src/\S+:\d+ ", "", text)
    if node:
        text = f"{node.group(1)} node {node.group(2)!r}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when a GPU is usable, else "cpu"; "cuda" without a GPU is a usage error."""
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device


def providers_for(device: str) -> list[str]:
    """CUDA provider only when a GPU is actually there (asking for it otherwise logs errors)."""
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(model: Path | bytes, device: str = "cpu", threads: int = 0,
                 name: object = None) -> ort.InferenceSession:
    """An onnxruntime session; `name` is how errors call the model (default: its path, or "the model")."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure is reported below, in one line
    if threads:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=providers_for(device))
    except Exception as e:
        name = name or (model if isinstance(model, Path) else "the model")
        newer = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", str(e))
        if newer:
            raise QLPError(ir_version_message(name, int(newer[1]), f"onnxruntime {ort.__version__}",
                                              int(newer[2]))) from e
        raise QLPError(f"onnxruntime cannot load {name}: {ort_message(e)}; check the file with onnx.checker") from e


@functools.cache
def max_ir_version() -> int:
    """The newest ONNX IR version this onnxruntime loads (it does not say; a one-node model tells)."""
    import onnx

    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([node], "probe", [value], [onnx.helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = onnx.IR_VERSION
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        found = re.search(r"max supported IR version: (\d+)", str(e))
        if found:
            return int(found[1])
    return onnx.IR_VERSION


def ir_version_message(name: object, ir_version: int, reader: str, max_ir_version: int) -> str:
    """The one-line error for a file whose ONNX IR version is newer than `reader` reads."""
    return (f"{name} has ONNX IR version {ir_version}, newer than {reader} reads (up to {max_ir_version}); re-save "
            f"it with an older IR version (model.ir_version = {max_ir_version}; onnx.save(model, path)) or upgrade "
            f"{reader.split()[0]} (pip install -U {reader.split()[0]})")


@dataclass(frozen=True)
class Latency:
    batch: int  # images per run
    median_ms: float  # median wall time of one run
    p90_ms: float  # 90th percentile of one run
    provider: str  # onnxruntime execution provider that ran it


def check_input_fits(session: ort.InferenceSession, input_shape: tuple[int, ...], num_classes: int) -> None:
    """The model's declared input (C, H, W) and class count must fit the data."""
    declared = session.get_inputs()[0].shape
    if len(declared) != 1 + len(input_shape):
        raise UsageError(f"the model takes input of shape {declared} but the data has images of shape "
                         f"{list(input_shape)}; pick the data set the model was trained on")
    for want, have in zip(declared[1:], input_shape, strict=True):
        if isinstance(want, int) and want != have:
            raise UsageError(f"the model takes input of shape {declared} but the data has images of shape "
                             f"{list(input_shape)}; pick the data set the model was trained on")
    out = session.get_outputs()[0].shape
    if len(out) == 2 and isinstance(out[1], int) and out[1] != num_classes:
        raise UsageError(f"the model predicts {out[1]} classes but the data has {num_classes}; "
                         "pick the data set the model was trained on")


def session_accuracy(session: ort.InferenceSession, dataset: Dataset, batch_size: int = 256,
                     limit: int | None = None) -> float:
    """Top-1 accuracy through onnxruntime."""
    name = session.get_inputs()[0].name
    correct = seen = 0
    for x, y in iterate_batches(dataset, batch_size, limit=limit):
        logits = session.run(None, {name: x.numpy()})[0]
        correct += int((logits.argmax(1) == y.numpy()).sum())
        seen += len(y)
    return correct / max(1, seen)


def measure_latency(session: ort.InferenceSession, input_shape: tuple[int, ...], batch: int,
                    warmup: int = 5, repeats: int = 30) -> Latency:
    """Warm up, then time `repeats` runs on random input; median and p90 in milliseconds."""
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    return Latency(batch, float(np.median(times)), float(np.percentile(times, 90)), session.get_providers()[0])
