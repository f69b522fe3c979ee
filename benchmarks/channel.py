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
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.workflows import (
    ChannelRewardSettings,
    ChannelSettings,
    DataSettings,
    LatencySettings,
    ModelSettings,
    SearchSettings,
    TrainSettings,
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
METHODS = ("qlp", "uniform", "l1", "bn-slimming", "random")
VARIANTS = {"qlp-1stage": ("qlp", 1)}  # extra --methods: (method, curriculum stages), e.g. QLP without curriculum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--tag", default="resnet20")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *VARIANTS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--reward-images", type=int, default=500)
    parser.add_argument("--finetune-epochs", type=float, default=0.1)
    parser.add_argument("--latency-batch", type=int, default=LatencySettings.batch,
                        help="batch size at which the speedup target holds (use a --tag of its own)")
    parser.add_argument("--distill-check", action="store_true", help="also fine-tune qlp cells with --distill")
    parser.add_argument("--summarise", action="store_true", help="only rewrite the JSON and the page from the cells")
    args = parser.parse_args()
    if args.summarise:
        summarise()
        return

    cells = ROOT / "benchmarks/cells/channel" / args.tag
    cells.mkdir(parents=True, exist_ok=True)
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    latency = LatencySettings(batch=args.latency_batch)
    ctx = open_channels(ws, latency)
    dense_accuracy = session_accuracy(open_session(ctx.dense_onnx), ws.splits.test)
    atomic_write_json(cells / "table.json", {"summary": ctx.table.summary(), "model": str(args.model),
                                             "dense_accuracy": dense_accuracy,
                                             "groups": [g.name for g in ctx.space.groups], "sizes": ctx.space.sizes,
                                             "left_whole": ctx.space.unsafe, "seconds": round(ctx.seconds, 1)})
    for seed in args.seeds:
        for speedup in args.speedups:
            for method in args.methods:
                variants = [False, True] if args.distill_check and method == "qlp" else [False]
                names = {d: f"{method}{'-distill' if d else ''}_{speedup:g}x_seed{seed}.json" for d in variants}
                if all((cells / n).exists() for n in names.values()):
                    continue
                finetune = TrainSettings(epochs=args.finetune_epochs, lr=0.01, warmup_epochs=0.0, seed=seed)
                base, stages = VARIANTS.get(method, (method, 3))
                settings = ChannelSettings(
                    method=base, speedup=speedup, latency=latency, finetune=finetune,
                    search=SearchSettings(target_removed=0.5, episodes=args.episodes, stages=stages, seed=seed),
                    reward=ChannelRewardSettings(images=args.reward_images))
                started = time.perf_counter()
                try:  # one search serves both fine-tuning variants (same seed, same widths)
                    found = find_widths(ws, ctx, settings)
                except QLPError as e:
                    for n in names.values():
                        atomic_write_json(cells / n, {"method": method, "target_speedup": speedup, "seed": seed,
                                                      "finetune_epochs": args.finetune_epochs, "error": str(e)})
                    continue
                search_done = time.perf_counter()
                for distill, name in names.items():
                    if (cells / name).exists():
                        continue
                    t0 = time.perf_counter()
                    pruned, tuned = prune_channels_and_finetune(ws, ctx, found["widths"], found["criterion"], finetune,
                                                                distill)
                    result = measure_against_dense(ws, ctx, export_bytes(tuned, ws), tuned,
                                                   replace(settings, distill=distill))
                    check = min_ratio(ctx.dense_onnx, export_bytes(tuned, ws), ws.input_shape, latency)
                    cell = {"method": method, "distill": distill, "target_speedup": speedup, "seed": seed,
                            "cpu": describe_cpu(cpu_capability()),
                            "widths": found["widths"], "predicted_speedup": found["predicted_speedup"],
                            "dense_accuracy": dense_accuracy,
                            "pruned_accuracy": session_accuracy(open_session(export_bytes(pruned, ws)),
                                                                ws.splits.test),
                            "finetuned_accuracy": result["accuracy"], "macs": result["macs"],
                            "params": result["params"],
                            "measured_speedup": {b: v["speedup"] for b, v in result["speedup"].items()},
                            "speed": result["speedup"], "min_latency_speedup": check,
                            "search_seconds": found["search_seconds"],
                            "best_reward": found.get("best_reward"), "chosen_demonstration": found.get("demonstration"),
                            "finetune_epochs": args.finetune_epochs,
                            "cell_seconds": round(search_done - started + time.perf_counter() - t0, 1)}
                    atomic_write_json(cells / name, cell)
                    print(json.dumps({k: cell[k] for k in ("method", "distill", "target_speedup", "seed",
                                                           "finetuned_accuracy", "measured_speedup",
                                                           "predicted_speedup", "cell_seconds")}), flush=True)
    summarise()


TABLE_CHECK = (0.8, 1.25)  # loose bound on measured ÷ predicted speedup at the table's batch (stated before the run)
BASELINE_METHODS = ("uniform", "l1", "bn-slimming", "random")
NOTES = ROOT / "benchmarks/cells/channel/notes.md"  # hand-written analysis appended to the generated page


def _load(folder: Path) -> dict:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*_seed*.json"))]
    table = json.loads((folder / "table.json").read_text())
    return {"dense_accuracy": table.get("dense_accuracy"), "table": table, "cells": rows}


def _name(r: dict) -> str:
    return r["method"] + (" +distill" if r.get("distill") else "")


def _check(r: dict, batch: int) -> float:
    """Measured ÷ predicted speedup at the batch the table (and the target) holds at."""
    return r["measured_speedup"][str(batch)] / r["predicted_speedup"]


def summarise() -> None:
    """benchmarks/results/channel.json and docs/benchmarks_channel.md from every model's cells."""
    folders = sorted(p for p in (ROOT / "benchmarks/cells/channel").iterdir() if (p / "table.json").exists())
    models = {f.name: _load(f) for f in folders}
    # the commit that last changed the cells, and the CPUs they were measured on (cells before the field: the CPU
    # the previous summary named), so that summarising again rewrites the same page
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", "benchmarks/cells/channel"],
                            capture_output=True, text=True, cwd=ROOT).stdout.strip()
    results = ROOT / "benchmarks/results/channel.json"
    earlier = json.loads(results.read_text()).get("cpu") if results.exists() else None
    cpu = " and ".join(sorted({r.get("cpu") or earlier or "unrecorded" for m in models.values() for r in m["cells"]}))
    budgets = sorted({r.get("finetune_epochs") for m in models.values() for r in m["cells"]} - {None})
    atomic_write_json(ROOT / "benchmarks/results/channel.json", {
        "cpu": cpu, "commit": commit, "finetune_epochs": budgets, "table_check_bound": list(TABLE_CHECK),
        "models": models})
    lines = ["# Channel mode benchmark (Fashion-MNIST)", "",
             f"Generated by `benchmarks/channel.py` (commit {commit}) from the cells under "
             "`benchmarks/cells/channel/`. CPU: " + cpu + " (2 cores, shared with other work while this ran), "
             "onnxruntime CPU execution provider, 2 intra-op threads. Speedup targets hold at batch 64 unless a "
             "section says otherwise; widths are "
             "multiples of 8. Fine-tuning budget: **" + ", ".join(f"{b:g}" for b in budgets) + " epoch** of the "
             "fine-tune split (SGD, lr 0.01, cosine, no warm-up) for every method, after BatchNorm re-estimation; "
             "the QLP search scores widths on 500 reward-split images. Measured speedups are medians of per-round "
             "ratios, dense and pruned ONNX run interleaved in one process (15 rounds × 3 runs); across seeds the "
             "table gives the median of the seeds' medians. Accuracies are top-1 on the 10,000 test images "
             "(onnxruntime), the only use of the test split.", ""]
    for tag, m in models.items():
        lines += _model_section(tag, m)
    if NOTES.exists():
        lines += ["", NOTES.read_text().rstrip(), ""]
    atomic_write_text(ROOT / "docs/benchmarks_channel.md", "\n".join(lines) + "\n")


