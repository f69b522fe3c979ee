"""int8: onnxruntime static quantization of a float ONNX classifier, verified.

The recipe is onnxruntime's own (`onnxruntime.quantization`): its pre-processing (graph optimisation, which
folds BatchNorm into the convolutions, and shape inference), then `quantize_static` in QDQ format with
per-channel symmetric int8 weights and uint8 activations, calibrated (min/max) on images of the *reward*
split. Measured on the shipped ResNet-20 (AVX-512 VNNI CPU, docs/benchmarks_int8.md): uint8 activations run
about 2× faster than float, int8 activations slower than float (onnxruntime's x86 kernels are u8×s8), at
the same reward-split accuracy.

The weights use 7 bits of the int8 range (onnxruntime's `reduce_range`: every value in ±64), so that the file
is right on every CPU. x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 activations by s8 weights with
VPMADDUBSW, which adds two products into a saturating 16-bit sum: 2·255·127 overflows it, 2·255·64 = 32,640
does not. With full 8-bit weights the shipped ResNet-20 lost 0.29 points on an AVX2-only AMD EPYC and its
logits shrank (0.68× on a small LeNet) while a VNNI machine saw nothing wrong; with 7-bit weights the integer
arithmetic is exact on every CPU class, so what is verified here is what runs there. `check_portable` reads
the range back from the written file. VNNI/AMX CPUs run the same kernel on it, at the same speed.

Pruning must survive: a weight that is exactly zero in the float file is exactly zero in the int8 file
(symmetric weights have zero point 0, so 0.0 → 0). This is read back from the written bytes and checked.
The int8 graph is checked with onnx.checker, loaded in onnxruntime, run on real images (finite outputs)
and its test accuracy is compared with the float model's; the comparison only reports (a warning above
`max_loss`), it never steers a choice.
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from torch.utils.data import Dataset

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import atomic_write_bytes, disk_errors
from qlp_compress.data import iterate_batches
from qlp_compress.deploy import engine, export
from qlp_compress.deploy.int8_checks import (  # noqa: F401 (part of this module's interface)
    PORTABLE_WEIGHT_LIMIT,
    QUANTIZED_OPS,
    check_float_model,
    check_portable,
    check_zeros_kept,
    layer_weights,
    quantized_weights,
    weight_inputs,
)

MODES = ("none", "int8")  # values of --quantize
KEEP_FLOAT_CHOICES = ("first", "last")  # prunable layers --keep-float can leave in float
INT8_FILE_SUFFIX = ".int8.onnx"
ACTIVATION_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}  # activations → onnxruntime's QuantType member


@dataclass(frozen=True)
class QuantizeSettings:
    """How a float model becomes int8."""

    calibration_images: int = 1024  # reward-split images the activation ranges are calibrated on (min/max)
    keep_float: tuple[str, ...] = ()  # "first" and/or "last": prunable layers left in float
    max_loss: float = 1.0  # test-accuracy loss, in points, above which a warning is printed (never steers)
    batch_size: int = 64  # images per calibration batch (a fixed batch dimension in the model wins)
    activations: str = "uint8"  # "uint8" (onnxruntime's fast u8×s8 x86 kernels) or "int8" (measured slower)
    weight_bits: int = 7  # 7: right on every CPU (see the module docstring); 8: for the benchmark's comparison only
    speed_batches: tuple[int, ...] = (1, 64)  # batch sizes int8 is timed against float at (interleaved); () = none


def parse_mode(text: str) -> str:
    if text not in MODES:
        raise UsageError(f"--quantize must be one of {', '.join(MODES)}, got {text!r}; e.g. --quantize int8")
    return text


def parse_keep_float(text: str) -> tuple[str, ...]:
    """"first,last" → ("first", "last"); "none" or "" → ()."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in KEEP_FLOAT_CHOICES]
    if bad:
        raise UsageError(f"--keep-float: unknown layer {bad[0]!r}; use first, last, first,last or none")
    return names


def settings_for(mode: str, calibration_images: int = 1024, keep_float: str = "none",
                 max_loss: float = 1.0) -> QuantizeSettings | None:
    """The command line's --quantize options as settings (None for --quantize none), checked."""
    keep = parse_keep_float(keep_float)
    if calibration_images < 1:
        raise UsageError(f"--calibration-images must be at least 1, got {calibration_images}")
    if not max_loss >= 0:
        raise UsageError(f"--int8-max-loss must be a number of points ≥ 0, got {max_loss}")
    if parse_mode(mode) == "none":
        return None
    return QuantizeSettings(calibration_images=calibration_images, keep_float=keep, max_loss=max_loss)


def int8_path(float_path: Path) -> Path:
    """model.onnx → model.int8.onnx (beside it)."""
    return float_path.with_name(float_path.name.removesuffix(".onnx") + INT8_FILE_SUFFIX)


# ------------------------------------------------------------------------------------------- quantization


