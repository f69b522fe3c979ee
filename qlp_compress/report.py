"""What the user sees: Rich progress and tables, JSON and Markdown reports, plots."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from qlp_compress.io import atomic_path, atomic_write_json, atomic_write_text

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
    table = Table(title=Text(str(result["model"])), show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    if result.get("accuracy") is not None:
        table.add_row(Text(f"top-1 accuracy ({result['data']}, test, {result['test_images']} images)"),
                      f"{result['accuracy']:.2%}")
    for lat in result["latency"]:
        table.add_row(f"latency batch {lat['batch']} ({lat['provider']})",
                      f"median {lat['median_ms']:.2f} ms · p90 {lat['p90_ms']:.2f} ms")
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


@contextlib.contextmanager
def search_progress(title: str, episodes: int) -> Iterator[Callable[[dict], None]]:
    """A live line for `run_search`'s on_episode records: stage, episode, ε, last and best reward, ETA."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("stage {task.fields[stage]}  ε {task.fields[eps]:.2f}  "
                          "last {task.fields[last]:.3f}  best {task.fields[best]:.3f}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=episodes, stage="-", eps=1.0, last=0.0, best=0.0)

        def on_episode(r: dict) -> None:
            progress.update(task, completed=r["episode"], stage=f"{r['stage']}/{r['stages']} @ {r['target']:.3f}",
                            eps=r["epsilon"], last=r["reward"], best=max(r["best"], -1.0))

        yield on_episode


def write_report(out: Path, report: dict, policy) -> None:
    """report.json, report.md and the plots (sparsity.png, reward.png) in `out`."""
    atomic_write_json(out / "report.json", report)
    plots = [plot_layer_sparsity(out / "sparsity.png", {policy.method: policy.sparsities}, policy.layers)]
    if policy.search.get("rewards"):
        plots.append(plot_reward_curve(out / "reward.png", policy.search["rewards"],
                                       policy.search.get("stage_of_episode")))
    atomic_write_text(out / "report.md", report_markdown(report, [p.name for p in plots]))
    console.print(report_table(report))


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
                      f"{lat[64]['median_ms']:.2f} / {lat[64]['p90_ms']:.2f} ms", _mb(row["bytes"]),
                      _mb(row["gzip_bytes"]))
    if "sparse_storage" in m:
        table.add_row("fine-tuned, sparse storage", "same", "same", "same", _mb(m["sparse_storage"]["bytes"]),
                      _mb(m["sparse_storage"]["gzip_bytes"]))
    return table


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def report_markdown(report: dict, plots: list[str]) -> str:
    m = report["measured"]
    provider = m["dense"]["latency"][0]["provider"]
    lines = [f"# qlp-compress report: {Path(report['model']).name}", "",
             f"- method **{report['method']}**, target sparsity {report['target_sparsity']:g}, achieved "
             f"{report['achieved_sparsity']:.4f} (read back from model.onnx: {report['file_global_sparsity']:.4f})",
             f"- data {report['data']}; accuracy on the test split ({report['test_images']} images) through "
             f"onnxruntime ({provider})", *_cpu_line(report), f"- command: `{report['command']}`", "",
             "| model | top-1 | batch 1 median / p90 (ms) | batch 64 median / p90 (ms) | file (MB) | gzip (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("dense", "dense"), ("pruned", "pruned, not fine-tuned"), ("finetuned", "fine-tuned"),
                       ("int8", "fine-tuned, int8 (model.int8.onnx)")):
        if key not in m:
            continue
        row = m[key]
        lat = {r["batch"]: r for r in row["latency"]}
        lines.append(f"| {label} | {row['accuracy']:.2%} | {lat[1]['median_ms']:.2f} / {lat[1]['p90_ms']:.2f} | "
                     f"{lat[64]['median_ms']:.2f} / {lat[64]['p90_ms']:.2f} | {row['bytes'] / 1e6:.3f} | "
                     f"{row['gzip_bytes'] / 1e6:.3f} |")
    if "sparse_storage" in m:
        lines.append(f"| fine-tuned, sparse storage | same | same | same | {m['sparse_storage']['bytes'] / 1e6:.3f} | "
                     f"{m['sparse_storage']['gzip_bytes'] / 1e6:.3f} |")
    v = report["verification"]
    lines += ["", f"Verification: onnxruntime vs PyTorch max abs diff {v['max_abs_diff']:.2e}, same top-1: "
              f"{v['same_top1']}; {v['layers_matched']} layers' zero patterns found in the file.", ""]
    lines += _int8_lines(report.get("int8"))
    if report["search"]:
        s = report["search"]
        lines += [f"Search: {s['episodes']} episodes, {s['wall_seconds']:.0f} s, {s['seconds_per_episode']:.2f} s "
                  f"per episode, {s['share_outside_reward']:.1%} of the time outside the reward "
                  f"({s['reward_engine']} engine, {s['reward_images']} reward images).", ""]
        lines += ["| stage | target | best reward | episode | found by |", "|---:|---:|---:|---:|---|"]
        lines += [f"| {i + 1} | {st['target']:.4f} | {st['reward']:.4f} | {st['episode']} | "
                  f"{st['demonstration'] + ' demonstration' if st.get('demonstration') else 'the agent'} |"
                  for i, st in enumerate(report["stages"])]
        lines.append("")
    lines += ["| layer | weights | sparsity |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['weights']:,} | {r['sparsity']:.2%} |" for r in report["layers"]]
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _cpu_line(report: dict) -> list[str]:
    from qlp_compress.quantize import describe_cpu

    return [f"- CPU: {describe_cpu(report['cpu'])} (int8 speed depends on VNNI/AMX)"] if report.get("cpu") else []


