"""What the user sees: Rich progress and tables, JSON and Markdown reports, plots."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


@contextlib.contextmanager
def training_progress(title: str) -> Iterator[Callable[[dict], None]]:
    """A progress bar for `finetune.train`'s on_step records: epoch, loss, accuracy, ETA."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(title, total=None, epoch="-", loss=0.0, acc=0.0)

        def on_step(r: dict) -> None:
            progress.update(task, completed=r["step"], total=r["steps"], epoch=f"{r['epoch']}/{r['epochs']}",
                            loss=r["loss"], acc=r["accuracy"])

        yield on_step


def evaluation_table(result: dict) -> Table:
    """The `evaluate` result as a table: accuracy, latency, size, sparsity per layer."""
    table = Table(title=f"{result['model']}", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    if result.get("accuracy") is not None:
        table.add_row(f"top-1 accuracy ({result['data']}, test, {result['test_images']} images)",
                      f"{result['accuracy']:.2%}")
    for lat in result["latency"]:
        table.add_row(f"latency batch {lat['batch']} ({lat['provider']})",
                      f"median {lat['median_ms']:.2f} ms · p90 {lat['p90_ms']:.2f} ms")
    table.add_row("file size", f"{result['file_bytes'] / 1e6:.3f} MB (gzip {result['gzip_bytes'] / 1e6:.3f} MB)")
    table.add_row("global sparsity (weights)", f"{result['global_sparsity']:.2%} of {result['weights']:,}")
    return table


def sparsity_table(per_layer: dict[str, dict]) -> Table:
    table = Table(title="per-layer sparsity", show_header=True)
    table.add_column("layer")
    table.add_column("weights", justify="right")
    table.add_column("sparsity", justify="right")
    for name, row in per_layer.items():
        table.add_row(name, f"{row['weights']:,}", f"{row['sparsity']:.2%}")
    return table
