"""Every CUDA path of the tool, in one short run (`make gpu-check`, under 5 minutes on one GPU), into one JSON file:

1. the search reward on the GPU (torch engine: weights masked in place, BatchNorm re-estimated, reward images resident
   on the GPU, nothing rebuilt per call): evaluations per second, and its agreement with the CPU reward (onnxruntime
   engine, this machine's CPU) on the same allocations;
2. a short search on the GPU, with 2 Ray reward workers (one GPU each) when the machine has 2 GPUs;
3. fine-tuning on the GPU (part of that search's command);
4. `evaluate` through onnxruntime's CUDA provider at batch 1 and 64;
5. the int8 model through onnxruntime's CUDA provider, if it runs there.

On a machine without a usable GPU it prints "no GPU" and exits 0. GPU timings synchronise before reading the clock
and warm up first.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def timed_rewards(reward, allocations: list[np.ndarray], cuda: bool) -> tuple[list[float], float]:
    """Scores of every allocation, and evaluations per second after two warm-up calls."""
    for a in allocations[:2]:
        reward(a)
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    scores = [reward(a) for a in allocations]
    if cuda:
        torch.cuda.synchronize()
    return scores, len(allocations) / (time.perf_counter() - started)


def reward_check(n: int, cpu_n: int) -> dict:
    from qlp_compress.base.machine import cpu_capability, describe_cpu
    from qlp_compress.workflows import DataSettings, ModelSettings, Reward, RewardSettings, open_workspace

    ws = open_workspace(ROOT / "models/resnet20_fmnist.onnx", ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    settings = RewardSettings(images=1000, bn_recalibrate=256, finetune_steps=0)
    gpu = Reward(ws.loaded.module, ws.splits.reward, replace(settings, device="cuda"))
    cpu = Reward(ws.loaded.module, ws.splits.reward, settings)
    rng = np.random.default_rng(0)
    allocations = [rng.uniform(0.3, 0.97, len(gpu.numels)) for _ in range(n)]
    gpu_scores, gpu_rate = timed_rewards(gpu, allocations, cuda=True)
    cpu_scores, cpu_rate = timed_rewards(cpu, allocations[:cpu_n], cuda=False)
    diffs = np.abs(np.asarray(gpu_scores[:cpu_n]) - np.asarray(cpu_scores))
    return {"gpu_engine": gpu.engine, "cpu_engine": cpu.engine, "images": settings.images,
            "bn_recalibrate": settings.bn_recalibrate, "gpu_evaluations_per_second": round(gpu_rate, 2),
            "cpu_evaluations_per_second": round(cpu_rate, 3), "cpu": describe_cpu(cpu_capability()),
            "cpu_threads": torch.get_num_threads(), "speedup": round(gpu_rate / cpu_rate, 1),
            "allocations_compared": cpu_n, "identical_scores": int((diffs == 0).sum()),
            "max_abs_difference": float(diffs.max()), "mean_abs_difference": float(diffs.mean())}


def cli(*args: str, timeout: int = 240) -> tuple[dict | None, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qlp_compress", *args, "--json"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return None, seconds, (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout), seconds, ""


def int8_on_cuda(model: Path) -> dict:
    from qlp_compress.workflows import load_fashion_mnist, measure_latency, open_session, session_accuracy

    try:
        session = open_session(model, "cuda")
        test = load_fashion_mnist().test
        return {"ran": True, "providers": session.get_providers(), "accuracy": session_accuracy(session, test),
                "latency_batch_64_ms": measure_latency(session, (1, 28, 28), 64, repeats=20).median_ms}
    except Exception as e:  # what the CUDA provider cannot run is the finding
        return {"ran": False, "error": " ".join(str(e).split())[:300]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_check.json")
    parser.add_argument("--evaluations", type=int, default=40, help="GPU reward evaluations timed")
    parser.add_argument("--cpu-evaluations", type=int, default=8, help="CPU reward evaluations (the agreement check)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU")
        return 0
    started = time.perf_counter()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                    "torch": torch.__version__}
    result["reward"] = reward_check(args.evaluations, args.cpu_evaluations)
    print(f"reward: {result['reward']['gpu_evaluations_per_second']} evaluations/s on the GPU", flush=True)

    out = ROOT / "out/gpu-check"
    workers = ["--workers", "2"] if torch.cuda.device_count() >= 2 else []
    search, seconds, error = cli("search", "models/resnet20_fmnist.onnx", "--sparsity", "0.9", "--episodes", "24",
                                 "--stages", "2", "--candidates", "1", "--finetune-epochs", "0.2", "--device", "cuda",
                                 "--out", str(out / "search"), "--force", "-q", *workers)
    result["search"] = {"seconds": round(seconds, 1), "error": error, "workers": len(workers) and 2} if error else {
        "seconds": round(seconds, 1), "episodes": search["search"]["episodes"],
        "reward_seconds": search["search"]["reward_seconds"], "scale": search.get("scale"),
        "finetune": search.get("finetune"), "accuracy": search["accuracy"]}
    print(f"search and fine-tuning: {seconds:.0f} s {error}", flush=True)

    model = out / "search/model.onnx" if not error else ROOT / "models/resnet20_fmnist.onnx"
    evaluated, _, error = cli("evaluate", str(model), "--device", "cuda", "--repeats", "30")
    result["evaluate"] = {"error": error} if error else {"providers": [x["provider"] for x in evaluated["latency"]],
                                                          "latency": evaluated["latency"],
                                                          "accuracy": evaluated["accuracy"]}
    int8 = out / "model.int8.onnx"
    quantized, _, error = cli("quantize", str(model), "--out", str(int8), "--force")
    result["int8"] = {"quantize_error": error} if error else {"quantize": quantized, **int8_on_cuda(int8)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
