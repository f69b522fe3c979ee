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