def _model_section(tag: str, m: dict) -> list[str]:
    rows, table, dense = m["cells"], m["table"], m["dense_accuracy"]
    s = table["summary"]
    ok = [r for r in rows if "error" not in r]
    lines = [f"## {tag} (`models/{Path(table.get('model', '')).name}`)", "",
             f"Speedup targets hold at batch **{s['batch']}**. "
             f"Dense test accuracy **{dense:.2%}**; {len(table['sizes'])} channel groups (sizes "
             f"{', '.join(map(str, table['sizes']))}); left whole: {table['left_whole'] or 'none'}.", "",
             "### Mean over seeds", "",
             "| method | target | seeds | predicted | measured b1 | measured b64 | MACs (M) | params | acc. pruned | "
             "acc. fine-tuned | Δ dense (pt) | search s |", "|---" + "|---:" * 11 + "|"]
    keys = sorted({(r["target_speedup"], r["method"], bool(r.get("distill"))) for r in ok})
    means: dict[tuple, dict] = {}
    for key in keys:
        group = [r for r in ok if (r["target_speedup"], r["method"], bool(r.get("distill"))) == key]
        acc = statistics.mean(r["finetuned_accuracy"] for r in group)
        sd = statistics.stdev(r["finetuned_accuracy"] for r in group) if len(group) > 1 else 0.0
        b1 = statistics.median(r["measured_speedup"]["1"] for r in group)
        b64 = statistics.median(r["measured_speedup"]["64"] for r in group)
        means[key] = {"acc": acc, "b64": b64, "n": len(group)}
        lines.append(f"| {_name(group[0])} | {key[0]:g}× | {len(group)} | "
                     f"{statistics.mean(r['predicted_speedup'] for r in group):.2f}× | {b1:.2f}× | {b64:.2f}× | "
                     f"{statistics.mean(r['macs'] for r in group) / 1e6:.2f} | "
                     f"{statistics.mean(r['params'] for r in group):,.0f} | "
                     f"{statistics.mean(r['pruned_accuracy'] for r in group):.2%} | {acc:.2%} ± {sd:.2%} | "
                     f"{(acc - dense) * 100:+.2f} | {statistics.mean(r['search_seconds'] for r in group):.0f} |")
    refused: dict[tuple, list[dict]] = {}  # one line per (target, reason): which methods and seeds
    for r in rows:
        if "error" in r:
            refused.setdefault((r["target_speedup"], r["error"]), []).append(r)
    if refused:
        lines += ["", "Cells that could not run:", *[
            f"- {', '.join(sorted({_name(r) for r in group}))} at {target:g}× (seeds "
            f"{', '.join(map(str, sorted({r['seed'] for r in group})))}): {error}"
            for (target, error), group in sorted(refused.items())]]
    lines += ["", "### Per seed", "",
              "| method | target | seed | predicted | b1 | b64 | b64 min-latency | MACs (M) | params | acc. pruned | "
              "acc. fine-tuned | search s | cell s |", "|---" + "|---:" * 12 + "|"]
    for r in sorted(ok, key=lambda r: (r["target_speedup"], r["method"], bool(r.get("distill")), r["seed"])):
        mins = r.get("min_latency_speedup", {}).get("speedup")
        lines.append(f"| {_name(r)} | {r['target_speedup']:g}× | {r['seed']} | {r['predicted_speedup']:.2f}× | "
                     f"{r['measured_speedup']['1']:.2f}× | {r['measured_speedup']['64']:.2f}× | "
                     f"{f'{mins:.2f}×' if mins else '–'} | {r['macs'] / 1e6:.2f} | {r['params']:,} | "
                     f"{r['pruned_accuracy']:.2%} | {r['finetuned_accuracy']:.2%} | {r['search_seconds']:.0f} | "
                     f"{r.get('cell_seconds', 0):.0f} |")
    ratios = [(_check(r, s["batch"]), r) for r in ok]
    inside = [x for x, _ in ratios if TABLE_CHECK[0] <= x <= TABLE_CHECK[1]]
    min_ratios = [r["min_latency_speedup"]["speedup"] / r["predicted_speedup"] for r in ok
                  if r.get("min_latency_speedup")]
    lines += ["", "### Latency table: prediction against direct measurement", "",
              f"- {s['entries']} layer timings at batch {s['batch']}, {s['threads']} threads, measured in "
              f"{s['measure_seconds']} s; dense {s['dense_ms']:.2f} ms, after the shortcut rewrite "
              f"{s['rewritten_dense_ms']:.2f} ms (rewrite speedup {s['rewrite_speedup']:.3f}×, interleaved medians)",
              "- calibration, uniform widths timed directly (minimum latencies, alternating with the dense model): "
              + "; ".join(f"{c['widths']} → {c['speedup']:.2f}×" for c in s.get("calibration") or []),
              f"- knots (table ratio → measured latency ÷ dense): {s.get('calibration_knots')}; the narrowest widths "
              f"are predicted at {1 / s['calibration_knots'][0][1]:.2f}×" if s.get("calibration_knots") else None,
              f"- check (bound {TABLE_CHECK[0]}–{TABLE_CHECK[1]} on measured b{s['batch']} median ÷ predicted, every "
              f"fine-tuned network): **{len(inside)} of {len(ratios)} inside**; ratios: median "
              f"{statistics.median(x for x, _ in ratios):.2f}, range {min(x for x, _ in ratios):.2f}–"
              f"{max(x for x, _ in ratios):.2f}" if ratios else "- check: no cells yet",
              (f"- the same with the minimum-latency ratio (the table's own footing): median "
               f"{statistics.median(min_ratios):.2f}, range {min(min_ratios):.2f}–{max(min_ratios):.2f}, "
               f"{sum(TABLE_CHECK[0] <= x <= TABLE_CHECK[1] for x in min_ratios)} of {len(min_ratios)} inside")
              if min_ratios else None,
              "- outside the bound: " + (", ".join(f"{_name(r)}@{r['target_speedup']:g} s{r['seed']}: {x:.2f}"
                                                   for x, r in ratios if not TABLE_CHECK[0] <= x <= TABLE_CHECK[1])
                                         or "none")]
    lines += ["", *_distill(ok), "", *_goal(means, dense)]
    return [line for line in lines if line is not None] + [""]


