"""`optimize` benchmark (issue #30): the fastest model within 0.5, 1 and 2 points, against simple ways to the same
speed, and the latency table's depth predictions checked against direct measurement.

Parts (each resumable: every finished cell is a JSON file under benchmarks/cells/optimize/<tag>/, skipped when it
exists, so a later run adds seeds, budgets or a second model):
- latency: the table (width and depth) of the model at --batch; every block dropped alone at full widths, and
  random width-and-depth networks, each timed directly against the dense model (minimum latencies, alternately, as
  the table's calibration is) and compared with the prediction; the bound TABLE_CHECK is stated before the run;
- optimize: `optimize` at the largest budget (its ladder of candidates serves every budget: the answer at a
  smaller one is the fastest candidate within it); the test accuracy of each budget's answer;
- baselines at the speedup of each budget's answer, with the same fine-tuning: l1 width pruning, uniform depth
  (the same share of blocks dropped in each stage), and random search over widths and blocks with QLP's episodes.

    python benchmarks/optimize.py --part latency            # minutes; run it alone on a quiet machine
    python benchmarks/optimize.py --finetune-epochs 5 --seeds 0 1 2
    python benchmarks/optimize.py --summarise

The summary goes to benchmarks/results/optimize.json and docs/benchmarks_optimize.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.workflows import (
    ChannelRewardSettings,
    ChannelSettings,
    DataSettings,
    LatencySettings,
    ModelSettings,
    OptimizeSettings,
    QuantizeSettings,
    SearchSettings,
    TrainSettings,
    best_within_budget,
    export_bytes,
    find_widths,
    measure_against_dense,
    min_ratio,
    open_channels,
    open_session,
    open_workspace,
    prune_channels_and_finetune,
    session_accuracy,
)

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "benchmarks/cells/optimize"
RUNS = ROOT / "out/optimize-benchmark"  # the optimize runs' folders (candidates' models): not committed
TABLE_CHECK = (0.85, 1.15)  # measured ÷ predicted speedup of a network the table did not calibrate on
BASELINES = ("l1", "depth", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--tag", default="resnet20")
    parser.add_argument("--part", choices=("latency", "optimize", "all"), default="all")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=160)
    parser.add_argument("--finetune-epochs", type=float, default=5.0)
    parser.add_argument("--random-networks", type=int, default=12)
    parser.add_argument("--summarise", action="store_true")
    args = parser.parse_args()
    cells = CELLS / args.tag
    cells.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "cpu")
        latency = LatencySettings(batch=args.batch)
        if args.part in ("latency", "all"):
            latency_check(ws, latency, cells / "latency.json", args.random_networks)
        if args.part in ("optimize", "all"):
            for seed in args.seeds:
                run_optimize(ws, args, latency, seed, cells)
    summarise()


def latency_check(ws, latency: LatencySettings, path: Path, random_networks: int) -> None:
    """Predicted against directly measured speedups of networks with blocks dropped (and random widths)."""
    if path.exists():
        return
    ctx = open_channels(ws, latency, structure="channel,depth")
    table, space = ctx.table, ctx.space
    groups, blocks = len(space.sizes), len(space.blocks)
    rng = np.random.default_rng(0)
    networks = []
    for i in range(blocks):  # each block removed alone, full widths: what removing one block costs
        networks.append(("block " + space.blocks[i].name, space.sizes + [int(j != i) for j in range(blocks)]))
    for k in range(random_networks):
        widths = [int(rng.choice(a)) for a in table.allowed[:groups]]
        networks.append((f"random {k}", widths + [int(rng.random() > 0.35) for _ in range(blocks)]))
    rows = []
    load_before = os.getloadavg()[0]
    for name, units in networks:
        measured = min_ratio(ctx.dense_onnx, export_bytes(space.prune(units), ws), ws.input_shape, latency)
        predicted = table.speedup(units)
        rows.append({"network": name, "units": units, "blocks_dropped": units[groups:].count(0),
                     "predicted": predicted, "measured": measured["speedup"],
                     "ratio": measured["speedup"] / predicted})
        print(json.dumps({k: rows[-1][k] for k in ("network", "predicted", "measured")}), flush=True)
    atomic_write_json(path, {"rows": rows, "bound": TABLE_CHECK, "table": table.summary(), "batch": latency.batch,
                             "cpu": describe_cpu(cpu_capability()),
                             "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]})


def run_optimize(ws, args, latency: LatencySettings, seed: int, cells: Path) -> None:
    path = cells / f"optimize_seed{seed}.json"
    if not path.exists():
        finetune = TrainSettings(epochs=args.finetune_epochs, lr=0.01, warmup_epochs=0.0, seed=seed)
        channel = ChannelSettings(latency=latency, finetune=finetune,
                                  search=SearchSettings(target_removed=0.5, episodes=args.episodes, stages=2,
                                                        seed=seed),
                                  reward=ChannelRewardSettings(images=1000))
        settings = OptimizeSettings(max_loss=max(args.budgets), batch=args.batch, channel=channel,
                                    int8=QuantizeSettings())
        started = time.perf_counter()
        folder = RUNS / cells.name / f"run_seed{seed}"
        report = best_within_budget(args.model, ws, settings, folder, "benchmarks/optimize.py",
                                    resume=(folder / ".work").exists(), force=True)
        atomic_write_json(path, {**report, "seconds": round(time.perf_counter() - started, 1)})
    report = json.loads(path.read_text())
    for budget in args.budgets:
        answer_path = cells / f"answer_{budget:g}_seed{seed}.json"
        if answer_path.exists():
            continue
        within = [r for r in report["candidates"] if r["loss"] <= budget]
        answer = max(within, key=lambda r: r["speedup"][str(args.batch)])
        folder = RUNS / cells.name / f"run_seed{seed}"
        model = (folder / answer["file"]).read_bytes() if answer["file"] else None
        accuracy = session_accuracy(open_session(model), ws.splits.test) if model else report["test_accuracy"]["dense"]
        cell = {"budget": budget, "seed": seed, "answer": answer, "test_accuracy": accuracy,
                "dense_test_accuracy": report["test_accuracy"]["dense"],
                "baselines": baselines(ws, args, latency, seed, answer) if answer["file"] else {}}
        atomic_write_json(answer_path, cell)


def baselines(ws, args, latency: LatencySettings, seed: int, answer: dict) -> dict:
    """The simple methods at the answer's measured float speedup, with the same fine-tuning (float forms)."""
    target = answer["speedup"][str(args.batch)]
    if answer["form"] == "int8":  # the float candidate the int8 form came from sets the width/depth target
        target = answer["target"]
    ctx = open_channels(ws, latency, structure="channel,depth")
    finetune = TrainSettings(epochs=args.finetune_epochs, lr=0.01, warmup_epochs=0.0, seed=seed)
    out = {}
    for method in BASELINES:
        settings = ChannelSettings(structure="channel,depth", method=method, speedup=max(1.01, target),
                                   latency=latency, finetune=finetune,
                                   search=SearchSettings(target_removed=0.5, episodes=args.episodes, stages=2,
                                                        seed=seed),
                                   reward=ChannelRewardSettings(images=1000))
        try:
            found = find_widths(ws, ctx, settings)
        except QLPError as e:
            out[method] = {"error": str(e)}
            continue
        _, tuned = prune_channels_and_finetune(ws, ctx, found["widths"], found["criterion"], finetune, True)
        result = measure_against_dense(ws, ctx, export_bytes(tuned, ws), tuned, settings)
        out[method] = {"test_accuracy": result["accuracy"], "target_speedup": target,
                       "measured_speedup": {b: v["speedup"] for b, v in result["speedup"].items()},
                       "blocks_dropped": ctx.space.dropped(found["widths"])}
    return out


