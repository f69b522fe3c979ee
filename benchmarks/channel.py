"""Channel-mode benchmark: QLP against uniform width, global filter-norm ranking (l1), BatchNorm-scale ranking
(network slimming) and random search, at speedup targets 1.5×, 2×, 3× (onnxruntime, batch 64, 2 threads),
on the shipped ResNet-20 / Fashion-MNIST, with the same fine-tuning budget for every method.

Resumable: every finished cell (method × target × seed) is a JSON file under benchmarks/cells/channel/,
skipped when it exists, so later runs can add seeds (--seeds 0 1 2) or a second model (--model, --tag).
The summary goes to benchmarks/results/channel.json and docs/benchmarks_channel.md. The test split is
read only for the reported accuracies.

    python benchmarks/channel.py                       # seed 0, the shipped ResNet-20
    python benchmarks/channel.py --seeds 0 1 2 --finetune-epochs 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.deploy.engine import open_session, session_accuracy
from qlp_compress.pruning.latency import LatencySettings
from qlp_compress.reward.channels import ChannelRewardSettings
from qlp_compress.search.curriculum import SearchSettings
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows import (
    ChannelSettings,
    DataSettings,
    ModelSettings,
    export_bytes,
    find_widths,
    measure,
    open_channels,
    open_workspace,
    prune_finetune,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("qlp", "uniform", "l1", "bn-slimming", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--tag", default="resnet20")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--reward-images", type=int, default=500)
    parser.add_argument("--finetune-epochs", type=float, default=0.1)
    parser.add_argument("--distill-check", action="store_true", help="also fine-tune qlp cells with --distill")
    args = parser.parse_args()

    cells = ROOT / "benchmarks/cells/channel" / args.tag
    cells.mkdir(parents=True, exist_ok=True)
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    latency = LatencySettings()
    ctx = open_channels(ws, latency)
    atomic_write_json(cells / "table.json", {"summary": ctx.table.summary(),
                                             "groups": [g.name for g in ctx.space.groups], "sizes": ctx.space.sizes,
                                             "left_whole": ctx.space.unsafe, "seconds": round(ctx.seconds, 1)})
    dense_accuracy = session_accuracy(open_session(ctx.dense_onnx), ws.splits.test)
    for seed in args.seeds:
        for speedup in args.speedups:
            for method in args.methods:
                for distill in ([False, True] if args.distill_check and method == "qlp" else [False]):
                    name = f"{method}{'-distill' if distill else ''}_{speedup:g}x_seed{seed}.json"
                    if (cells / name).exists():
                        continue
                    finetune = TrainSettings(epochs=args.finetune_epochs, lr=0.01, warmup_epochs=0.0, seed=seed)
                    settings = ChannelSettings(
                        method=method, speedup=speedup, latency=latency, finetune=finetune, distill=distill,
                        search=SearchSettings(target=0.5, episodes=args.episodes, stages=3, seed=seed),
                        reward=ChannelRewardSettings(images=args.reward_images))
                    started = time.perf_counter()
                    try:
                        found = find_widths(ws, ctx, settings)
                    except QLPError as e:
                        atomic_write_json(cells / name, {"method": method, "target_speedup": speedup, "seed": seed,
                                                         "error": str(e)})
                        continue
                    pruned, tuned = prune_finetune(ws, ctx, found["widths"], found["criterion"], finetune, distill)
                    result = measure(ws, ctx, export_bytes(tuned, ws), tuned, settings)
                    cell = {"method": method, "distill": distill, "target_speedup": speedup, "seed": seed,
                            "widths": found["widths"], "predicted_speedup": found["predicted_speedup"],
                            "dense_accuracy": dense_accuracy,
                            "pruned_accuracy": session_accuracy(open_session(export_bytes(pruned, ws)),
                                                                ws.splits.test),
                            "finetuned_accuracy": result["accuracy"], "macs": result["macs"],
                            "params": result["params"],
                            "measured_speedup": {b: v["speedup"] for b, v in result["speedup"].items()},
                            "speed": result["speedup"], "search_seconds": found["search_seconds"],
                            "best_reward": found.get("best_reward"), "chosen_demonstration": found.get("demonstration"),
                            "finetune_epochs": args.finetune_epochs,
                            "cell_seconds": round(time.perf_counter() - started, 1)}
                    atomic_write_json(cells / name, cell)
                    print(json.dumps({k: cell[k] for k in ("method", "target_speedup", "seed", "finetuned_accuracy",
                                                           "measured_speedup")}), flush=True)
    summarise(cells, args.tag, dense_accuracy)


def summarise(cells: Path, tag: str, dense_accuracy: float) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(cells.glob("*_seed*.json"))]
    table = json.loads((cells / "table.json").read_text())
    ok = [r for r in rows if "error" not in r]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    atomic_write_json(ROOT / "benchmarks/results/channel.json", {"model": tag, "cpu": cpu, "commit": commit.strip(),
                                                                  "dense_accuracy": dense_accuracy, "table": table,
                                                                  "cells": rows})
    lines = [f"# Channel mode benchmark ({tag}, Fashion-MNIST)", "",
             f"Generated by `benchmarks/channel.py` (commit {commit.strip()}), CPU: {cpu}, onnxruntime CPU, "
             f"{table['summary']['threads']} threads, target speedups at batch {table['summary']['batch']}, widths "
             f"multiples of {table['summary']['round_to']}. Dense test accuracy {dense_accuracy:.2%}. "
             f"Fine-tuning budget: {ok[0]['finetune_epochs'] if ok else '?'} epoch for every method. Speedups are "
             "medians of interleaved runs against the dense model, measured in one process on a shared machine.", "",
             "| method | target | seeds | predicted | measured b1 | measured b64 | MACs (M) | params | acc. pruned | "
             "acc. fine-tuned | search s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["target_speedup"], r["method"], r.get("distill", False)) for r in ok})
    for speedup, method, distill in keys:
        group = [r for r in ok if (r["target_speedup"], r["method"], r.get("distill", False)) ==
                 (speedup, method, distill)]

        def mean(f, group=group):
            return statistics.mean(f(r) for r in group)

        lines.append(f"| {method}{' +distill' if distill else ''} | {speedup:g}× | {len(group)} | "
                     f"{mean(lambda r: r['predicted_speedup']):.2f}× | "
                     f"{mean(lambda r: r['measured_speedup']['1']):.2f}× | "
                     f"{mean(lambda r: r['measured_speedup']['64']):.2f}× | {mean(lambda r: r['macs']) / 1e6:.2f} | "
                     f"{mean(lambda r: r['params']):,.0f} | {mean(lambda r: r['pruned_accuracy']):.2%} | "
                     f"{mean(lambda r: r['finetuned_accuracy']):.2%} | {mean(lambda r: r['search_seconds']):.0f} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Cells that could not run:", *[f"- {r['method']} at {r['target_speedup']:g}×: {r['error']}"
                                                     for r in errors]]
    s = table["summary"]
    lines += ["", "## Latency table", "",
              f"- {s['entries']} layer timings, measured in {s['measure_seconds']} s; dense {s['dense_ms']:.2f} ms, "
              f"after the shortcut rewrite {s['rewritten_dense_ms']:.2f} ms "
              f"(rewrite speedup {s['rewrite_speedup']:.3f}×, interleaved)",
              "- calibration (uniform widths timed directly): "
              + "; ".join(f"{c['widths']} → {c['speedup']:.2f}×" for c in s.get("calibration") or []),
              "- prediction vs measurement at batch 64 per cell (ratio measured ÷ predicted): "
              + ", ".join(f"{r['method']}@{r['target_speedup']:g}: "
                          f"{r['measured_speedup']['64'] / r['predicted_speedup']:.2f}" for r in ok), ""]
    atomic_write_text(ROOT / "docs/benchmarks_channel.md", "\n".join(lines))


if __name__ == "__main__":
    main()
