"""The `qlp-compress` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from qlp_compress import __version__
from qlp_compress.errors import QLPError
from qlp_compress.finetune import TrainSettings
from qlp_compress.pipeline import DataSettings, evaluate_model, train_model
from qlp_compress.report import console, evaluation_table, sparsity_table
from qlp_compress.runtime import resolve_device
from qlp_compress.zoo import ARCHS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress an image classifier: QLP per-layer sparsity search, magnitude pruning, "
                       "fine-tuning, sparse ONNX export, onnxruntime report.")

DataOpt = Annotated[str, typer.Option("--data", help="fashion-mnist, cifar10, a .npz file, or an image folder.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Folder to look in first for the data set.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Compress an image classifier with QLP (deep Q-learning for pruning)."""
    if version:
        print(__version__)
        raise typer.Exit()


@app.command("train")
def train_cmd(
    arch: Annotated[str, typer.Argument(help=f"Architecture: {', '.join(ARCHS)}.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    epochs: Annotated[float, typer.Option(help="Training epochs (fractions allowed).")] = 15.0,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, Nesterov momentum 0.9).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine or onecycle.")] = "cosine",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train a zoo model on the fine-tune split and export it to ONNX with its test accuracy."""
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             schedule=schedule, seed=seed, device=resolve_device(device))
    command = "qlp-compress " + shlex.join(sys.argv[1:])
    result = train_model(arch, DataSettings(data, data_dir), settings, out, command, resume=resume, force=force)
    console.print(f"[green]wrote {out}[/]: test accuracy {result['test_accuracy']:.2%} "
                  f"(onnxruntime, {result['data']}), trained in {result['train_seconds'] / 60:.1f} min")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model file.", exists=True, dir_okay=False)],
    data: Annotated[str | None, typer.Option("--data", help="Data set for accuracy (omit for size/latency only).")]
    = "fashion-mnist",
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    repeats: Annotated[int, typer.Option(help="Timed runs per latency measurement.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Top-1 accuracy, latency (batch 1 and 64), file size and sparsity, measured with onnxruntime."""
    result = evaluate_model(model, DataSettings(data, data_dir) if data else None, device, repeats=repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(evaluation_table(result))
    console.print(sparsity_table(result["layers"]))


def main() -> None:
    """Entry point: a failure prints one line (no traceback unless --debug) and exits 1, or 2 for usage.

    Typer's standalone mode handles usage errors (exit 2) and --help; our own errors pass through it."""
    debug = "--debug" in sys.argv
    try:
        app()
    except QLPError as e:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:  # an unexpected failure: still one line, unless --debug
        if debug:
            raise
        console.print(f"[red]error:[/] unexpected {type(e).__name__}: {e} (rerun with --debug for details)",
                      highlight=False)
        sys.exit(1)
