"""The `qlp-compress` commands that write one file (finetune, export, quantize, train), registered on the app of
qlp_compress.cli.commands: each parses its options, calls one workflow and prints the result. No logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from qlp_compress.cli import options as o
from qlp_compress.cli.commands import _run, app
from qlp_compress.cli.output import emit, int8_line, set_quiet
from qlp_compress.workflows import commands as run_command
from qlp_compress.workflows.commands import TrainOptions


@app.command("finetune")
def finetune_cmd(
    model: o.ModelArg,
    out: o.OutFile,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    finetune_epochs: o.FinetuneEpochs = o.RUN.finetune_epochs,
    lr: o.Lr = o.RUN.lr,
    nproc: o.Nproc = 1,
    quantize: o.Quantize = "none",
    calibration_images: o.CalibrationImages = o.RUN.calibration_images,
    keep_float: o.KeepFloat = "none",
    int8_max_loss: o.Int8MaxLoss = 1.0,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    arch: o.Arch = None,
    trust_pickle: o.Trust = False,
    resume: o.Resume = False,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Fine-tune an already pruned model with its zeros held (the masks are its zero weights); export verified ONNX.

    Example: qlp-compress finetune pruned.onnx --out tuned.onnx --finetune-epochs 2"""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device=device, seed=seed, arch=arch,
               trust_pickle=trust_pickle, finetune_epochs=finetune_epochs, lr=lr,
               quantize=quantize, calibration_images=calibration_images, keep_float=keep_float,
               int8_max_loss=int8_max_loss, resume=resume, force=force, nproc=nproc)
    result = run_command.finetune(run)
    emit(result, as_json, lambda: [Text(f"wrote {out}: test accuracy {result['accuracy']:.2%} at sparsity "
                                        f"{result['global_sparsity']:.4f}"),
                                   *([int8_line(result["int8"])] if result.get("int8") else [])])


@app.command("export")
def export_cmd(
    model: o.ModelArg,
    out: o.OutFile,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    sparse_storage: o.SparseStorage = True,
    quantize: o.Quantize = "none",
    calibration_images: o.CalibrationImages = o.RUN.calibration_images,
    keep_float: o.KeepFloat = "none",
    int8_max_loss: o.Int8MaxLoss = 1.0,
    device: o.Device = "auto",
    arch: o.Arch = None,
    trust_pickle: o.Trust = False,
    mean: o.Mean = None,
    std: o.Std = None,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Export a PyTorch or ONNX model to a verified ONNX file (exact zeros kept, dynamic batch).

    Example: qlp-compress export model.pt --arch resnet20 --out model.onnx"""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device=device, arch=arch, trust_pickle=trust_pickle,
               mean=mean, std=std, sparse_storage=sparse_storage,
               quantize=quantize, calibration_images=calibration_images, keep_float=keep_float,
               int8_max_loss=int8_max_loss, force=force)
    result = run_command.export(run)
    emit(result, as_json, lambda: [Text(f"wrote {out} ({result['bytes'] / 1e6:.3f} MB, verified: max abs diff "
                                        f"{result['max_abs_diff']:.1e})"),
                                   *([int8_line(result["int8"])] if result.get("int8") else [])])


@app.command("quantize")
def quantize_cmd(
    model: o.OnnxArg,
    out: o.OutFile,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    reward_size: o.RewardSize = None,
    calibration_images: o.CalibrationImages = o.RUN.calibration_images,
    keep_float: o.KeepFloat = "none",
    int8_max_loss: o.Int8MaxLoss = 1.0,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """int8 static quantization (onnxruntime QDQ, per-channel weights) of any float ONNX classifier.

    Example: qlp-compress quantize runs/q90/model.onnx --out model.int8.onnx

    Calibrated on the reward split; checked (zeros kept, onnx.checker, onnxruntime) and compared with the float
    model on test."""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device="cpu", reward_size=reward_size,
               calibration_images=calibration_images, keep_float=keep_float, int8_max_loss=int8_max_loss, force=force)
    result = run_command.quantize_model(run)
    emit(result, as_json, lambda: [int8_line(result)])


@app.command("train")
def train_cmd(
    arch: Annotated[str, typer.Argument(help=f"Zoo architecture: {', '.join(run_command.ARCHS)}.",
                                        show_default=False)],
    out: o.OutFile,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Training epochs (fractions allowed).")] = 15.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (SGD, Nesterov momentum 0.9).")] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")] = 5e-4,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine or onecycle.")] = "cosine",
    seed: o.Seed = 0,
    nproc: o.Nproc = 1,
    device: o.Device = "auto",
    resume: o.Resume = False,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Train a zoo model on the fine-tune split and export it to ONNX with its test accuracy (baselines to compress).

    Example: qlp-compress train resnet20 --out models/resnet20.onnx --epochs 20"""
    set_quiet(quiet)
    run = _run(model=Path(arch), out=out, data=data, data_dir=data_dir, device=device, seed=seed, resume=resume,
               force=force, nproc=nproc)
    result = run_command.train_zoo_model(run, TrainOptions(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                                                           weight_decay=weight_decay, schedule=schedule))
    emit(result, as_json, lambda: [Text(f"wrote {out}: test accuracy {result['test_accuracy']:.2%} (onnxruntime, "
                                        f"{result['data']}), trained in {result['train_seconds'] / 60:.1f} min")])
