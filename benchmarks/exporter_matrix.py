"""Which ONNX files from torch's exporters the tool imports: architecture × exporter × opset × external data.

For every cell the script exports a zoo architecture the way a user would (`torch.onnx.export(model, (x,), f)`:
the dynamo exporter by default, or `dynamo=False`; at the exporter's default opset or an asked one; weights in
the file or in an external data file), then checks what the issue asks of each file:

1. it imports (qlp_compress.importer.load_model, which converts it with onnx2torch);
2. the imported PyTorch module matches onnxruntime on the original file (fresh images, not the importer's own);
3. a tiny search runs on it through the CLI and its export verifies (exit code 0).

A cell that fails must fail with the tool's one-line error, which the table shows. Results go to
benchmarks/results/exporter_matrix.json and docs/onnx_import.md:

    .venv/bin/python benchmarks/exporter_matrix.py            # the full table (about 40 min on 2 busy cores;
                                                              # finished cells are cached, --fresh redoes them)
    .venv/bin/python benchmarks/exporter_matrix.py --quick    # one architecture

The tests run a representative subset of these cells (tests/test_exporters.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"lenet5": (1, 28, 28), "resnet20": (1, 28, 28), "resnet56": (1, 28, 28), "resnet18": (3, 32, 32),
         "mobilenet_v2": (3, 32, 32)}
OPSETS = (None, 13, 17, 18, 20, 21)  # None: the exporter's default
PARITY_ATOL = 1e-4  # per unit of the largest |logit| (≥ 1), as the importer checks


@dataclass(frozen=True)
class Cell:
    arch: str
    dynamo: bool
    opset: int | None
    external: bool

    @property
    def name(self) -> str:
        return (f"{self.arch}-{'dynamo' if self.dynamo else 'torchscript'}-opset{self.opset or 'default'}-"
                f"{'external' if self.external else 'embedded'}")


def export_cell(cell: Cell, folder: Path) -> Path:
    """The zoo model (random weights, fixed seed) exported as a user would: batch 1, no dynamic axes."""
    torch.manual_seed(0)
    from qlp_compress.workflows import build_model

    shape = ARCHS[cell.arch]
    model = build_model(cell.arch, shape[0], 10, (0.5,) * shape[0], (0.25,) * shape[0]).eval()
    path = folder / f"{cell.name}.onnx"
    kwargs = {} if cell.opset is None else {"opset_version": cell.opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cell.dynamo:
            torch.onnx.export(model, (torch.rand(1, *shape),), str(path), dynamo=True, external_data=cell.external,
                              verbose=False,
                              **kwargs)
        else:
            torch.onnx.export(model, (torch.rand(1, *shape),), str(path), dynamo=False, **kwargs)
            if cell.external:
                proto = onnx.load(str(path))
                onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=f"{path.name}.data", size_threshold=0)
    return path


def tiny_data(folder: Path, shape: tuple[int, ...]) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (96, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, 96)
    path = folder / f"data-{'x'.join(map(str, shape))}.npz"
    np.savez(path, x=x[:64], y=y[:64], x_test=x[64:], y_test=y[64:])
    return path


def onnxruntime_reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The original file's outputs, image by image (the file fixes batch 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def check_cell(cell: Cell, folder: Path) -> dict:
    """Export, import, parity against onnxruntime on the original file, and a tiny search through the CLI."""
    from typer.testing import CliRunner

    from qlp_compress.base.errors import QLPError, UsageError
    from qlp_compress.cli import app
    from qlp_compress.workflows import load_model

    result = {**asdict(cell), "name": cell.name}
    started = time.perf_counter()
    try:
        path = export_cell(cell, folder)
    except Exception as e:  # the exporter itself refuses (e.g. an opset it does not support)
        return {**result, "exported": False, "error": f"export failed: {type(e).__name__}: {str(e)[:160]}"}
    proto = onnx.load(str(path), load_external_data=False)
    result.update(exported=True, file_opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                  ir_version=proto.ir_version)
    shape = ARCHS[cell.arch]
    try:
        loaded = load_model(path)
    except (QLPError, UsageError) as e:
        return {**result, "imported": False, "verified": False, "error": str(e)}
    x = np.random.default_rng(1).random((4, *shape), dtype=np.float32)
    expected = onnxruntime_reference(path, x)
    with torch.no_grad():
        got = loaded.module(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - expected).max())
    result.update(imported=True, parity_max_abs_diff=diff,
                  parity=bool(diff <= PARITY_ATOL * max(1.0, float(np.abs(expected).max()))
                              and (got.argmax(1) == expected.argmax(1)).all()))
    out = folder / f"{cell.name}.out"
    run = CliRunner().invoke(app, ["search", str(path), "--data", str(tiny_data(folder, shape)), "--sparsity", "0.5",
                                   "--episodes", "2", "--stages", "1", "--reward-images", "16", "--reward-size", "16",
                                   "--bn-recalibrate", "0", "--finetune-epochs", "0", "--no-sparse-storage",
                                   "--demonstrations", "none", "--out", str(out), "--force"])
    result["verified"] = run.exit_code == 0 and (out / "model.onnx").is_file()
    if not result["verified"]:
        lines = (run.output or "").splitlines()
        result["error"] = next((line for line in lines if line.startswith("error:")), repr(run.exception))[:300]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def all_cells(archs: list[str]) -> list[Cell]:
    return [Cell(a, d, o, e) for a in archs for d in (True, False) for o in OPSETS for e in (False, True)]


def markdown(results: list[dict]) -> str:
    def mark(r: dict) -> str:
        if not r.get("exported"):
            return "not exported"
        if r.get("imported") and r.get("parity") and r.get("verified"):
            return f"✓ (opset {r['file_opset']})"
        return "✗ " + ("imported, " if r.get("imported") else "") + r.get("error", "")[:120]

    lines = ["# ONNX files from torch's exporters: what imports", "",
             f"Generated by `benchmarks/exporter_matrix.py` (torch {torch.__version__}, onnx {onnx.__version__}). ",
             "Each cell: the zoo architecture exported as a user would (batch 1, no dynamic axes), then imported "
             "(onnx2torch, with the tool's graph rewrites), checked against onnxruntime on the original file, and "
             "run through a tiny `search` whose export must verify. ✓ means all three passed; the opset is the "
             "file's own (the dynamo exporter writes at least 18).", "",
             "| architecture | exporter | asked opset | weights | result |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arch']} | {'dynamo' if r['dynamo'] else 'TorchScript'} | {r['opset'] or 'default'} | "
                     f"{'external data' if r['external'] else 'in the file'} | {mark(r)} |")
    passed = sum(1 for r in results if r.get("verified") and r.get("parity"))
    lines += ["", f"{passed} of {len(results)} cells pass."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only resnet20")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--fresh", action="store_true", help="recompute cells cached in benchmarks/cells/")
    args = parser.parse_args()
    archs = ["resnet20"] if args.quick else args.archs.split(",")
    results = []
    cache = ROOT / "benchmarks" / "cells" / "exporter_matrix"  # one JSON per finished cell: a rerun skips it
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for cell in all_cells(archs):
            cached = cache / f"{cell.name}.json"
            if cached.exists() and not args.fresh:
                results.append(json.loads(cached.read_text()))
                continue
            folder = Path(tmp) / cell.name
            folder.mkdir()
            r = check_cell(cell, folder)
            cached.write_text(json.dumps(r, indent=1) + "\n")
            results.append(r)
            status = "ok" if r.get("verified") and r.get("parity") else "FAIL " + r.get("error", "")[:150]
            print(f"{cell.name}: {status}", flush=True)
    if not args.quick:
        out = ROOT / "benchmarks" / "results" / "exporter_matrix.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        (ROOT / "docs" / "onnx_import.md").write_text(markdown(results))
    return 0 if all(r.get("verified") and r.get("parity") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