def summarise() -> None:
    lines = ["# `optimize`: benchmarks", "",
             "Generated by `python benchmarks/optimize.py` from the cells in benchmarks/cells/optimize/.", ""]
    results = {}
    for folder in sorted(p for p in CELLS.glob("*") if p.is_dir()):
        tag = folder.name
        latency = folder / "latency.json"
        if latency.exists():
            doc = json.loads(latency.read_text())
            ratios = [r["ratio"] for r in doc["rows"]]
            inside = sum(doc["bound"][0] <= r <= doc["bound"][1] for r in ratios)
            results[f"{tag}/latency"] = doc
            lines += [f"## {tag}: the latency table with depth, checked against direct measurement", "",
                      f"Batch {doc['batch']}, CPU {doc['cpu']}, load average {doc['load'][0]} before and "
                      f"{doc['load'][1]} after (a load above 2 means other work shared the 2 cores: the ratios are "
                      "then only an indication).", "",
                      f"Bound, stated before the run: measured ÷ predicted in [{doc['bound'][0]}, {doc['bound'][1]}]. "
                      f"Result: {inside} of {len(ratios)} inside; median ratio {statistics.median(ratios):.3f}, "
                      f"range {min(ratios):.3f}–{max(ratios):.3f}.", "",
                      "| network | blocks dropped | predicted | measured | measured ÷ predicted |",
                      "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['network']} | {r['blocks_dropped']} | {r['predicted']:.3f}× | {r['measured']:.3f}× | "
                      f"{r['ratio']:.3f} |" for r in doc["rows"]]
            lines.append("")
        answers = sorted(folder.glob("answer_*_seed*.json"))
        if answers:
            lines += [f"## {tag}: the answer at each budget", "",
                      "| budget (points) | seed | answer | form | speedup (batch 64) | test accuracy (dense) | "
                      + " | ".join(f"{b} test accuracy (speedup)" for b in BASELINES) + " |",
                      "|---:|---:|---|---|---:|---|" + "---|" * len(BASELINES)]
            for path in answers:
                c = json.loads(path.read_text())
                results[f"{tag}/{path.stem}"] = c
                a = c["answer"]
                cells = []
                for b in BASELINES:
                    r = c["baselines"].get(b, {})
                    cells.append(f"{r['test_accuracy']:.2%} ({r['measured_speedup'].get('64', float('nan')):.2f}×)"
                                 if "test_accuracy" in r else r.get("error", "–")[:60])
                lines.append(f"| {c['budget']:g} | {c['seed']} | {a['name']} | {a['form']} | "
                             f"{a['speedup'].get('64', float('nan')):.2f}× | {c['test_accuracy']:.2%} "
                             f"({c['dense_test_accuracy']:.2%}) | " + " | ".join(cells) + " |")
            lines.append("")
    notes = CELLS / "notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    atomic_write_json(ROOT / "benchmarks/results/optimize.json", results)
    atomic_write_text(ROOT / "docs/benchmarks_optimize.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
