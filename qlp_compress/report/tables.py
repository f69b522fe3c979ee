"""Rich tables of results, for the terminal."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text


def evaluation_table(result: dict) -> Table:
    """The `evaluate` result as a table: accuracy, latency, size, sparsity per layer."""
    table = Table(title=Text(str(result["model"])), show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    if result.get("accuracy") is not None:
        table.add_row(Text(f"top-1 accuracy ({result['data']}, test, {result['test_images']} images)"),
                      f"{result['accuracy']:.2%}")
    for lat in result["latency"]:
        table.add_row(f"latency batch {lat['batch']} ({lat['provider']})",
                      f"median {lat['median_ms']:.2f} ms · p90 {lat['p90_ms']:.2f} ms")
    if result.get("cpu"):
        table.add_row("CPU (latency depends on it)", Text(result["cpu"]))
    table.add_row("file size", f"{result['file_bytes'] / 1e6:.3f} MB (gzip {result['gzip_bytes'] / 1e6:.3f} MB)")
    table.add_row("global sparsity (weights)", f"{result['global_sparsity']:.2%} of {result['weights']:,}")
    meta = result.get("metadata") or {}
    if meta.get("qlp.structure") == "channel":  # a channel-pruned export records its widths and speedups
        table.add_row("channel pruning", f"{meta.get('qlp.method')} · target {meta.get('qlp.target_speedup')}× at "
                                         f"batch {meta.get('qlp.latency_batch')} ({meta.get('qlp.threads')} threads)")
        table.add_row("speedup predicted / measured", f"{float(meta.get('qlp.predicted_speedup', 'nan')):.2f}× / "
                                                      f"{meta.get('qlp.measured_speedup', '?').replace(',', ' · ')}")
        table.add_row("MACs (pruned / dense)", f"{int(meta.get('qlp.macs', 0)) / 1e6:.2f} M / "
                                               f"{int(meta.get('qlp.dense_macs', 0)) / 1e6:.2f} M")
        table.add_row("parameters (pruned / dense)", f"{int(meta.get('qlp.params', 0)):,} / "
                                                     f"{int(meta.get('qlp.dense_params', 0)):,}")
        table.add_row("widths", meta.get("qlp.widths", ""))
    return table


def sparsity_table(per_layer: dict[str, dict]) -> Table:
    table = Table(title="per-layer sparsity", show_header=True)
    table.add_column("layer")
    table.add_column("weights", justify="right")
    table.add_column("sparsity", justify="right")
    for name, row in per_layer.items():
        table.add_row(Text(name), f"{row['weights']:,}", f"{row['sparsity']:.2%}")
    return table


def report_table(report: dict) -> Table:
    m = report["measured"]
    table = Table(title=Text(f"{report['model']} → {report['method']} at sparsity {report['target_sparsity']:g} "
                             f"({report['data']}, test split, onnxruntime)"))
    for column in ("model", "top-1", "batch 1 median / p90", "batch 64 median / p90", "file", "gzip"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for key, label in (("dense", "dense"), ("pruned", "pruned (no fine-tune)"), ("finetuned", "fine-tuned"),
                       ("int8", "fine-tuned, int8")):
        if key not in m:
            continue
        row = m[key]
        lat = {r["batch"]: r for r in row["latency"]}
        table.add_row(label, f"{row['accuracy']:.2%}", f"{lat[1]['median_ms']:.2f} / {lat[1]['p90_ms']:.2f} ms",
                      f"{lat[64]['median_ms']:.2f} / {lat[64]['p90_ms']:.2f} ms", megabytes(row["bytes"]),
                      megabytes(row["gzip_bytes"]))
    if "sparse_storage" in m:
        table.add_row("fine-tuned, sparse storage", "same", "same", "same", megabytes(m["sparse_storage"]["bytes"]),
                      megabytes(m["sparse_storage"]["gzip_bytes"]))
    return table


def compare_table(rows: list[dict]) -> Table:
    table = Table(title="test accuracy (onnxruntime) by method and sparsity")
    for column in ("sparsity", "method", "pruned", "fine-tuned", "search s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['target']:g}", r["method"], f"{r['pruned_accuracy']:.2%}",
                      "-" if r["finetuned_accuracy"] is None else f"{r['finetuned_accuracy']:.2%}",
                      f"{r['search_seconds']:.0f}")
    return table

def megabytes(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def compare_channel_table(rows: list[dict]) -> Table:
    table = Table(title="channel mode: test accuracy (onnxruntime) and measured speedup by method and target")
    for column in ("target", "method", "predicted", "measured", "pruned", "fine-tuned", "MACs"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['target_speedup']:g}×", r["method"], f"{r['predicted_speedup']:.2f}×",
                      ", ".join(f"b{b} {v:.2f}×" for b, v in r["measured_speedup"].items()),
                      f"{r['pruned_accuracy']:.2%}",
                      "-" if r["finetuned_accuracy"] is None else f"{r['finetuned_accuracy']:.2%}",
                      f"{r['macs'] / 1e6:.2f} M")
    return table
