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
from qlp_compress.workflows import (
    DataSettings,
    ModelSettings,
    PruningEnv,
    RewardSettings,
    ScaleSettings,
    SearchSettings,
    allocator,
    find_policy,
    find_prunable_layers,
    open_workspace,
    run_search,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/benchmarks_scale.md"
HEADING = "## Ray rewards"
CELLS = ("one process as today", "1 worker × 1 thread", "2 workers × 1 thread, K = 2")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run(ws, search: SearchSettings, reward: RewardSettings, scale: ScaleSettings, on_episode=None) -> dict:
    """One search: its policy, and its speed after its first batch (from then on every run is in its steady state:
    workers started, scorers built), from the moments each batch's episodes were reported."""
    marks: list[tuple[float, int]] = []

    def on_each(record: dict) -> None:
        marks.append((time.perf_counter(), record["episode"]))
        if on_episode:
            on_episode(record)

    started = time.perf_counter()
    policy = find_policy(ws, "qlp", search.target_removed, search, reward, scale=scale, on_episode=on_each)
    s = policy.search
    scaled = s.get("scale", {})
    first = next(i for i, (_, e) in enumerate(marks) if e == search.batch_episodes)  # the first batch's last report
    span, episodes = marks[-1][0] - marks[first][0], marks[-1][1] - marks[first][1]
    per_reward = s["reward_seconds"] / max(1, s["reward_evaluations"])
    return {"workers": scale.workers, "threads": scale.threads if scale.workers else torch.get_num_threads(),
            "batch_episodes": search.batch_episodes, "episodes": s["episodes"], "timed_episodes": episodes,
            "wall_seconds": round(span, 2), "episodes_per_second": round(episodes / span, 3),
            "reward_seconds": s["reward_seconds"], "seconds_per_reward": round(per_reward, 4),
            "startup_seconds": round(marks[first][0] - started, 1), "workers_lost": scaled.get("workers_lost", 0),
            "allocations_rescored": scaled.get("allocations_rescored", 0), "load_after": load(),
            "dispatch_seconds_per_batch": scaled.get("dispatch_seconds_per_batch"),
            "rewards": s["rewards"], "sparsities": policy.sparsities}


def learner_seconds(ws, search: SearchSettings) -> float:
    """The learner's own time per episode (playing and learning, demonstrations' allocations included): the same
    search with a reward that costs nothing."""
    env = PruningEnv([layer.numel for layer in find_prunable_layers(ws.loaded.module)], lambda s: 0.5, search.env)
    started = time.perf_counter()
    run_search(env, search, allocation=allocator(ws))
    return round((time.perf_counter() - started) / search.episodes, 4)


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


def estimate(cells: dict, a: float) -> dict:
    """Episodes per second of N workers at K = N, from the measured costs: per batch, the learner plays and learns
    K episodes (a each, measured with a reward that costs nothing), the workers score
    them in one round (r, one reward on one core in a worker) and the batch pays Ray's dispatch (o, measured on 2
    workers: a batch's wall time beyond its slowest reward)."""
    one, two = cells[CELLS[1]], cells[CELLS[2]]
    r, o = one["seconds_per_reward"], two["dispatch_seconds_per_batch"]

    def rate(n: int, reward: float) -> float:
        return round(n / (n * a + reward + o), 2)

    return {"seconds_per_reward_1_core": r, "learner_seconds_per_episode": round(a, 4),
            "dispatch_seconds_per_batch": o,
            "cpu_cluster_4_nodes_x_2_cores": {"workers": 8, "episodes_per_second": rate(8, r)},
            "cpu_cluster_4_nodes_x_16_cores": {"workers": 64, "episodes_per_second": rate(64, r)},
            "gpu_node_4_gpus_if_gpu_reward_is_10x": {"workers": 4, "episodes_per_second": rate(4, r / 10)},
            "one_gpu_if_gpu_reward_is_10x": {"workers": 1, "episodes_per_second": rate(1, r / 10)}}


def section(result: dict) -> str:
    c = result["cells"]
    rows = "\n".join(f"| {name} | {x['workers'] or 'in process'} | {x['threads']} | {x['batch_episodes']} | "
                     f"{x['timed_episodes']} | {x['wall_seconds']:.1f} | **{x['episodes_per_second']:.3f}** | "
                     f"{x['seconds_per_reward']:.3f} | {x['startup_seconds']:.0f} | {x['load_after']} |"
                     for name, x in c.items())
    base, one, two = (c[k]["episodes_per_second"] for k in CELLS)
    same, kill, e = result["identical"], result["kill"], result["estimate"]
    verdict = {True: "identical", False: "DIFFERENT"}
    cpu8, cpu64 = (e[k]["episodes_per_second"] for k in ("cpu_cluster_4_nodes_x_2_cores",
                                                          "cpu_cluster_4_nodes_x_16_cores"))
    gpu4, gpu1 = (e[k]["episodes_per_second"] for k in ("gpu_node_4_gpus_if_gpu_reward_is_10x",
                                                         "one_gpu_if_gpu_reward_is_10x"))
    facts = [
        f"2 workers over 1 worker: **{two / one:.2f}×** (goal ≥ 1.5×); over one process as today: "
        f"**{two / base:.2f}×** (goal ≥ 1.1×).",
        "Identical policy for the same seed and K = 2, scored in this process, on 1 worker and on 2 workers: "
        f"**{verdict[same['identical']]}** (per-layer sparsities and every episode's reward).",
        f"kill -9 of one worker after episode {kill['after_episode']} of a 2-worker search: {kill['workers_lost']} "
        f"worker lost, {kill['allocations_rescored']} allocation(s) scored again on another worker; result "
        f"**{verdict[kill['identical']]}** to the undisturbed run; wall {kill['wall_seconds']:.1f} s against "
        f"{c[CELLS[2]]['wall_seconds']:.1f} s undisturbed (the replacement worker's start included).",
        f"Ray's dispatch, measured: {c[CELLS[2]]['dispatch_seconds_per_batch']} s per batch on 2 workers beyond the "
        f"batch's slowest reward ({c[CELLS[1]]['dispatch_seconds_per_batch']} s on 1 worker).",
    ]
    paper = [
        f"4 nodes × 2 cores (8 workers, K = 8): {cpu8} episodes/s; 4 nodes × 16 cores (64 workers, K = 64): {cpu64} "
        "episodes/s (there the learner's N·a dominates: a faster learner, not more workers, pays).",
        f"A 4-GPU node (one worker per GPU, K = 4), *if* a GPU reward costs r/10 (the issue's goal; no GPU was "
        f"measured here, `make gpu-check` measures it): {gpu4} episodes/s, against {gpu1} on one GPU "
        f"({gpu4 / gpu1:.1f}×; goal ≥ 3.5×). The learner's own time (N·a per batch, one process) is what bounds it: "
        "letting the learner update while the workers score (Ape-X's actors and learner apart) would lift it.",
    ]
    bullets = "\n".join(f"- {x}" for x in facts)
    estimates = "\n".join(f"- {x}" for x in paper)
    return f"""{HEADING}

`python benchmarks/scale.py` (or `make scale`): {result['settings']}. CPU: {result['cpu']}, {result['cores']} cores.
Load average {result['load_start']} at the start and {result['load_end']} at the end{result['load_note']}.
Each run is timed from the end of its first batch to its last (its steady state); everything before, starting the
workers included (Ray, then each worker importing torch and building its scorer from the reward description), is
the "start s" column. "s per reward" is the time inside the scorer (2 threads in one process, 1 thread in a worker);
"load" is the 1-minute load average at the end of the run.

| run | workers | threads | K | timed episodes | wall s | episodes/s | s per reward | start s | load |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

{bullets}

Paper estimate (not measured). Per batch of K = N episodes the learner plays and learns them one after another
(a = {e['learner_seconds_per_episode']} s per episode, measured: the same search with a reward that costs nothing),
N workers score them in one round (r = {e['seconds_per_reward_1_core']} s per reward on one core, measured in a
worker) and the batch pays o = {e['dispatch_seconds_per_batch']} s of dispatch (measured on 2 workers).
Episodes/s ≈ N / (N·a + r + o).
Assumptions: a cluster node's core is as fast as this one; the reward description ({result['spec_mb']:.1f} MB)
crosses the network once per worker at the start; the network adds nothing per batch beyond o; N is at most the
episodes per stage; the figures above were taken at the load shown, so r and a are inflated by it.

{estimates}

Latency is never measured beside the workers: a search's rewards are scored inside one block (`workflows.scale.scoring`)
that starts the workers and stops them; channel mode's latency table is built before that block and every speed and
latency figure of a run is measured after it, and a table built at a high load average says so (`busy_table_warning`).
Other people's work on a shared machine is not stopped: the load average is recorded with every figure here.

GPU: no GPU was lent to this work; `make gpu-check` (benchmarks/gpu_check.py) runs every CUDA path and writes
benchmarks/results/gpu_check.json where there is one.
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
    parser.add_argument("--from-results", action="store_true", help="rewrite the page's section from --out, no run")
    args = parser.parse_args()
    if args.from_results:
        write_doc(section(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(os.cpu_count() or 1)  # one process as today: every core
    started_load = load()
    ws = open_workspace(ROOT / "models/resnet20_fmnist.onnx", ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    reward = RewardSettings(images=args.reward_images, device="cpu")
    search = SearchSettings(target_removed=0.9, episodes=args.episodes, stages=2, seed=0)
    k2 = replace(search, batch_episodes=2)
    runs = ((search, ScaleSettings()), (search, ScaleSettings(workers=1)), (k2, ScaleSettings(workers=2)))
    cells = {name: run(ws, how, reward, scale) for name, (how, scale) in zip(CELLS, runs, strict=True)}
    same = [run(ws, k2, reward, ScaleSettings()), run(ws, k2, reward, ScaleSettings(workers=1))]
    identical = all((x["rewards"], x["sparsities"]) == (cells[CELLS[2]]["rewards"], cells[CELLS[2]]["sparsities"])
                    for x in same)
    after = max(2, args.episodes // 3)
    on_episode, killed = killer(after)
    kill = run(ws, k2, reward, ScaleSettings(workers=2), on_episode=on_episode)
    kill.update(after_episode=after, killed_pid=killed[0] if killed else None,
                identical=(kill["rewards"], kill["sparsities"]) == (same[0]["rewards"], same[0]["sparsities"]))
    from qlp_compress.workflows import make_spec

    spec = make_spec("weight", ws.loaded.module, ws.splits.reward, reward, ws.loaded.sha256)
    end_load = load()
    cores = os.cpu_count()
    result = {"cpu": describe_cpu(cpu_capability()), "cores": cores, "load_start": started_load, "load_end": end_load,
              "load_note": " (quiet at the start; the load at the end is the benchmark's own processes)"
              if started_load < 0.5 else
              " (the machine was shared: other work ran beside these figures; rerun quietly for clean ones)",
              "settings": f"ResNet-20 on Fashion-MNIST, target 0.9, {args.episodes} episodes, 2 stages, "
                          f"{args.reward_images} reward images, BatchNorm re-estimated on 256",
              "spec_mb": (len(spec.model) + spec.images.numel() * spec.images.element_size()) / 1e6,
              "cells": cells, "identical": {"identical": identical, "runs": ["in process", "1 worker", "2 workers"]},
              "kill": kill}
    result["estimate"] = estimate(cells, learner_seconds(ws, k2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = section(result)
    print(text)
    if not args.no_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
