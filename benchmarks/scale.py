"""Ray reward workers on this machine (issue 28): episodes per second of one search scored in one process as today,
on 1 worker × 1 thread, and on 2 workers × 1 thread at K = 2; the identical-policy check (K = 2 in this process, on
1 worker and on 2 workers); a kill -9 of one worker during a search; and a paper estimate for a 4-GPU node and a
4-node CPU cluster from the measured per-reward cost and overheads.

Writes benchmarks/results/scale.json and the "## Ray rewards" section of docs/benchmarks_scale.md (other sections of
that page are left as they are). Every speed is named with the CPU and the load average it was measured at; on a
shared machine rerun it when nothing else runs:

    python benchmarks/scale.py                  # about 3 minutes on 2 cores
    python benchmarks/scale.py --episodes 40    # steadier figures
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.reward.weights import RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.curriculum import SearchSettings
from qlp_compress.workflows.weights import find_policy
from qlp_compress.workflows.workspace import DataSettings, ModelSettings, open_workspace

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/benchmarks_scale.md"
HEADING = "## Ray rewards"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run(ws, search: SearchSettings, reward: RewardSettings, scale: ScaleSettings, on_episode=None) -> dict:
    """One search; its policy, wall time (the search alone) and reward time."""
    started = time.perf_counter()
    policy = find_policy(ws, "qlp", search.target, search, reward, scale=scale, on_episode=on_episode)
    total = time.perf_counter() - started
    s = policy.search
    scaled = s.get("scale", {})
    wall = scaled.get("wall_seconds", s["wall_seconds"])
    return {"workers": scale.workers, "threads": scale.threads if scale.workers else torch.get_num_threads(),
            "batch_episodes": search.batch_episodes, "episodes": s["episodes"], "wall_seconds": round(wall, 2),
            "episodes_per_second": round(s["episodes"] / wall, 3), "reward_seconds": s["reward_seconds"],
            "seconds_per_reward": round(s["reward_seconds"] / max(1, s["reward_evaluations"]), 4),
            "startup_seconds": round(total - wall, 1), "workers_lost": scaled.get("workers_lost", 0),
            "allocations_rescored": scaled.get("allocations_rescored", 0), "load_before": load(),
            "rewards": s["rewards"], "sparsities": policy.sparsities}


def killer(after: int) -> tuple[callable, list]:
    """on_episode that kill -9s one reward worker once `after` episodes are done."""
    killed: list[int] = []

    def on_episode(record: dict) -> None:
        if record["episode"] >= after and not killed:
            pids = subprocess.run(["pgrep", "-f", "ray::RewardWorker"], capture_output=True, text=True).stdout.split()
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)
                killed.append(int(pids[0]))

    return on_episode, killed


def estimate(cells: dict) -> dict:
    """Episodes per second of N workers at K = N, from the measured costs: per batch, the learner plays and learns
    K episodes (a each), the workers score them (r each, one round when N ≥ K), and the batch pays a dispatch
    overhead (o)."""
    one, two = cells["1 worker × 1 thread"], cells["2 workers × 1 thread, K = 2"]
    r = one["seconds_per_reward"]  # one reward on one core, in a worker
    a = max(0.0, (one["wall_seconds"] - one["reward_seconds"]) / one["episodes"])  # learner time and dispatch, per ep.
    batches = two["episodes"] / 2
    o = max(0.0, (two["wall_seconds"] - two["episodes"] * a - batches * two["seconds_per_reward"]) / batches)
    def rate(n: int, reward: float) -> float:
        return round(n / (n * a + reward + o), 2)

    return {"seconds_per_reward_1_core": r, "learner_seconds_per_episode": round(a, 4),
            "overhead_seconds_per_batch": round(o, 4),
            "cpu_cluster_4_nodes_x_2_cores": {"workers": 8, "episodes_per_second": rate(8, r)},
            "cpu_cluster_4_nodes_x_16_cores": {"workers": 64, "episodes_per_second": rate(64, r)},
            "gpu_node_4_gpus_if_gpu_reward_is_10x": {"workers": 4, "episodes_per_second": rate(4, r / 10)},
            "one_gpu_if_gpu_reward_is_10x": {"workers": 1, "episodes_per_second": rate(1, r / 10)}}


def section(result: dict) -> str:
    c = result["cells"]
    rows = "\n".join(f"| {name} | {x['workers'] or 'in process'} | {x['threads']} | {x['batch_episodes']} | "
                     f"{x['episodes']} | {x['wall_seconds']:.1f} | **{x['episodes_per_second']:.3f}** | "
                     f"{x['seconds_per_reward']:.3f} | {x['startup_seconds']:.0f} | {x['load_before']} |"
                     for name, x in c.items())
    base, one, two = (c[k]["episodes_per_second"] for k in c)
    same, kill, e = result["identical"], result["kill"], result["estimate"]
    return f"""{HEADING}

`python benchmarks/scale.py` ({result['settings']}), on {result['cpu']}, {result['cores']} cores; load average
{result['load_start']} at the start and {result['load_end']} at the end{result['load_note']}. Wall time is the search
alone; starting the workers (Ray, then each worker importing torch and building its scorer) is the "start s" column.

