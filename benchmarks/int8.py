"""int8 on top of pruning (issue 16): float against onnxruntime static int8 on the shipped ResNet-20.

Models: the dense model, and LAMP at each --sparsities, fine-tuned --finetune-epochs (the same as
`qlp-compress prune models/resnet20_fmnist.onnx --method lamp --sparsity S --finetune-epochs E`). Each float
model is quantized by `qlp_compress.quantize` (QDQ, per-channel symmetric int8 weights, uint8 activations,
--calibration-images reward-split images) with every layer in int8, and with the first and last prunable
layers kept in float; the dense model also with int8 activations (the alternative to uint8); and every model
with full 8-bit weights (the form written before 7-bit weights became the default: it overflows 16-bit sums on
x86 CPUs without VNNI, so its rows show what that costs on the CPU at hand).

Measured: test accuracy (reporting only) and reward-split accuracy (what a choice may be based on); latency at
batch 1 and 64 through onnxruntime on the CPU, with a fixed number of intra-op threads, all models timed
round-robin (interleaved) so that they share the machine's noise, medians; file size and gzip size.
Writes benchmarks/results/int8-CPUCLASS.json (one file per CPU class: avx512-vnni, avx2, ...) and
docs/benchmarks_int8.md, which shows every CPU class's file, one section each (`--markdown-only` rewrites the page
from the JSON files). Fine-tuned float models are kept in --work and reused when present.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qlp_compress.base import machine
from qlp_compress.base.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from qlp_compress.workflows import (
    DataSettings,
    ModelSettings,
    QuantizeSettings,
    TrainSettings,
    export_bytes,
    find_policy,
    materialize,
    open_session,
    open_workspace,
    prune_weights_and_finetune,
    session_accuracy,
    to_sparse_storage,
    write_int8,
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name → quantize settings (None: the float model itself)
    "float": None,
    "int8": {},
    "int8, first+last float": {"keep_float": ("first", "last")},
    "int8, int8 activations": {"activations": "int8"},  # dense only: the activation-type choice
    "int8, full 8-bit weights": {"weight_bits": 8},  # the old default: wrong without VNNI
}
RESULTS = ROOT / "benchmarks/results"


def cpu_class(cpu: dict) -> str:
    """The int8 kernel class onnxruntime picks on this CPU: amx, avx512-vnni, avx-vnni, avx2 or other."""
    for key, name in (("amx", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx2", "avx2")):
        if cpu.get(key):
            return name
    return "other"


def float_models(ws, sparsities: list[float], epochs: float, work: Path, fresh: bool) -> dict[str, Path]:
    models = {"dense": work / "dense.onnx"}
    if fresh or not models["dense"].exists():
        atomic_write_bytes(models["dense"], export_bytes(ws.loaded.module, ws))
    for s in sparsities:
        path = models[f"lamp {s:g}"] = work / f"lamp-{s:g}.onnx"
        if path.exists() and not fresh:
            continue
        policy = find_policy(ws, "lamp", s)
        settings = TrainSettings(epochs=epochs, lr=0.01, warmup_epochs=0.0, seed=0, device="cpu")
        _, tuned = prune_weights_and_finetune(ws, policy, settings if epochs > 0 else None)
        atomic_write_bytes(path, export_bytes(tuned, ws))
    return models


SPARSE_INT8_MAX_DENSITY = 1 / 9  # an int8 value and its int64 index take 9 bytes against 1 dense


def sparse_storage(int8: bytes, x: np.ndarray) -> dict:
    """The int8 model with its weights of density ≤ 1/9 as `sparse_initializer`: does onnx.checker accept it,
    does onnxruntime load it with the same outputs, and what does it save?"""
    sparse = to_sparse_storage(int8, SPARSE_INT8_MAX_DENSITY)
    proto = onnx.load_from_string(sparse)
    result = {"layers_moved": len(proto.graph.sparse_initializer), "bytes": len(sparse),
              "gzip_bytes": len(gzip.compress(sparse, 6))}
    for full in (False, True):
        try:
            onnx.checker.check_model(proto, full_check=full)
            result[f"checker_full_check_{full}".lower()] = "passes"
        except Exception as e:
            result[f"checker_full_check_{full}".lower()] = "fails: " + " ".join(str(e).split())[:300]
    outputs = []
    for model in (int8, sparse):
        s = open_session(model)
        outputs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    result["onnxruntime_same_outputs"] = bool(np.array_equal(*outputs))
    return result


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict[str, Path], batch: int, threads: int, repeats: int,
                        input_shape: tuple[int, ...]) -> dict[str, dict]:
    """Median and p90 milliseconds per run of each model, timed round-robin (the order rotates every round)."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: {"median_ms": round(statistics.median(v), 4), "p90_ms": round(float(np.percentile(v, 90)), 4)}
            for k, v in times.items()}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    floats = float_models(ws, args.sparsities, args.finetune_epochs, args.work, args.fresh)
    rows, paths = [], {}
    x_check = materialize(ws.splits.test, limit=256)[0].numpy()
    for model, float_path in floats.items():
        raw = float_path.read_bytes()
        float_test = session_accuracy(open_session(raw), ws.splits.test)
        for variant, options in VARIANTS.items():
            if "activations" in (options or {}) and model != "dense":
                continue
            key = f"{model} · {variant}"
            row = {"model": model, "variant": variant}
            if options is None:
                path, info = float_path, None
            else:
                path = args.work / f"{float_path.stem}.{variant.replace(', ', '-').replace(' ', '_')}.onnx"
                settings = QuantizeSettings(calibration_images=args.calibration_images,
                                                     speed_batches=(), **options)
                info = write_int8(raw, path, ws.splits.reward, ws.splits.test, settings, float_test,
                                           name=key)
                row.update(float_layers=info["float_layers"], zeros=info["zeros"],
                           calibration_images=info["calibration_images"], preprocess=info["preprocess"],
                           activations=info["activations"], weights=info["weights"])
            data = path.read_bytes()
            s = open_session(data)
            row.update(test_accuracy=float_test if info is None else info["accuracy"]["int8_accuracy"],
                       reward_accuracy=session_accuracy(s, ws.splits.reward),
                       bytes=len(data), gzip_bytes=len(gzip.compress(data, 6)))
            if info is not None and model != "dense":
                row["sparse_storage"] = sparse_storage(data, x_check)
            rows.append(row)
            paths[key] = path
            print(f"{key}: test {row['test_accuracy']:.4f}, reward {row['reward_accuracy']:.4f}", flush=True)
    latency = {}
    for threads in args.threads:
        for batch in (1, 64):
            repeats = args.repeats * (4 if batch == 1 else 1)
            latency[f"{threads}/{batch}"] = interleaved_latency(paths, batch, threads, repeats, ws.input_shape)
            print(f"timed threads {threads} batch {batch}", flush=True)
    for row in rows:
        key = f"{row['model']} · {row['variant']}"
        own_float = f"{row['model']} · float"
        row["latency"] = {}
        for tb, result in latency.items():
            ms = result[key]["median_ms"]
            row["latency"][tb] = {**result[key], "speedup_vs_dense_float": round(result["dense · float"]["median_ms"]
                                                                                 / ms, 3),
                                  "speedup_vs_own_float": round(result[own_float]["median_ms"] / ms, 3)}
    cpu = machine.cpu_capability()
    return {"model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
            "data": ws.data.name, "test_images": len(ws.splits.test), "reward_images": len(ws.splits.reward),
            "sparsities": args.sparsities, "allocation": "lamp", "finetune_epochs": args.finetune_epochs,
            "finetune_lr": 0.01, "calibration_images": args.calibration_images, "threads": args.threads,
            "repeats_batch64": args.repeats, "repeats_batch1": args.repeats * 4,
            "weights": "int8 in ±64 (7 bits)",  # the default form; its own rows name the others
            "cpu": cpu, "cpu_description": machine.describe_cpu(cpu), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "wall_seconds": round(time.perf_counter() - started, 1),
            "command": "python benchmarks/int8.py " + " ".join(args.argv), "rows": rows}