def _distill(ok: list[dict]) -> list[str]:
    pairs = {}
    for r in ok:
        if r["method"] == "qlp":
            pairs.setdefault((r["target_speedup"], r["seed"]), {})[bool(r.get("distill"))] = r["finetuned_accuracy"]
    both = {k: v for k, v in sorted(pairs.items()) if len(v) == 2}
    if not both:
        return []
    gains = [(v[True] - v[False]) * 100 for v in both.values()]
    return ["### Distillation (QLP widths, same fine-tuning budget, with and without KL to the dense logits)", "",
            "| target | seed | without | with | gain (pt) |", "|---:|---:|---:|---:|---:|",
            *[f"| {t:g}× | {seed} | {v[False]:.2%} | {v[True]:.2%} | {(v[True] - v[False]) * 100:+.2f} |"
              for (t, seed), v in both.items()],
            "", f"Mean gain {statistics.mean(gains):+.2f} pt over {len(gains)} pairs "
                f"({sum(g > 0 for g in gains)} of {len(gains)} positive)."]


def _goal(means: dict, dense: float) -> list[str]:
    out = ["### Goal (generated from the means above)", ""]
    if not means:
        return [*out, "- no finished cells"]
    reached = [(k, v) for k, v in means.items() if v["b64"] >= 2.0 and (dense - v["acc"]) * 100 <= 0.5]
    out.append("- ≥ 2× measured at batch 64 with ≤ 0.5 pt lost after fine-tuning: "
               + ("reached by " + ", ".join(f"{k[1]}{' +distill' if k[2] else ''} at {k[0]:g}×" for k, _ in reached)
                  if reached else "**not reached** by any method"))
    for target in sorted({k[0] for k in means}):
        qlp = means.get((target, "qlp", False))
        base = {k[1]: v for k, v in means.items() if k[0] == target and k[1] in BASELINE_METHODS and not k[2]}
        if qlp is None or not base:
            out.append(f"- {target:g}×: not enough cells to compare")
            continue
        best = max(base, key=lambda k: base[k]["acc"])
        margin = (qlp["acc"] - base[best]["acc"]) * 100
        need = 1.0 if target >= 3 else 0.0
        verdict = "meets" if margin >= need else "misses"
        out.append(f"- {target:g}×: QLP {qlp['acc']:.2%} vs best baseline {best} {base[best]['acc']:.2%} "
                   f"({margin:+.2f} pt; goal {'+1 pt' if need else 'match'}): **{verdict}** the goal")
    return out


if __name__ == "__main__":
    main()
