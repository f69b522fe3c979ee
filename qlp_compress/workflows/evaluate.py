"""The `evaluate` workflow: accuracy, latency, size and sparsity of an ONNX file, through onnxruntime."""

from __future__ import annotations

import gzip
from pathlib import Path

from qlp_compress import data as datasets
from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.deploy import engine, export
from qlp_compress.report.progress import phase
from qlp_compress.workflows.workspace import DataSettings, load_onnx_file


def evaluate_model(model_path: Path, data_settings: DataSettings | None, device: str = "auto",
                   latency_batches: tuple[int, ...] = (1, 64), repeats: int = 30) -> dict:
    """Accuracy on the test split, latency, file size and sparsity of an ONNX file, through onnxruntime."""
    device = engine.resolve_device(device)
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}; e.g. --repeats 30")
    proto = load_onnx_file(model_path)
    session = engine.open_session(model_path, device)  # onnxruntime reads external data relative to the file
    per_layer, global_sparsity = export.onnx_sparsity(proto)
    names = export.weight_layer_names(proto)  # the readable names reports and policy.json use
    raw = model_path.read_bytes()
    input_shape = tuple(d if isinstance(d, int) else -1 for d in session.get_inputs()[0].shape[1:])
    result: dict = {"model": str(model_path), "data": None, "accuracy": None, "test_images": 0}
    if data_settings is not None:
        data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
        engine.check_input_fits(session, data.input_shape, data.num_classes)
        input_shape = data.input_shape
    if any(d < 0 for d in input_shape):
        raise UsageError(f"{model_path} has a symbolic image size; pass --data so latency can use real images")
    try:
        with phase(f"measure {model_path.name} (onnxruntime: " + ("test accuracy, " if data_settings else "")
                   + "latency)"):
            if data_settings is not None:
                result.update(data=data.name, accuracy=engine.session_accuracy(session, data.test),
                              test_images=len(data.test))
            latency = [vars(engine.measure_latency(session, input_shape, b, repeats=repeats))
                       for b in latency_batches]
    except engine.ORT_ERRORS as e:
        raise QLPError(f"onnxruntime cannot run {model_path} on images of shape {list(input_shape)} "
                       f"({engine.ort_message(e)}); check that the file is an image classifier taking (N, C, H, W), "
                       "or re-export it") from e
    result.update(
        latency=latency, cpu=describe_cpu(cpu_capability()),
        file_bytes=len(raw), gzip_bytes=len(gzip.compress(raw, 6)),
        weights=sum(n for n, _ in per_layer.values()), global_sparsity=global_sparsity,
        layers={names[name]: {"weights": n, "sparsity": z / n} for name, (n, z) in per_layer.items()},
        metadata=export.read_metadata(proto),
    )
    return result