| run | workers | threads | K | episodes | wall s | episodes/s | s per reward | start s | load |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

- 2 workers over 1 worker: **{two / one:.2f}×** (goal ≥ 1.5×); over one process as today: **{two / base:.2f}×**
  (goal ≥ 1.1×).
- Identical policy for the same seed and K = 2: in this process, on 1 worker and on 2 workers:
  **{'identical' if same['identical'] else 'DIFFERENT'}** (per-layer sparsities and every episode's reward).
- kill -9 of one worker after episode {kill['after_episode']} of a 2-worker search: {kill['workers_lost']} worker
  lost, {kill['allocations_rescored']} allocation(s) scored again on another worker, result
  **{'identical to the undisturbed run' if kill['identical'] else 'DIFFERENT'}**; wall {kill['wall_seconds']:.1f} s
  against {c['2 workers × 1 thread, K = 2']['wall_seconds']:.1f} s undisturbed (the replacement worker's start).

Paper estimate (not measured): per batch of K = N episodes the learner plays and learns them one after another
(a = {e['learner_seconds_per_episode']} s per episode, measured on 1 worker: wall minus reward time), the N workers
score them in one round (r = {e['seconds_per_reward_1_core']} s per reward on one core, measured), and the batch pays
o = {e['overhead_seconds_per_batch']} s of dispatch (measured on 2 workers: what is left of the wall time). Episodes/s
≈ N / (N·a + r + o). Assumptions: a cluster node's core is as fast as this one, the object store's transfer happens
once at the start (the description is {result['spec_mb']:.1f} MB), the network adds nothing per batch beyond o, and
N ≤ the episodes per stage.
- 4 nodes × 2 cores (8 workers, K = 8): {e['cpu_cluster_4_nodes_x_2_cores']['episodes_per_second']} episodes/s;
  4 nodes × 16 cores (64 workers): {e['cpu_cluster_4_nodes_x_16_cores']['episodes_per_second']} episodes/s (the
  learner's N·a dominates: a faster learner, not more workers, is then what pays).
- 4-GPU node (one worker per GPU, K = 4), *if* a GPU reward costs r/10 (the issue's goal; no GPU was measured here,
  `make gpu-check` measures it): {e['gpu_node_4_gpus_if_gpu_reward_is_10x']['episodes_per_second']} episodes/s,
  against {e['one_gpu_if_gpu_reward_is_10x']['episodes_per_second']} on one GPU.
"""


def write_doc(text: str) -> None:
    """Replace the "## Ray rewards" section of the page (up to the next "## "), keeping every other section."""
    old = DOC.read_text() if DOC.exists() else "# Scaling out: benchmarks\n"
    head, found, rest = old.partition(HEADING)
    tail = rest[rest.find("\n## "):] if found and "\n## " in rest else ""
    DOC.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks_scale.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)  # one process as today: every core
    started_load = load()
    ws = open_workspace(ROOT / "models/resnet20_fmnist.onnx", ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    reward = RewardSettings(images=args.reward_images, device="cpu")
    search = SearchSettings(target=0.9, episodes=args.episodes, stages=2, seed=0)
    k2 = replace(search, batch_episodes=2)
    cells = {"one process as today": run(ws, search, reward, ScaleSettings()),
             "1 worker × 1 thread": run(ws, search, reward, ScaleSettings(workers=1)),
             "2 workers × 1 thread, K = 2": run(ws, k2, reward, ScaleSettings(workers=2))}
    same = [run(ws, k2, reward, ScaleSettings()), run(ws, k2, reward, ScaleSettings(workers=1))]
    identical = all((x["rewards"], x["sparsities"]) == (cells["2 workers × 1 thread, K = 2"]["rewards"],
                                                        cells["2 workers × 1 thread, K = 2"]["sparsities"])
                    for x in same)
    after = max(2, args.episodes // 3)
    on_episode, killed = killer(after)
    kill = run(ws, k2, reward, ScaleSettings(workers=2), on_episode=on_episode)
    kill.update(after_episode=after, killed_pid=killed[0] if killed else None,
                identical=(kill["rewards"], kill["sparsities"]) == (same[0]["rewards"], same[0]["sparsities"]))
    from qlp_compress.reward.spec import make_spec

    spec = make_spec("weight", ws.loaded.module, ws.splits.reward, reward, ws.loaded.sha256)
    end_load = load()
    cores = os.cpu_count()
    result = {"cpu": describe_cpu(cpu_capability()), "cores": cores, "load_start": started_load, "load_end": end_load,
              "load_note": "" if max(started_load, end_load) < 0.5 else
              " (the machine was shared: other work ran beside these figures; rerun quietly for clean ones)",
              "settings": f"ResNet-20 on Fashion-MNIST, target 0.9, {args.episodes} episodes, 2 stages, "
                          f"{args.reward_images} reward images, BatchNorm re-estimated on 256",
              "spec_mb": (len(spec.model) + spec.images.numel() * spec.images.element_size()) / 1e6,
              "cells": cells, "identical": {"identical": identical, "runs": ["in process", "1 worker", "2 workers"]},
              "kill": kill}
    result["estimate"] = estimate(cells)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = section(result)
    print(text)
    if not args.no_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
