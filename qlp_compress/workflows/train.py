"""The `train` workflow: a zoo model trained on the fine-tune split, exported to ONNX with its test accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from torch import nn

from qlp_compress import data as datasets
from qlp_compress.base.io import atomic_write_bytes
from qlp_compress.base.locks import file_lock
from qlp_compress.base.ownership import file_checkpoint
from qlp_compress.deploy import engine, export
from qlp_compress.train import ranks
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.train.zoo import build_model, stats_for

if TYPE_CHECKING:  # the importer pulls in onnx2torch and torchvision: loaded only when a model is read
    pass


from qlp_compress.workflows.workspace import DataSettings, check_can_write, train_interruptible


def train_model(arch: str, data_settings: DataSettings, settings: TrainSettings, out: Path, command: str,
                resume: bool = False, force: bool = False, checkpoint: Path | None = None) -> dict:
    """Train a zoo model on the fine-tune split, export it to ONNX with metadata, measure test accuracy. In a
    torchrun job the ranks other than 0 only train: rank 0 checks, writes and measures."""
    checkpoint = checkpoint or file_checkpoint(out)  # hidden, never OUT itself (OUT may end in .ckpt)
    if ranks.is_main():
        check_can_write(out, force, checkpoint, resume)
    data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
    splits = datasets.make_splits(data, data_settings.reward_size, data_settings.split_seed)
    mean, std = stats_for(data.name, data.input_shape[0])
    import torch

    torch.manual_seed(settings.seed)
    model = build_model(arch, data.input_shape[0], data.num_classes, mean, std)
    if not ranks.is_main():
        train_interruptible(model, splits.finetune, settings, f"train {arch}", checkpoint, resume,
                            _record(arch, data), "--epochs")
        return {"rank": ranks.rank()}  # the CLI prints nothing for it
    lock = file_lock(out)
    lock.acquire()
    try:
        return _train_and_export(arch, data, splits, model, settings, out, command, checkpoint, resume)
    finally:
        lock.release()


def _record(arch: str, data: datasets.ImageData) -> dict:
    return {"architecture": arch, "--data": data.name}


def _train_and_export(arch: str, data: datasets.ImageData, splits: datasets.Splits, model: nn.Module,
                      settings: TrainSettings, out: Path, command: str, checkpoint: Path, resume: bool) -> dict:
    history = train_interruptible(model, splits.finetune, settings, f"train {arch}", checkpoint, resume,
                                  _record(arch, data), "--epochs")
    train_seconds = sum(h.get("seconds", 0.0) for h in history)  # a resumed run counts every epoch
    model_bytes = export.to_onnx_bytes(model, data.input_shape)
    session = engine.open_session(model_bytes)
    result = {
        "arch": arch, "data": data.name, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "reward_accuracy": engine.session_accuracy(session, splits.reward),
        "test_accuracy": engine.session_accuracy(session, splits.test),
        "epochs": settings.epochs, "train_seconds": round(train_seconds, 1), "history": history,
    }
    metadata = {"qlp.dataset": data.name, "qlp.input_shape": "x".join(map(str, data.input_shape)),
                "qlp.num_classes": data.num_classes, "qlp.arch": arch,
                "qlp.test_accuracy": f"{result['test_accuracy']:.4f}", "qlp.command": command,
                "qlp.train_seconds": result["train_seconds"]}
    model_bytes = export.with_metadata(model_bytes, metadata)
    onnx.checker.check_model(onnx.load_from_string(model_bytes), full_check=True)
    atomic_write_bytes(out, model_bytes)
    checkpoint.unlink(missing_ok=True)
    return result
