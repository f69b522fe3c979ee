"""Demonstrations learnt the DQfD way, and near-best episodes, against today's search: the same budget, reward split.

For each seed and variant, one QLP search on the shipped ResNet-20 (Fashion-MNIST) at the given target; it
reports, for the final curriculum stage, the agent's own best episode, the best demonstration (scored at its
exact allocation) and which of them the search returned; with near-best episodes, also the best episode
that started from scratch and the best near-best episode. Since the search maximises accuracy on the same
500 images it measures, `--held-out N` also scores the returned policy and exact LAMP on N other reward-split
images (the ones after the measured ones), to see whether a gain over LAMP is more than a fit to those 500.
The test split is never read.

    python benchmarks/dqfd.py --target 0.9 --episodes 200 --seeds 0,1   # → benchmarks/results/dqfd.json
    python benchmarks/dqfd.py --seeds 0,1 --variants "DQfD margin 0.05 + near-best 0.5"
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from qlp_compress.base.io import atomic_write_json
from qlp_compress.workflows import (
    AgentSettings,
    DataSettings,
    ModelSettings,
    Reward,
    RewardSettings,
    SearchSettings,
    TensorImages,
    find_policy,
    materialize,
    open_workspace,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # the same budget and reward; only how the agent learns from the demonstrations, and where
    #          its episodes start, differ
    "replay-only demonstrations": {"agent": AgentSettings(demo_learning=False), "near_best": 0.0},
    "DQfD margin 0.8 (DQfD's own)": {"agent": AgentSettings(demo_margin=0.8, demo_share=0.25, pretrain_steps=300),
                                     "near_best": 0.0},
    "DQfD margin 0.05": {"agent": AgentSettings(demo_margin=0.05, demo_share=0.1, pretrain_steps=100),
                         "near_best": 0.0},
    "DQfD margin 0.05 + near-best 0.5": {"agent": AgentSettings(demo_margin=0.05, demo_share=0.1, pretrain_steps=100),
                                         "near_best": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--reward-images", type=int, default=500)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--held-out", type=int, default=0, help="reward-split images after the measured ones")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dqfd.json")
    args = parser.parse_args()
    ws = open_workspace(ROOT / "models" / "resnet20_fmnist.onnx", ModelSettings(), DataSettings("fashion-mnist"),
                        "cpu")
    done = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    held_out = None
    if args.held_out:
        x, y = materialize(ws.splits.reward, limit=args.reward_images + args.held_out)
        held_out = Reward(ws.loaded.module, TensorImages(x[args.reward_images:], y[args.reward_images:]),
                          RewardSettings(images=args.held_out, device="cpu"))
        lamp = find_policy(ws, "lamp", args.target).sparsities
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.variants.split(","):
            agent = VARIANTS[name]["agent"]
            key = {"variant": name, "seed": seed, "target": args.target, "episodes": args.episodes,
                   "demo_margin": agent.demo_margin if agent.demo_learning else None}
            if any(all(r.get(k) == v for k, v in key.items()) for r in done["runs"]):
                continue
            started = time.perf_counter()
            search = SearchSettings(target_removed=args.target, episodes=args.episodes, seed=seed, **VARIANTS[name])
            records: list[dict] = []
            policy = find_policy(ws, "qlp", args.target, search,
                                 RewardSettings(images=args.reward_images, device="cpu"), on_episode=records.append)
            rewards, stages = policy.search["rewards"], policy.search["stage_of_episode"]
            demos = len(search.demonstrations)
            last = [r for r, s in zip(rewards, stages, strict=True) if s == max(stages)]
            agent_rewards = [r for r in last[demos:] if r >= 0]
            run = {**key, "final_reward": policy.best_reward, "best_demonstration": max(last[:demos]),
                   "agent_best": max(agent_rewards, default=None),
                   "agent_failed": sum(1 for r in last[demos:] if r < 0), "agent_episodes": len(last) - demos,
                   "chosen": policy.stages[-1].get("demonstration") or "agent",
                   "demonstrations": {r["demonstration"]: r["reward"] for r in records
                                      if r["stage"] == max(stages) and r.get("demonstration")},
                   "stage_winners": [s.get("demonstration") or "agent" for s in policy.stages],
                   "minutes": round((time.perf_counter() - started) / 60, 1)}
            run["final_sparsities"] = [round(float(v), 6) for v in policy.sparsities]
            if held_out is not None:
                run["held_out"] = {"images": args.held_out, "policy": held_out(np.asarray(policy.sparsities)),
                                   "lamp": held_out(np.asarray(lamp))}
            if search.near_best:
                final = [r for r in records if r["stage"] == max(stages) and not r.get("demonstration")]
                run["agent_best_from_scratch"] = max((r["reward"] for r in final
                                                      if r["succeeded"] and not r.get("near_best")), default=None)
                run["near_best_best"] = max((r["reward"] for r in final if r["succeeded"] and r.get("near_best")),
                                            default=None)
                run["near_best_episodes"] = sum(1 for r in final if r.get("near_best"))
                run["near_best_improvements"] = sum(1 for a, b in itertools.pairwise(records)
                                                    if b.get("near_best") and b["best"] > a["best"])
            done["runs"].append(run)
            done["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "capability": torch.backends.cpu.get_cpu_capability()}
            atomic_write_json(args.out, done)
            print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
