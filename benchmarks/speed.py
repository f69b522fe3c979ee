"""Search speed on the shipped ResNet-20 and the Fashion-MNIST reward split (issue: QLP engine, speed).

Measures, side by side in one run:
- the reward engines (onnxruntime, torch) against a bare onnxruntime / PyTorch inference of the same model on
  the same images and batch size: reward throughput as a share of bare throughput;
- a short QLP search: seconds per episode and the share of wall time outside the reward evaluations.
Writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from qlp_compress.data import load_fashion_mnist, make_splits, materialize
from qlp_compress.importer import load_model
from qlp_compress.qlp.env import PruningEnv
from qlp_compress.qlp.reward import Reward, RewardSettings
from qlp_compress.qlp.search import SearchSettings, run_search
from qlp_compress.runtime import open_session

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/speed.json")
    args = parser.parse_args()

    data = load_fashion_mnist()
    splits = make_splits(data)
    loaded = load_model(args.model, verify_input_shape=data.input_shape)
    x, _ = materialize(splits.reward, limit=args.images)
    batches = [b.numpy() for b in x.split(args.batch)]
    sparsities = np.random.default_rng(0).uniform(0.3, 0.95, len(Reward(loaded.module, splits.reward, RewardSettings(
        images=8, engine="torch")).names))

    bare_ort = open_session(args.model)
    name = bare_ort.get_inputs()[0].name
    module = loaded.module.eval()
    results = {"model": str(args.model.relative_to(ROOT)), "images": args.images, "batch": args.batch,
               "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
               "cpu_count": torch.get_num_threads(), "torch": torch.__version__, "onnxruntime": ort.__version__}

    def bare_torch():
        with torch.inference_mode():
            for b in x.split(args.batch):
                module(b)

    timings = {
        "bare_onnxruntime": median_seconds(lambda: [bare_ort.run(None, {name: b}) for b in batches], args.repeats),
        "bare_torch": median_seconds(bare_torch, args.repeats),
    }
    for engine in ("onnxruntime", "torch"):
        reward = Reward(loaded.module, splits.reward, RewardSettings(images=args.images, batch_size=args.batch,
                                                                      engine=engine))
        timings[f"reward_{engine}"] = median_seconds(lambda r=reward: r(sparsities), args.repeats)
    results["seconds_per_evaluation"] = {k: round(v, 4) for k, v in timings.items()}
    results["images_per_second"] = {k: round(args.images / v, 1) for k, v in timings.items()}
    results["reward_vs_bare"] = {
        "onnxruntime_reward / bare_onnxruntime": round(timings["bare_onnxruntime"] / timings["reward_onnxruntime"], 3),
        "torch_reward / bare_torch": round(timings["bare_torch"] / timings["reward_torch"], 3),
        "onnxruntime_reward / bare_torch": round(timings["bare_torch"] / timings["reward_onnxruntime"], 3),
    }

    reward = Reward(loaded.module, splits.reward, RewardSettings(images=args.images, batch_size=args.batch))
    env = PruningEnv(reward.numels, reward)
    search = run_search(env, SearchSettings(target=0.9, episodes=args.episodes, stages=2))
    results["search"] = {
        "episodes": len(search.history), "engine": reward.engine,
        "seconds_per_episode": round(search.total_seconds / len(search.history), 4),
        "reward_seconds_per_episode": round(search.reward_seconds / len(search.history), 4),
        "share_outside_reward": round(1 - search.reward_seconds / search.total_seconds, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
