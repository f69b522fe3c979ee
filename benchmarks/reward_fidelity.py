"""Reward fidelity at extreme sparsity: does the search reward rank allocations as fine-tuning does?

A search can only beat the simple allocators if its reward tells a better allocation from a worse one. At
0.98 the allocations worth comparing are LAMP, ERK and the allocations between them (log-density blends,
scaled to meet the target). For each, this measures
- the search reward (reward split, 1,000 measured images as in the full grid, BatchNorm re-estimated)
  with 0, 10, 25 and 50 brief fine-tuning steps;
- the accuracy after the benchmark's fine-tuning (0.3 epoch, lr 0.01) on the reward-split images the reward
  does not measure: the test split is never read;
and the rank correlation between each reward variant and that accuracy. With `--repeats 1 3`, every
brief-fine-tuning variant is measured once as the search uses it today and once averaged over 3 image
orders (`RewardSettings.finetune_repeats`; key "25x3" = 25 steps, 3 orders). `--reuse-finetuned FILE` takes
the fine-tuned accuracies from an earlier run of this script on the same allocations, sparsity and seeds, and
measures only the rewards. `--extra-allocations CELL.json …` adds the allocations of benchmark cells at the same
sparsity (the searches' own winners), so the gate also ranks what the search actually returns; an allocation
equal to one already measured is skipped. Writes benchmarks/results/reward_fidelity.json.

    python benchmarks/reward_fidelity.py    # 35 min on 2 cores shared with other jobs
    python benchmarks/reward_fidelity.py --sparsity 0.95 --steps 0 10 25 --repeats 1 3 \
        --extra-allocations benchmarks/cells/full/cell_qlp_0.95_seed*.json \
        benchmarks/cells/full/before-issue17/cell_qlp_0.95_seed*.json --out benchmarks/results/reward_fidelity_095.json
    python benchmarks/reward_fidelity.py --steps 10 25 --repeats 1 3 \
        --reuse-finetuned benchmarks/results/reward_fidelity.json --out benchmarks/results/reward_fidelity_repeats.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_report import spearman, spearman_p

from qlp_compress.base.io import atomic_write_json
from qlp_compress.workflows import (
    AllocationSettings,
    DataSettings,
    ModelSettings,
    Policy,
    Reward,
    RewardSettings,
    TrainSettings,
    accuracy,
    allocate,
    find_prunable_layers,
    materialize,
    open_workspace,
    proportional,
    prune_weights_and_finetune,
)

ROOT = Path(__file__).resolve().parents[1]
BLENDS = {"lamp": 0.0, "blend 0.25": 0.25, "blend 0.5": 0.5, "blend 0.75": 0.75, "erk": 1.0}  # weight of ERK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--reward-images", type=int, default=1000, help="as in the full benchmark grid")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 25, 50])
    parser.add_argument("--repeats", type=int, nargs="+", default=[1], help="image orders averaged per reward")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--reuse-finetuned", type=Path, help="take the fine-tuned accuracies from this earlier run")
    parser.add_argument("--finetune-epochs", type=float, default=0.3)
    parser.add_argument("--extra-allocations", type=Path, nargs="+", default=[],
                        help="benchmark cell files (with 'sparsities') whose allocations are measured too")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/reward_fidelity.json")
    args = parser.parse_args()
    started = time.perf_counter()
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "auto")
    layers = find_prunable_layers(ws.loaded.module)
    names, numels = [x.name for x in layers], [x.numel for x in layers]
    weights = {x.name: x.weight.detach() for x in layers}

    def log_density(method: str) -> np.ndarray:
        s = allocate(method, weights, args.sparsity, AllocationSettings())
        return np.log(np.maximum(1.0 - np.array([s[n] for n in names]), 1e-6))

    lamp, erk = log_density("lamp"), log_density("erk")
    def blend(w: float) -> np.ndarray:  # densities ∝ LAMP's^(1−w)·ERK's^w, meeting the target
        s = proportional(dict(zip(names, np.exp((1 - w) * lamp + w * erk), strict=True)),
                         dict(zip(names, numels, strict=True)), args.sparsity)
        return np.array([s[n] for n in names])

    allocations = {name: blend(w) for name, w in BLENDS.items()}
    for path in args.extra_allocations:
        cell = json.loads(path.read_text())
        name = f"{cell['method']} seed {cell['seed']}" + (" (before #17)" if "before-issue17" in str(path) else "")
        sparsities = np.array(cell["sparsities"], dtype=float)
        if len(sparsities) != len(names) or abs(cell["target"] - args.sparsity) > 1e-9:
            raise SystemExit(f"{path} is not an allocation of this model at sparsity {args.sparsity:g}")
        if not any(np.allclose(sparsities, known, atol=1e-4) for known in allocations.values()):
            allocations[name] = sparsities
    x, y = materialize(ws.splits.reward)
    x, y = x[args.reward_images:], y[args.reward_images:]  # the images the reward does not measure

    earlier = {}
    if args.reuse_finetuned:
        old = json.loads(args.reuse_finetuned.read_text())
        if (old["sparsity"], old["reward_images"], old["finetune_epochs"], old["seeds"]) != \
                (args.sparsity, args.reward_images, args.finetune_epochs, args.seeds):
            raise SystemExit(f"{args.reuse_finetuned} measured other settings; run without --reuse-finetuned")
        earlier = {r["allocation"]: r for r in old["rows"]}
    variants = {str(steps) if repeats == 1 else f"{steps}x{repeats}": (steps, repeats)
                for steps in args.steps for repeats in args.repeats if steps or repeats == 1}
    rewards = {key: Reward(ws.loaded.module, ws.splits.reward, RewardSettings(
        images=args.reward_images, finetune_steps=steps, finetune_repeats=repeats, device=ws.device,
        finetune_from=args.sparsity - 1e-3)) for key, (steps, repeats) in variants.items()}  # the blends meet
    #                                                           the target up to per-layer rounding
    settings = {"sparsity": args.sparsity, "reward_images": args.reward_images, "finetune_epochs": args.finetune_epochs,
                "seeds": args.seeds, "extra_allocations": [str(p) for p in args.extra_allocations]}
    partial = json.loads(args.out.read_text()) if args.out.exists() else {}
    done = {r["allocation"]: r for r in partial.get("rows", [])
            if all(partial.get(k) == v for k, v in settings.items()) and set(variants) <= set(r["reward"])}
    rows = []
    for name, sparsities in allocations.items():
        if name in done:  # measured by an interrupted run of the same settings
            rows.append(done[name])
            continue
        row = {"allocation": name, "sparsities": [round(float(s), 5) for s in sparsities], "reward": {},
               "reward_seconds": {}}
        for key, reward in rewards.items():
            t0 = time.perf_counter()
            row["reward"][key] = reward(sparsities)
            row["reward_seconds"][key] = round(time.perf_counter() - t0, 2)
        if name in earlier:
            if not np.allclose(earlier[name]["sparsities"], row["sparsities"], atol=1e-5):
                raise SystemExit(f"allocation {name} differs from {args.reuse_finetuned}'s; run without it")
            row["finetuned_accuracy"] = earlier[name]["finetuned_accuracy"]
            row["finetuned_mean"] = earlier[name]["finetuned_mean"]
            rows.append(row)
            atomic_write_json(args.out, {**settings, "rows": rows, "partial": True})  # checkpoint
            print(name, row["reward"], row["reward_seconds"], row["finetuned_accuracy"], flush=True)
            continue
        policy = Policy(method=name, target=args.sparsity, layers=names, numels=numels,
                        sparsities=[float(s) for s in sparsities], model_sha256=ws.loaded.sha256)
        tuned_accuracy = []
        for seed in args.seeds:
            _, tuned = prune_weights_and_finetune(ws, policy, TrainSettings(
                epochs=args.finetune_epochs, lr=0.01, warmup_epochs=0.0, seed=seed, device=ws.device))
            batches = ((x[i:i + 500], y[i:i + 500]) for i in range(0, len(y), 500))
            tuned_accuracy.append(accuracy(tuned, batches))
        row["finetuned_accuracy"] = tuned_accuracy
        row["finetuned_mean"] = statistics.fmean(tuned_accuracy)
        rows.append(row)
        atomic_write_json(args.out, {**settings, "rows": rows, "partial": True})  # checkpoint
        print(name, row["reward"], tuned_accuracy, flush=True)

    after = [r["finetuned_mean"] for r in rows]
    atomic_write_json(args.out, {
        **settings, "validation_images": len(y), "rows": rows,
        "finetuned_from": str(args.reuse_finetuned) if args.reuse_finetuned else None,
        "spearman_with_finetuned": {k: spearman([r["reward"][k] for r in rows], after) for k in variants},
        "spearman_p_one_sided": {k: spearman_p([r["reward"][k] for r in rows], after) for k in variants},
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "wall_seconds": round(time.perf_counter() - started, 1)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
