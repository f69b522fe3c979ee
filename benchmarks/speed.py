"""Search speed on the shipped ResNet-20 and the Fashion-MNIST reward split (issue: QLP engine, speed).

Measures, side by side in one run:
- the reward engines (onnxruntime, torch) against a bare onnxruntime / PyTorch inference of the same model on
  the same images and batch size: reward throughput as a share of bare throughput;
- the same with BatchNorm re-estimation (the default reward), whose extra cost is PyTorch's training-mode
  forward on the calibration images;
- a short QLP search with the default reward: seconds per episode and the share of wall time outside the
  reward evaluations.
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

from qlp_compress.workflows import (
    PruningEnv,
    Reward,
    RewardSettings,
    SearchSettings,
    load_fashion_mnist,
    load_model,
    make_splits,
    materialize,
    open_session,
    run_search,
)

ROOT = Path(__file__).resolve().parents[1]


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round-robin so that all share the machine's noise."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


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

    fns = {"bare_onnxruntime": lambda: [bare_ort.run(None, {name: b}) for b in batches], "bare_torch": bare_torch}
    for engine in ("onnxruntime", "torch"):
        for bn in (0, RewardSettings().bn_recalibrate):
            reward = Reward(loaded.module, splits.reward, RewardSettings(
                images=args.images, batch_size=args.batch, engine=engine, bn_recalibrate=bn))
            fns[f"reward_{engine}" + (f"_bn{bn}" if bn else "")] = lambda r=reward: r(sparsities)
    timings = interleaved_medians(fns, args.repeats)
    results["seconds_per_evaluation"] = {k: round(v, 4) for k, v in timings.items()}
    results["images_per_second"] = {k: round(args.images / v, 1) for k, v in timings.items()}
    results["reward_vs_bare"] = {
        "onnxruntime_reward / bare_onnxruntime": round(timings["bare_onnxruntime"] / timings["reward_onnxruntime"], 3),
        "torch_reward / bare_torch": round(timings["bare_torch"] / timings["reward_torch"], 3),
        "onnxruntime_reward / bare_torch": round(timings["bare_torch"] / timings["reward_onnxruntime"], 3),
        "onnxruntime_reward_with_bn_recalibration / bare_onnxruntime": round(
            timings["bare_onnxruntime"] / timings[f"reward_onnxruntime_bn{RewardSettings().bn_recalibrate}"], 3),
    }

    reward = Reward(loaded.module, splits.reward, RewardSettings(images=args.images, batch_size=args.batch))
    env = PruningEnv(reward.numels, reward)
    search = run_search(env, SearchSettings(target_removed=0.9, episodes=args.episodes, stages=2))
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
