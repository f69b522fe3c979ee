"""The onnxruntime engine: every session the tool opens, and what is measured through them: outputs, accuracy,
latency, interleaved speedups, and the reward's initializer-swap fast path. The only module that runs onnxruntime.

May import: base, data."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.data import Dataset

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.data import iterate_batches

DEVICES = ("auto", "cpu", "cuda")
ORT_VERSION = ort.__version__
VERIFY_ATOL = 1e-4  # max abs difference allowed between two runs of a model, per unit of its largest |logit| (≥ 1)
# what onnxruntime raises when a session cannot load or run a model (its exception classes share no base but Exception)
ORT_ERRORS = tuple(v for v in vars(ort.capi.onnxruntime_pybind11_state).values()
                   if isinstance(v, type) and issubclass(v, Exception))
_session_threads = 0  # intra-op threads of every session opened without its own count (0: onnxruntime's default)


def use_threads(threads: int) -> None:
    """This process's torch and onnxruntime intra-op threads (a reward worker's `--worker-threads`): onnxruntime
    ignores OMP_NUM_THREADS, so its sessions get the count here."""
    global _session_threads
    _session_threads = threads
    torch.set_num_threads(threads)


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
    threads = threads or _session_threads
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
    batches = ((x.numpy(), y.numpy()) for x, y in iterate_batches(dataset, batch_size, limit=limit))
    correct, seen = correct_count(session, batches)
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


def outputs(session: ort.InferenceSession, x: np.ndarray, step: int | None = None) -> np.ndarray:
    """The first output (the logits) for the images `x`; in slices of `step` images when the graph has a fixed
    batch (step=1) or the batch is large."""
    name = session.get_inputs()[0].name
    step = step or len(x) or 1
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure is raised, and the caller reports it in one line
    return np.concatenate([session.run(None, {name: x[i : i + step]}, quiet)[0] for i in range(0, len(x), step)])


def correct_count(session: ort.InferenceSession, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(top-1 correct, images seen) over (images, labels) batches: the one accuracy loop, shared by `evaluate`,
    the reports and the search's reward."""
    name = session.get_inputs()[0].name
    correct = seen = 0
    for x, y in batches:
        logits = session.run(None, {name: x})[0]
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return correct, seen


class InitializerSwap:
    """One graph whose named initializers are replaced before each session is opened: the search reward's fast
    path (masked weights written in, one session per episode).

    A fresh session per call (about 30 ms on ResNet-20) lets onnxruntime pre-pack the weights as constants and
    apply its layout optimisations. Feeding the weights as graph inputs instead was 2.5× slower per image;
    SessionOptions.add_initializer is ignored by the ORT_ENABLE_ALL optimisations."""

    def __init__(self, graph: onnx.ModelProto, names: Iterable[str], device: str = "cpu"):
        self.graph = graph
        self.device = device
        initializers = {t.name: t for t in graph.graph.initializer}
        missing = [n for n in names if n not in initializers]
        if missing:
            raise KeyError(missing[0])
        self.initializers = {n: initializers[n] for n in names}

    def session(self, values: dict[str, np.ndarray]) -> ort.InferenceSession:
        for name, value in values.items():
            tensor = self.initializers[name]
            tensor.ClearField("float_data")
            tensor.raw_data = np.ascontiguousarray(value, dtype=np.float32).tobytes()
        return open_session(self.graph.SerializeToString(), self.device)


def timing_session(model: bytes, threads: int) -> ort.InferenceSession:
    """A CPU session for timing: a fixed thread count and no spinning, which on a shared machine makes times
    erratic."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure is raised, and reported in one line
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def time_model(model: bytes, input_shape: Sequence[int], threads: int, repeats: int, warmup: int = 2) -> float:
    """Minimum wall time of one run on random input of `input_shape` (batch included), in milliseconds."""
    s = timing_session(model, threads)
    name = s.get_inputs()[0].name
    x = np.random.default_rng(0).random(tuple(input_shape), dtype=np.float32)
    for _ in range(warmup):
        s.run(None, {name: x})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(None, {name: x})
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def measure_speedup(reference: bytes, candidate: bytes, input_shape: Sequence[int], batch: int, threads: int,
                    rounds: int = 15, per_round: int = 3) -> dict:
    """Latency of both models, interleaved run for run (so load on the machine hits both alike): medians and
    the median of the per-round ratios."""
    sessions = [timing_session(reference, threads), timing_session(candidate, threads)]
    names = [s.get_inputs()[0].name for s in sessions]
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    for s, n in zip(sessions, names, strict=True):
        for _ in range(2):
            s.run(None, {n: x})
    times: list[list[float]] = [[], []]
    ratios = []
    for r in range(rounds):
        round_times: list[list[float]] = [[], []]
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            for _ in range(per_round):
                t0 = time.perf_counter()
                sessions[i].run(None, {names[i]: x})
                round_times[i].append((time.perf_counter() - t0) * 1000.0)
        for i in (0, 1):
            times[i].extend(round_times[i])
        ratios.append(float(np.median(round_times[0]) / np.median(round_times[1])))
    return {"batch": batch, "threads": threads, "dense_ms": float(np.median(times[0])),
            "pruned_ms": float(np.median(times[1])), "pruned_min_ms": float(np.min(times[1])),
            "speedup": float(np.median(ratios)),
            "runs": rounds * per_round}

def outputs_agree(got: np.ndarray, expected: np.ndarray) -> tuple[bool, float, bool]:
    """Whether two runs of a classifier agree: finite, max abs difference within VERIFY_ATOL per unit of the
    largest |logit| (at least 1), and the same top-1. Returns (agree, max abs diff, same top-1)."""
    if got.shape != expected.shape:
        return False, float("inf"), False
    finite = bool(np.isfinite(got).all() and np.isfinite(expected).all())
    diff = float(np.abs(got - expected).max()) if expected.size else 0.0
    tolerance = VERIFY_ATOL * max(1.0, float(np.abs(expected).max()) if expected.size and finite else 1.0)
    same_top1 = expected.ndim != 2 or bool((got.argmax(1) == expected.argmax(1)).all())
    return finite and diff <= tolerance and same_top1, diff, same_top1
