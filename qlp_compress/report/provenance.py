"""What a report records about how it was made: software versions and the settings, as JSON."""

from __future__ import annotations

import dataclasses
import platform
import sys
from enum import Enum
from importlib import metadata
from pathlib import Path

# distribution names to try for each reported package (onnxruntime ships as onnxruntime or onnxruntime-gpu)
PACKAGES = {"qlp-compress": ("qlp-compress",), "torch": ("torch",), "onnx": ("onnx",),
            "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
            "onnxslim": ("onnxslim",), "onnx2torch": ("onnx2torch",), "numpy": ("numpy",)}


def _module_version(name: str) -> str | None:
    module = sys.modules.get(name.replace("-", "_"))
    version = getattr(module, "__version__", None)
    return str(version) if version else None


def versions() -> dict[str, str]:
    """The versions of the tool, Python and the libraries whose behaviour shapes the results (the loaded module's
    own version first, else the installed distribution's); "unknown" where neither can be read."""
    out = {"python": platform.python_version()}
    for name, dists in PACKAGES.items():
        found = _module_version(name)
        for dist in dists:
            if found:
                break
            try:
                found = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        out[name] = found or "unknown"
    return out


def jsonable(x: object) -> object:
    """Settings (dataclasses, tuples, paths, enums) as plain JSON values."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, Enum):
        return jsonable(x.value)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def finetune_lines(tune: dict | None) -> list[str]:
    """How fine-tuning went (report.json `finetune`, from train.finetune.finetune_record): its learning rate and
    where it came from, the held-out accuracy before and at the end, and every divergence it undid; a paragraph
    and a blank line, or nothing."""
    if not tune or "lr" not in tune:
        return []
    test = tune.get("range_test") or {}
    lr = f"learning rate {tune['lr']:.3g} (--lr)"
    if tune.get("lr_from") == "range test":
        lr = (f"learning rate {tune['lr']:.3g} (range test over {len(test.get('tried', []))} learning rates, "
              f"{test.get('steps')} steps each: "
              + ("the one that lowered the loss most)" if test.get("lowered", True) else
                 "none lowered the loss: the smallest tried)"))
    parts = [f"Fine-tuning: {lr}"]
    if "start_held_out_accuracy" in tune:
        parts.append(f"held-out accuracy on {tune['held_out_images']} reward-split images the reward never measured: "
                     f"{tune['start_held_out_accuracy']:.2%} before, {tune['held_out_accuracy']:.2%} at the state "
                     f"it ended on (step {tune['ended_at_step']}, the best of {len(tune['checks'])} checks)")
    for r in tune.get("restores", []):
        then = f"went on with learning rate {r['lr']:.3g}" if r.get("lr") is not None else "stopped"
        parts.append(f"**diverged at step {r['step']}** ({r['reason']}): back to step {r['back_to_step']}, {then}")
    return ["; ".join(parts) + ".", ""]