def markdown(results: list[dict]) -> str:
    """The page: one section per CPU class's results file."""
    lines = ["# int8 on top of pruning (generated)", "",
             "Generated by `python benchmarks/int8.py` from `benchmarks/results/int8-*.json`, one section per CPU "
             "class (int8 kernels, and even int8 results, depend on it). Hand-written reading: "
             "[benchmarks.md](benchmarks.md#int8).", ""]
    for r in results:
        lines += cpu_section(r)
    return "\n".join(lines)


def cpu_section(r: dict) -> list[str]:
    lines = [
        f"## {machine.describe_cpu(r['cpu'])}", "",
        f"`{r['command']}` → `benchmarks/results/{r['results_file']}`." + (f" {r['note']}" if r.get("note") else ""),
        "",
        f"- CPU: **{machine.describe_cpu(r['cpu'])}**. onnxruntime {r['onnxruntime']}, CPU execution provider, "
        f"intra-op threads {', '.join(map(str, r['threads']))} (one table each).",
        f"- Model: `{r['model']}` on {r['data']}; pruned models: LAMP at "
        f"{', '.join(f'{s:g}' for s in r['sparsities'])}, fine-tuned {r['finetune_epochs']:g} epoch "
        f"(lr {r['finetune_lr']}), as `qlp-compress prune {r['model']} --method lamp --sparsity S "
        f"--finetune-epochs {r['finetune_epochs']:g}`.",
        f"- int8: onnxruntime static quantization (QDQ, per-channel symmetric "
        f"{r.get('weights', 'int8 (full 8 bits)')} weights, min/max calibration on {r['calibration_images']} "
        "reward-split images), uint8 activations unless the row says otherwise.",
        f"- Accuracy: test split ({r['test_images']} images; reporting only) and reward split "
        f"({r['reward_images']} images). Latency: median ms per run, all {len(r['rows'])} models timed "
        f"round-robin ({r['repeats_batch1']} runs at batch 1, {r['repeats_batch64']} at batch 64); speedup = "
        "dense float median / this median, measured in the same rounds.", ""]
    for threads in r["threads"]:
        lines += [f"### {threads} thread{'s' if threads > 1 else ''}", "",
                  "| model | form | test top-1 | reward top-1 | batch 1 ms | × dense | batch 64 ms | × dense | "
                  "× own float | file MB | gzip MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            b1, b64 = row["latency"][f"{threads}/1"], row["latency"][f"{threads}/64"]
            lines.append(f"| {row['model']} | {row['variant']} | {row['test_accuracy']:.2%} | "
                         f"{row['reward_accuracy']:.2%} | {b1['median_ms']:.3f} | "
                         f"{b1['speedup_vs_dense_float']:.2f}× | "
                         f"{b64['median_ms']:.2f} | {b64['speedup_vs_dense_float']:.2f}× | "
                         f"{b64['speedup_vs_own_float']:.2f}× | {row['bytes'] / 1e6:.3f} | "
                         f"{row['gzip_bytes'] / 1e6:.3f} |")
        lines.append("")
    lines += ["### Zeros", "", "| model | form | zero weights in float | exactly zero in int8 | rounded to zero too |",
              "|---|---|---:|---:|---:|"]
    for row in r["rows"]:
        if "zeros" in row:
            z = row["zeros"]
            lines.append(f"| {row['model']} | {row['variant']} | {z['float_zeros']:,} | all | "
                         f"{z['rounded_to_zero']:,} |")
    lines += ["", "### int8 weights as sparse_initializer", "",
              "Every int8 weight of density ≤ 1/9 (where 1 byte of value plus 8 of int64 index beats 1 byte dense) "
              "moved into `sparse_initializer` by `to_sparse_storage`:", "",
              "| model | form | layers moved | file MB (dense int8) | gzip MB (dense int8) | onnx.checker | "
              "full_check | onnxruntime: same outputs |", "|---|---|---:|---:|---:|---|---|---|"]
    for row in r["rows"]:
        if "sparse_storage" in row:
            sp = row["sparse_storage"]
            lines.append(f"| {row['model']} | {row['variant']} | {sp['layers_moved']} | {sp['bytes'] / 1e6:.3f} "
                         f"({row['bytes'] / 1e6:.3f}) | {sp['gzip_bytes'] / 1e6:.3f} ({row['gzip_bytes'] / 1e6:.3f}) | "
                         f"{_short(sp['checker_full_check_false'])} | {_short(sp['checker_full_check_true'])} | "
                         f"{'yes' if sp['onnxruntime_same_outputs'] else 'NO'} |")
    lines += ["", f"Wall time of the run: {r['wall_seconds'] / 60:.1f} min.", ""]
    return lines


def _short(check: str) -> str:
    """"fails: [ShapeInferenceError] (op_type: ..., node name: ...): WHY" → "fails: WHY"."""
    return check if check == "passes" else "fails: " + check.split("): ", 1)[-1]


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--sparsities", type=lambda t: [float(v) for v in t.split(",")], default=[0.9, 0.95])
    parser.add_argument("--finetune-epochs", type=float, default=0.3)
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--threads", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2])
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per model at batch 64 (4× at batch 1)")
    parser.add_argument("--work", type=Path, default=ROOT / "out/bench-int8")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/int8-CPUCLASS.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/benchmarks_int8.md")
    parser.add_argument("--fresh", action="store_true", help="rebuild the fine-tuned float models in --work")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite --markdown from --out")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if not args.markdown_only:
        out = args.out or RESULTS / f"int8-{cpu_class(machine.cpu_capability())}.json"
        result = run(args)
        result["results_file"] = out.name
        atomic_write_json(out, result)
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("int8-*.json"))]
    atomic_write_text(args.markdown, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
