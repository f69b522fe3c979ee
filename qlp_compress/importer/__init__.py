"""Turn a user's model file into a torch module the tool can prune and fine-tune.

Accepted: ONNX graphs (converted with onnx2torch and checked against onnxruntime), TorchScript files
(exported to ONNX and converted the same way, so that their Conv/Linear layers become ordinary modules),
whole pickled `nn.Module`s (only with `trust_pickle`: unpickling runs code from the file) and state dicts
of a zoo architecture (`arch`). Every failure is a QLPError or UsageError with a one-line message.

May import: base, deploy, train.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import check_file_size
from qlp_compress.importer.from_onnx import batch_free, graph_io, load_onnx
from qlp_compress.importer.from_pytorch import load_pytorch, load_torchscript
from qlp_compress.importer.model import LoadedModel, Request
from qlp_compress.importer.onnx2torch_compat import unsupported_operators
from qlp_compress.importer.onnx_file import read_onnx

__all__ = ["LoadedModel", "batch_free", "graph_io", "load_model", "read_onnx", "sniff", "unsupported_operators"]


def load_model(path: Path, arch: str | None = None, trust_pickle: bool = False, num_classes: int | None = None,
               in_channels: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, verify_input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Load `path` (ONNX, TorchScript, a pickled nn.Module or a state dict of zoo architecture `arch`).

    `mean`/`std` fold a normalisation into the front of the module; `verify_input_shape` (C, H, W) is the
    image shape the conversion is checked on when the file does not fix it."""
    path = Path(path)
    if not path.exists():
        raise QLPError(f"{path} does not exist; check the model path")
    if not path.is_file():
        raise QLPError(f"{path} is not a file; give the path of the model file")
    check_file_size(path, "model")
    if (mean is None) != (std is None):
        raise UsageError("--mean and --std go together; give both (one value per input channel)")
    if std is not None and not all(math.isfinite(s) and s > 0 for s in std):
        raise UsageError(f"--std must be finite numbers above zero, got {list(std)}; e.g. --std 0.353")
    if mean is not None and not all(math.isfinite(m) for m in mean):
        raise UsageError(f"--mean must be finite numbers, got {list(mean)}; e.g. --mean 0.286")
    request = Request(path, arch, trust_pickle, num_classes, in_channels,
                       tuple(map(float, mean)) if mean is not None else None,
                       tuple(map(float, std)) if std is not None else None,
                       tuple(verify_input_shape) if verify_input_shape is not None else None)
    return LOADERS[sniff(path)](request)


def sniff(path: Path) -> str:
    """"torchscript", "pytorch" (torch.save: a zip or a legacy pickle) or "onnx" (anything else)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise QLPError(f"{path} cannot be read ({e.strerror}); check its permissions") from e
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise QLPError(f"{path} is a damaged zip (PyTorch) file; save the model again") from e
        return "torchscript" if any(n.split("/")[-1] == "constants.pkl" for n in names) else "pytorch"
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy (non-zip) format
        return "pytorch"
    return "onnx"


LOADERS: dict[str, Callable[[Request], LoadedModel]] = {
    "onnx": load_onnx,
    "torchscript": load_torchscript,
    "pytorch": load_pytorch,
}
