"""Channel mode on models unlike ResNet-20 (issue 25): the three zoo models of qlp_compress.train.zoo.UNLIKE_RESNET,
each trained briefly on Fashion-MNIST and exported the way users export, then compressed by the installed CLI with
its defaults, as a user would run it:

    qlp-compress search MODEL --data fashion-mnist --structure channel --speedup S --episodes N --finetune-epochs E

- plain_vgg: no BatchNorm, torch's TorchScript exporter (`dynamo=False`, opset 17), fixed batch of 1;
- separable: depthwise-separable convolutions, a concat and a residual, torch's default (dynamo) exporter with
  external data;
- linear_head: several Linear layers at the end, the dynamo exporter.

Each cell (model × speedup) records the exit code and the error line of a refused or failed run, or the pruned
and fine-tuned test accuracy, the predicted speedup and the measured speedups at batch 1 and 64 (onnxruntime,
interleaved with the dense model, as report.json gives them), the fine-tuning guard's events and the groups left
whole. Cells are files under --work, skipped when present (delete one to recompute it). Time it on a quiet machine:
the CLI builds a latency table, and a busy machine makes it wrong (the CLI warns).
Writes benchmarks/results/zoo.json and docs/benchmarks_zoo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.workflows import (
    DATASET_STATS,
    UNLIKE_RESNET,
    build_model,
    iterate_batches,
    load_dataset,
    make_splits,
    materialize,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = {"plain_vgg": "torchscript", "separable": "dynamo, external data", "linear_head": "dynamo"}


def trained_model(arch: str, epochs: float, work: Path) -> tuple[Path, float]:
    """`arch` trained `epochs` epochs (Adam, lr 2e-3, batch 128) on the fine-tune split, exported as EXPORTS says;
    returns the file and its test accuracy (PyTorch)."""
    path = work / f"{arch}.onnx"
    info = work / f"{arch}.json"
    if path.exists() and info.exists():
        return path, json.loads(info.read_text())["test_accuracy"]
    data = load_dataset("fashion-mnist")
    splits = make_splits(data)
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, *DATASET_STATS["fashion-mnist"])
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    steps = int(epochs * len(splits.finetune) / 128)
    generator = torch.Generator().manual_seed(0)
    model.train()
    done = 0
    while done < steps:
        for x, y in iterate_batches(splits.finetune, 128, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    x_test, y_test = materialize(data.test)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    example = (torch.rand(1, 1, 28, 28),)
    if EXPORTS[arch] == "torchscript":
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17)
    else:
        program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(path), external_data=EXPORTS[arch].endswith("external data"))
    atomic_write_json(info, {"arch": arch, "epochs": epochs, "test_accuracy": accuracy, "export": EXPORTS[arch]})
    return path, accuracy


def run_cell(model: Path, speedup: float, args: argparse.Namespace, cell: Path) -> dict:
    out = args.work / f"{model.stem}-{speedup:g}"
    command = [str(ROOT / ".venv/bin/qlp-compress"), "search", str(model), "--data", "fashion-mnist",
               "--structure", "channel", "--speedup", f"{speedup:g}", "--episodes", str(args.episodes),
               "--finetune-epochs", f"{args.finetune_epochs:g}", "--out", str(out), "--force", "--json"]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    row = {"model": model.stem, "target_speedup": speedup, "exit_code": run.returncode,
           "command": "qlp-compress " + " ".join(command[1:]).replace(str(ROOT) + "/", ""),
           "wall_seconds": round(time.perf_counter() - started, 1),
           "stderr": [line for line in run.stderr.splitlines() if line.strip()][-6:]}
    if run.returncode == 0:
        r = json.loads(run.stdout)
        row.update(accuracy=r["accuracy"], predicted_speedup=r["predicted_speedup"],
                   measured_speedup=r["measured_speedup"], left_whole=r.get("left_whole", []),
                   finetune=r.get("finetune"), latency_load=r["latency_table"].get("load_while_built"))
    atomic_write_json(cell, row)
    return row


def markdown(result: dict) -> str:
    lines = ["# Channel mode on models unlike ResNet-20 (generated)", "",
             f"Generated by `python benchmarks/zoo.py {' '.join(result['argv'])}` from `benchmarks/results/zoo.json`. "
             f"CPU: **{result['cpu']}**. Each model trained {result['train_epochs']:g} epochs (Adam) on the "
             "Fashion-MNIST fine-tune split, exported as the table says, then compressed by the CLI with its "
             "defaults (the fine-tuning learning rate from the model's range test, distillation on, the guard on).",
             "", "| model | export | dense | target | exit | pruned | fine-tuned | predicted | batch 1 | batch 64 | "
             "fine-tuning | groups left whole |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for row in result["rows"]:
        dense = f"{result['dense'][row['model']]:.2%}"
        head = (f"| {row['model']} | {EXPORTS[row['model']]} | {dense} | {row['target_speedup']:g}× | "
                f"{row['exit_code']} |")
        if row["exit_code"] != 0:
            lines.append(f"{head} — | — | — | — | — | {(row['stderr'] or [''])[-1][:160]} | — |")
            continue
        a, s = row["accuracy"], row["measured_speedup"]
        ft = row.get("finetune") or {}
        guard = f"lr {ft.get('lr', float('nan')):.3g} ({ft.get('lr_from', '?')}), {len(ft.get('restores', []))} undone"
        lines.append(f"{head} {a['pruned']:.2%} | {a['finetuned']:.2%} | {row['predicted_speedup']:.2f}× | "
                     f"{s.get('1', s.get(1, float('nan'))):.2f}× | {s.get('64', s.get(64, float('nan'))):.2f}× | "
                     f"{guard} | {len(row['left_whole'])} |")
    lines += ["", "Batch 1 and 64: dense ÷ compressed onnxruntime latency, timed interleaved by the CLI. The latency "
              "table predicts at batch 64 only; at batch 1 per-operator overhead dominates these small models.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(UNLIKE_RESNET), choices=sorted(UNLIKE_RESNET))
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--train-epochs", type=float, default=2.0)
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=ROOT / "out/bench-zoo")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    rows, dense = [], {}
    for arch in args.models:
        path, dense[arch] = trained_model(arch, args.train_epochs, args.work)
        for speedup in args.speedups:
            cell = args.work / f"cell-{arch}-{speedup:g}-e{args.episodes}-f{args.finetune_epochs:g}.json"
            row = json.loads(cell.read_text()) if cell.exists() else run_cell(path, speedup, args, cell)
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("model", "target_speedup", "exit_code", "accuracy",
                                                      "measured_speedup")}), flush=True)
    result = {"argv": sys.argv[1:], "cpu": describe_cpu(cpu_capability()), "train_epochs": args.train_epochs,
              "dense": dense, "rows": rows}
    atomic_write_json(ROOT / "benchmarks/results/zoo.json", result)
    atomic_write_text(ROOT / "docs/benchmarks_zoo.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
