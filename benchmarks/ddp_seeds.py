"""BatchNorm under DDP (issue 29): does fine-tuning on 2 gloo ranks, where each rank normalises with the statistics
of its own half of every batch (gloo has no SyncBatchNorm), end within the single process's seed spread?

The shipped ResNet-20, pruned by LAMP to 0.9 sparsity (as benchmarks/ddp.py), is fine-tuned for a short fixed budget
with BatchNorm training (fixed learning rate 0.01, global batch 128, no held-out checks) with 3 seeds on 1 process
and the same 3 seeds on 2 ranks (`--nproc 2`). The seed sets the data order and the augmentation; the start is the
same pruned model. Each result is measured on the reward split's 5,000 images, which fine-tuning never trains on (no
search runs here, so none of them steered anything), and, for reporting only, on the test split.

Writes benchmarks/results/ddp-seeds-CPUCLASS.json and the section "## BatchNorm under DDP: seed spread" of
docs/benchmarks_scale.md (other sections are kept). `python benchmarks/ddp_seeds.py [--epochs 0.1] [--seeds 3]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from ddp import RESULTS, ROOT, cpu_class, load, write_section

from qlp_compress.base import machine
from qlp_compress.base.io import atomic_write_json
from qlp_compress.workflows import (
    DataSettings,
    ModelSettings,
    TrainSettings,
    accuracy,
    find_policy,
    fit,
    iterate_batches,
    open_workspace,
    policy_masks,
    prune_weights_and_finetune,
)

HEADING = "## BatchNorm under DDP: seed spread"


def fine_tune(ws, pruned, masks, nproc: int, epochs: float, seed: int) -> dict:
    model = copy.deepcopy(pruned)
    settings = TrainSettings(epochs=epochs, lr=0.01, warmup_epochs=0.0, seed=seed, device="cpu", nproc=nproc)
    before, started = load(), time.perf_counter()
    fit(model, ws.splits.finetune, settings, masks=masks)
    model.eval()
    return {"processes": nproc, "seed": seed, "wall_seconds": round(time.perf_counter() - started, 1),
            "held_out_accuracy": accuracy(model, iterate_batches(ws.splits.reward, 1000)),
            "test_accuracy": accuracy(model, iterate_batches(ws.splits.test, 1000)),
            "load_before": before, "load_after": load()}


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run(args) -> dict:
    torch.set_num_threads(1)  # the single process as one rank of --nproc 2 (each takes cores / 2 = 1 thread here)
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist", args.data_dir), "cpu")
    policy = find_policy(ws, "lamp", args.sparsity)
    pruned, _ = prune_weights_and_finetune(ws, policy, None)
    masks = policy_masks(ws, policy)
    runs = [fine_tune(ws, pruned, masks, n, args.epochs, seed) for seed in range(args.seeds) for n in (1, 2)]
    stats = {n: {key: summary([r for r in runs if r["processes"] == n], key)
                 for key in ("held_out_accuracy", "test_accuracy")} for n in (1, 2)}
    one, two = stats[1]["held_out_accuracy"], stats[2]["held_out_accuracy"]
    inside = [one["min"] <= r["held_out_accuracy"] <= one["max"] for r in runs if r["processes"] == 2]
    return {"cpu": machine.describe_cpu(machine.cpu_capability()), "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "model": str(args.model.relative_to(ROOT)), "sparsity": args.sparsity,
            "epochs": args.epochs, "batch": 128, "seeds": args.seeds, "finetune_images": len(ws.splits.finetune),
            "held_out_images": len(ws.splits.reward), "test_images": len(ws.splits.test), "runs": runs,
            "stats": {str(n): s for n, s in stats.items()}, "two_rank_runs_inside_spread": sum(inside),
            "two_rank_mean_inside_spread": one["min"] <= two["mean"] <= one["max"],
            "command": "nice -n 19 python benchmarks/ddp_seeds.py " + " ".join(sys.argv[1:])}


def markdown(r: dict) -> str:
    def cell(n: int, key: str) -> str:
        s = r["stats"][str(n)][key]
        return f"{s['mean']:.2%} ({s['min']:.2%} – {s['max']:.2%})"

    rows = [f"| {x['processes']} | {x['seed']} | {x['held_out_accuracy']:.2%} | {x['test_accuracy']:.2%} | "
            f"{x['wall_seconds']:.0f} | {x['load_before']} → {x['load_after']} |" for x in r["runs"]]
    one = r["stats"]["1"]["held_out_accuracy"]
    spread = (one["max"] - one["min"]) * r["held_out_images"]
    two_runs = r["seeds"]
    test_one, test_two = r["stats"]["1"]["test_accuracy"], r["stats"]["2"]["test_accuracy"]
    test_inside = sum(test_one["min"] <= x["test_accuracy"] <= test_one["max"]
                      for x in r["runs"] if x["processes"] == 2)
    loads = [float(x[k].split()[0]) for x in r["runs"] for k in ("load_before", "load_after")]
    pairs = {x["seed"]: {} for x in r["runs"]}
    for x in r["runs"]:
        pairs[x["seed"]][x["processes"]] = x
    paired = ", ".join(f"{(p[2]['held_out_accuracy'] - p[1]['held_out_accuracy']) * 100:+.2f} / "
                       f"{(p[2]['test_accuracy'] - p[1]['test_accuracy']) * 100:+.2f}" for p in pairs.values())
    return "\n".join([
        HEADING, "",
        f"{r['epochs']:g} epoch of fine-tuning `{r['model']}` pruned by LAMP to {r['sparsity']:g} sparsity with "
        f"BatchNorm training (fixed learning rate 0.01, global batch {r['batch']}, {r['finetune_images']} fine-tune "
        f"images, no held-out checks), seeds 0–{r['seeds'] - 1} on 1 process and on 2 gloo ranks (each rank "
        f"normalises with the statistics of its own {r['batch'] // 2} images). Accuracy on the reward split's "
        f"{r['held_out_images']} images (fine-tuning never trains on them; no search ran) and, for reporting only, on "
        f"the {r['test_images']} test images. {r['cpu']} ({r['cores']} cores), torch {r['torch']}, run at nice 19 on "
        "a machine shared with two other engineers' jobs (the load average is in the table): the times are not "
        f"quiet-machine figures, the accuracies do not depend on the load. Command: `{r['command']}`; figures in "
        f"`benchmarks/results/{r['results_file']}`.", "",
        "| processes | seed | held-out accuracy | test accuracy | wall s | load average before → after |",
        "|---:|---:|---:|---:|---:|---|", *rows, "",
        "| processes | held-out accuracy: mean (min – max) | test accuracy: mean (min – max) |", "|---:|---:|---:|",
        *[f"| {n} | {cell(n, 'held_out_accuracy')} | {cell(n, 'test_accuracy')} |" for n in (1, 2)], "",
        f"The single process's seed spread on the held-out images is {one['min']:.2%} – {one['max']:.2%} "
        f"({spread:.0f} images of {r['held_out_images']}). {r['two_rank_runs_inside_spread']} of the {two_runs} "
        "2-rank runs lie inside it, and their mean "
        f"{'lies inside' if r['two_rank_mean_inside_spread'] else 'lies outside'} it. On the test images (reporting "
        f"only) the single process spans {test_one['min']:.2%} – {test_one['max']:.2%}; {test_inside} of the "
        f"{two_runs} 2-rank runs lie inside it and their mean is {(test_two['mean'] - test_one['mean']) * 100:+.2f} "
        "points from the single process's. Per seed (the same data order), 2 ranks minus 1 process, held-out / test, "
        f"in points: {paired}. {r['seeds']} seeds make a narrow range: it is the spread measured, not a confidence "
        "interval, and a run just outside it is not by itself evidence of a difference. The load average (1 minute) "
        f"was {min(loads):.1f} – {max(loads):.1f} during the runs, on 2 cores shared with two other engineers' "
        "jobs.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/ddp-seeds-CPUCLASS.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/benchmarks_scale.md")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the page's section from --out")
    args = parser.parse_args()
    out = args.out or RESULTS / f"ddp-seeds-{cpu_class(machine.cpu_capability())}.json"
    if args.markdown_only:
        result = json.loads(out.read_text())
    else:
        result = {**run(args), "results_file": out.name}
        atomic_write_json(out, result)
    write_section(args.markdown, markdown(result), HEADING)
    print(markdown(result))


if __name__ == "__main__":
    main()