class CalibrationImages:
    """Feeds `quantize_static` the first `images` images of `dataset` (the reward split), in batches.

    An onnxruntime.quantization.CalibrationDataReader (which counts any class with `get_next` as one; not
    subclassed, so that importing this module does not load onnxruntime.quantization)."""

    def __init__(self, dataset: Dataset, input_name: str, images: int, batch_size: int):
        self.dataset, self.input_name, self.images, self.batch_size = dataset, input_name, images, batch_size
        self.rewind()

    def rewind(self) -> None:
        self._batches: Iterator = iterate_batches(self.dataset, self.batch_size, limit=self.images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch[0].numpy()}


def _named(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (nodes_to_exclude selects nodes by name)."""
    used = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{i}_{k}" for k in range(len(used) + 1)
                             if f"{node.op_type}_{i}_{k}" not in used)
            used.add(node.name)
    return proto


def _preprocess(src: Path, dst: Path) -> str:
    """onnxruntime's quantization pre-processing; when its symbolic shape inference fails, it is retried
    without it, and when the whole step fails the model is quantized as it is. Returns what was done."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return "quant_pre_process"
    except Exception as first:
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            return f"quant_pre_process without symbolic shape inference ({type(first).__name__})"
        except Exception as second:
            dst.write_bytes(src.read_bytes())
            return f"none: pre-processing failed ({type(second).__name__}: {str(second).splitlines()[0][:120]})"


def _batch_size(proto: onnx.ModelProto, wanted: int) -> int:
    """The model's fixed batch dimension if it has one, else `wanted`."""
    initializers = {t.name for t in proto.graph.initializer}
    inp = next(i for i in proto.graph.input if i.name not in initializers)
    dims = inp.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else wanted


def quantize_int8(model_bytes: bytes, calibration: Dataset, settings: QuantizeSettings,
                  name: str = "the model") -> tuple[bytes, dict]:
    """Quantize a float ONNX model statically (QDQ, per-channel symmetric int8 weights, uint8 activations)
    with min/max ranges from `calibration` (the reward split); check it and return (int8 bytes, what was done).

    Checks: onnx.checker (full), loads in onnxruntime, finite outputs on calibration images, and every
    weight that was exactly zero is still exactly zero."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    float_proto = onnx.load_from_string(model_bytes)
    check_float_model(float_proto, name)
    if len(weight_inputs(float_proto)) <= len(settings.keep_float):
        raise UsageError(f"--keep-float {','.join(settings.keep_float)} leaves every weight layer of {name} in "
                         "float, so nothing would be quantized; keep fewer layers in float (e.g. --keep-float "
                         "none)")
    images = min(settings.calibration_images, len(calibration))
    if images < 1:
        raise UsageError("the reward split is empty; int8 calibration needs reward-split images")
    with tempfile.TemporaryDirectory(prefix="qlp-int8-") as tmp, disk_errors(f"int8's temporary files in {tmp}"):
        src, pre, dst = Path(tmp, "float.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model_bytes)
        preprocess = _preprocess(src, pre)
        pre_proto = _named(onnx.load(str(pre)))
        onnx.save(pre_proto, str(pre))
        layers = [node.name for node, _ in weight_inputs(pre_proto)]
        exclude = list(dict.fromkeys(layers[0 if k == "first" else -1] for k in settings.keep_float))
        input_name = next(i.name for i in pre_proto.graph.input
                          if i.name not in {t.name for t in pre_proto.graph.initializer})
        reader = CalibrationImages(calibration, input_name, images, _batch_size(pre_proto, settings.batch_size))
        try:
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=getattr(QuantType, ACTIVATION_TYPES[settings.activations]),
                            weight_type=QuantType.QInt8, reduce_range=settings.weight_bits == 7,
                            nodes_to_exclude=exclude or None, extra_options={"WeightSymmetric": True})
        except Exception as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
            tried = set(settings.keep_float) == set(KEEP_FLOAT_CHOICES)
            raise QLPError(f"onnxruntime could not quantize {name}: {first}; rerun with --debug"
                           + ("" if tried else ", and try --keep-float first,last")) from e
        int8_bytes = dst.read_bytes()
    int8_proto = onnx.load_from_string(int8_bytes)
    try:
        onnx.checker.check_model(int8_proto, full_check=True)
    except Exception as e:
        raise QLPError(f"the int8 model of {name} fails onnx.checker: {' '.join(str(e).split())[:200]}; rerun "
                       "with --debug and report it") from e
    zeros = check_zeros_kept(float_proto, int8_proto)
    portable = check_portable(int8_proto, f"the int8 model of {name}") if settings.weight_bits == 7 else {
        "quantized_layers": len(quantized_weights(int8_proto))}
    session = engine.open_session(int8_bytes)
    x = next(iterate_batches(calibration, _batch_size(int8_proto, settings.batch_size)))[0].numpy()
    if not np.isfinite(engine.outputs(session, x)).all():
        raise QLPError(f"the int8 model of {name} gives NaN or inf outputs; try --keep-float first,last or "
                       "check the float model")
    info = {"format": "QDQ", "weights": _weights_label(settings), **portable,
            "activations": f"{settings.activations} (min/max)",
            "preprocess": preprocess, "calibration_images": images, "calibration_split": "reward",
            "keep_float": list(settings.keep_float), "float_layers": exclude, "zeros": zeros}
    return int8_bytes, info


def _weights_label(settings: QuantizeSettings) -> str:
    if settings.weight_bits == 7:
        return f"int8 in ±{PORTABLE_WEIGHT_LIMIT} (7 bits, right on every CPU), per channel, symmetric"
    return "int8 (full 8 bits: overflows on x86 CPUs without VNNI), per channel, symmetric"


def compare_accuracy(float_accuracy: float, int8_accuracy: float, max_loss: float,
                     keep_float: tuple[str, ...] = ()) -> dict:
    """Test-accuracy loss in points; a warning on stderr when it exceeds `max_loss` (reporting only)."""
    from qlp_compress.base.messages import console

    loss = (float_accuracy - int8_accuracy) * 100
    warn = loss > max_loss
    if warn:
        advice = "more --calibration-images" if set(keep_float) == set(KEEP_FLOAT_CHOICES) else \
            "--keep-float first,last or more --calibration-images"
        console.print(f"[yellow]warning:[/] the int8 model loses {loss:.2f} points of test accuracy (float "
                      f"{float_accuracy:.2%}, int8 {int8_accuracy:.2%}), over --int8-max-loss {max_loss:g}; try "
                      f"{advice}", highlight=False, soft_wrap=True)
    return {"float_accuracy": float_accuracy, "int8_accuracy": int8_accuracy, "loss_points": round(loss, 4),
            "max_loss_points": max_loss, "warning": warn}


def compare_speed(float_bytes: bytes, int8_bytes: bytes, image_shape: tuple[int, ...],
                  batches: tuple[int, ...]) -> dict:
    """int8 against float on this machine, timed interleaved (engine.measure_speedup) at each batch size, with the
    CPU named; one warning line when int8 is slower than float here (int8 gains speed only on some CPUs)."""
    from qlp_compress.base.machine import cpu_capability, describe_cpu
    from qlp_compress.base.messages import console

    cpu = describe_cpu(cpu_capability())
    fixed = _batch_size(onnx.load_from_string(float_bytes), 0)
    rows = []
    for batch in dict.fromkeys(fixed or b for b in batches):
        m = engine.measure_speedup(float_bytes, int8_bytes, image_shape, batch, threads=0, rounds=7, per_round=3)
        rows.append({"batch": batch, "float_ms": m["dense_ms"], "int8_ms": m["pruned_ms"],
                     "int8_speedup": m["speedup"]})
    slower = [r for r in rows if r["int8_speedup"] < 1.0]
    if slower:
        shown = ", ".join(f"{r['int8_speedup']:.2f}× at batch {r['batch']}" for r in slower)
        console.print(f"[yellow]warning:[/] on this CPU ({cpu}) the int8 model runs slower than the float model "
                      f"({shown}, timed interleaved); int8 gains speed on CPUs with VNNI or AMX, so deploy the float "
                      "model on CPUs like this one, or measure on the target CPU", highlight=False, soft_wrap=True)
    return {"cpu": cpu, "batches": rows, "int8_slower": bool(slower)}


def write_int8(float_bytes: bytes, path: Path, calibration: Dataset, test: Dataset, settings: QuantizeSettings,
               float_accuracy: float | None = None, name: str = "the model", metadata: dict | None = None) -> dict:
    """Quantize, compare test accuracy with the float model's (reporting only), add metadata, write `path`
    atomically and check that it holds what was verified. Returns what was done and measured."""
    int8_bytes, info = quantize_int8(float_bytes, calibration, settings, name)
    batch = _batch_size(onnx.load_from_string(float_bytes), 256)
    if float_accuracy is None:
        float_accuracy = engine.session_accuracy(engine.open_session(float_bytes), test, batch)
    int8_accuracy = engine.session_accuracy(engine.open_session(int8_bytes), test, batch)
    info["accuracy"] = compare_accuracy(float_accuracy, int8_accuracy, settings.max_loss, settings.keep_float)
    info["speed"] = compare_speed(float_bytes, int8_bytes, tuple(calibration[0][0].shape), settings.speed_batches)
    int8_bytes = export.with_metadata(int8_bytes, {
        "qlp.quantize": f"int8 QDQ: per-channel symmetric weights {_weights_label(settings)}, "
                        f"{settings.activations} activations (onnxruntime)",
        "qlp.calibration_images": info["calibration_images"], "qlp.calibration_split": "reward",
        "qlp.keep_float": ",".join(settings.keep_float) or "none",
        "qlp.float_test_accuracy": f"{float_accuracy:.4f}", "qlp.int8_test_accuracy": f"{int8_accuracy:.4f}",
        **(metadata or {})})
    atomic_write_bytes(path, int8_bytes)
    if path.read_bytes() != int8_bytes:
        raise QLPError(f"{path} does not hold what was written; check the disk and rerun")
    info.update(path=str(path), bytes=len(int8_bytes), gzip_bytes=len(gzip.compress(int8_bytes, 6)),
                float_bytes=len(float_bytes), float_gzip_bytes=len(gzip.compress(float_bytes, 6)))
    return info
