"""The commands' workflows, as library functions the CLI calls (and tests call directly)."""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from qlp_compress import data as datasets
from qlp_compress import export, runtime
from qlp_compress.errors import QLPError, UsageError
from qlp_compress.finetune import TrainSettings, train
from qlp_compress.io import atomic_write_bytes
from qlp_compress.report import training_progress
from qlp_compress.zoo import build_model, stats_for


@dataclass(frozen=True)
class DataSettings:
    """Which data and how it is split."""

    data: str = "fashion-mnist"  # a name ("fashion-mnist", "cifar10"), a .npz file or an image folder
    data_dir: Path | None = None  # where to look first for a named data set
    reward_size: int = 5000  # images of the training split held out for the search reward
    split_seed: int = 0  # fixes which images form the reward split


def check_can_write(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it or choose another --out")


def train_model(arch: str, data_settings: DataSettings, settings: TrainSettings, out: Path, command: str,
                resume: bool = False, force: bool = False, checkpoint: Path | None = None) -> dict:
    """Train a zoo model on the fine-tune split, export it to ONNX with metadata, measure test accuracy."""
    check_can_write(out, force or resume)
    data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
    splits = datasets.make_splits(data, data_settings.reward_size, data_settings.split_seed)
    mean, std = stats_for(data.name, data.input_shape[0])
    import torch

    torch.manual_seed(settings.seed)
    model = build_model(arch, data.input_shape[0], data.num_classes, mean, std)
    checkpoint = checkpoint or out.with_suffix(".ckpt")
    started = time.perf_counter()
    with training_progress(f"train {arch}") as on_step:
        history = train(model, splits.finetune, settings, checkpoint=checkpoint, resume=resume, on_step=on_step)
    train_seconds = time.perf_counter() - started
    model_bytes = export.to_onnx_bytes(model, data.input_shape)
    session = runtime.open_session(model_bytes)
    result = {
        "arch": arch, "data": data.name, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "reward_accuracy": runtime.session_accuracy(session, splits.reward),
        "test_accuracy": runtime.session_accuracy(session, splits.test),
        "epochs": settings.epochs, "train_seconds": round(train_seconds, 1), "history": history,
    }
    metadata = {"qlp.dataset": data.name, "qlp.input_shape": "x".join(map(str, data.input_shape)),
                "qlp.num_classes": data.num_classes, "qlp.arch": arch,
                "qlp.test_accuracy": f"{result['test_accuracy']:.4f}", "qlp.command": command,
                "qlp.train_seconds": result["train_seconds"]}
    model_bytes = export.with_metadata(model_bytes, metadata)
    onnx.checker.check_model(onnx.load_from_string(model_bytes), full_check=True)
    atomic_write_bytes(out, model_bytes)
    return result


def load_onnx_file(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise QLPError(f"{path} is not a readable ONNX file ({type(e).__name__}); re-export the model") from e
    if not proto.graph.node:
        raise QLPError(f"{path} has an empty ONNX graph; re-export the model")
    return proto


def evaluate_model(model_path: Path, data_settings: DataSettings | None, device: str = "auto",
                   latency_batches: tuple[int, ...] = (1, 64), repeats: int = 30) -> dict:
    """Accuracy on the test split, latency, file size and sparsity of an ONNX file, through onnxruntime."""
    device = runtime.resolve_device(device)
    proto = load_onnx_file(model_path)
    session = runtime.open_session(model_path, device)
    per_layer, global_sparsity = export.onnx_sparsity(proto)
    raw = model_path.read_bytes()
    input_shape = tuple(d if isinstance(d, int) else -1 for d in session.get_inputs()[0].shape[1:])
    result: dict = {"model": str(model_path), "data": None, "accuracy": None, "test_images": 0}
    if data_settings is not None:
        data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
        runtime.check_input_fits(session, data.input_shape, data.num_classes)
        input_shape = data.input_shape
        result.update(data=data.name, accuracy=runtime.session_accuracy(session, data.test),
                      test_images=len(data.test))
    if any(d < 0 for d in input_shape):
        raise UsageError(f"{model_path} has a symbolic image size; pass --data so latency can use real images")
    result.update(
        latency=[vars(runtime.measure_latency(session, input_shape, b, repeats=repeats)) for b in latency_batches],
        file_bytes=len(raw), gzip_bytes=len(gzip.compress(raw, 6)),
        weights=sum(n for n, _ in per_layer.values()), global_sparsity=global_sparsity,
        layers={name: {"weights": n, "sparsity": z / n} for name, (n, z) in per_layer.items()},
        metadata=export.read_metadata(proto),
    )
    return result