def _int8_lines(int8: dict | None) -> list[str]:
    """What the int8 row is: how it was quantized and what was checked."""
    if not int8:
        return []
    a, z = int8["accuracy"], int8["zeros"]
    kept = ", ".join(int8["float_layers"]) or "none"
    return [f"int8 (onnxruntime static quantization, {int8['format']}: {int8['weights']} weights, "
            f"{int8['activations']} activations; pre-processing: {int8['preprocess']}): calibrated on "
            f"{int8['calibration_images']} {int8['calibration_split']}-split images; layers kept in float: {kept}. "
            f"Test accuracy {a['int8_accuracy']:.2%} against {a['float_accuracy']:.2%} in float "
            f"({a['loss_points']:+.2f} points lost"
            + (f", **over the {a['max_loss_points']:g}-point limit**" if a["warning"] else "") + "). "
            f"All {z['float_zeros']:,} zero weights of model.onnx are exactly zero in model.int8.onnx "
            f"({z['rounded_to_zero']:,} more weights rounded to zero).", ""]


def plot_layer_sparsity(path: Path, sparsities: dict[str, list[float]], layers: list[str]) -> Path:
    """Grouped bars: per-layer sparsity of one or more methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers)), 3.5))
    width = 0.8 / len(sparsities)
    for i, (method, values) in enumerate(sparsities.items()):
        ax.bar([x + i * width for x in range(len(layers))], values, width, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))])
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def plot_reward_curve(path: Path, rewards: list[float], stages: list[int] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rewards) + 1), rewards, ".", markersize=3, label="episode reward")
    best, running = [], -float("inf")
    for i, r in enumerate(rewards):
        if stages and i and stages[i] != stages[i - 1]:
            running = -float("inf")  # a new curriculum stage starts its own best
        running = max(running, r)
        best.append(running)
    ax.plot(range(1, len(rewards) + 1), best, "-", label="best in stage")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward (reward-split accuracy)")
    ax.set_ylim(bottom=max(-0.2, min(rewards)))
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def compare_table(rows: list[dict]) -> Table:
    table = Table(title="test accuracy (onnxruntime) by method and sparsity")
    for column in ("sparsity", "method", "pruned", "fine-tuned", "search s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['target']:g}", r["method"], f"{r['pruned_accuracy']:.2%}",
                      "-" if r["finetuned_accuracy"] is None else f"{r['finetuned_accuracy']:.2%}",
                      f"{r['search_seconds']:.0f}")
    return table


def compare_markdown(rows: list[dict], command: str) -> str:
    lines = ["# qlp-compress compare", "", f"`{command}`", "",
             f"Dense test accuracy: {rows[0]['dense_accuracy']:.2%}." if rows else "", "",
             "| sparsity | method | pruned | fine-tuned | search s |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        tuned = "-" if r["finetuned_accuracy"] is None else f"{r['finetuned_accuracy']:.2%}"
        lines.append(f"| {r['target']:g} | {r['method']} | {r['pruned_accuracy']:.2%} | {tuned} | "
                     f"{r['search_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
