"""Layer names a user recognises, the same in every file and display (report.md/json, policy.json, sparsity.png,
`evaluate`).

The name of a prunable layer is its user's own: the module path in the original PyTorch model (`layers.0.conv1`).
An ONNX file exported from PyTorch keeps it in the weight's initializer name (`layers.0.conv1.weight`); where the
exporter renamed the weight (`onnx::Conv_193`) the node name holds the module scope (`/layers/layers.0/conv1/Conv`).
onnx2torch, which imports ONNX graphs, names its modules after the nodes with dots turned into slashes
(`layers/layers/0/conv1/Conv`); those module paths stay internal. Exports written by the tool name each weight
`<name>.weight`, so `evaluate` on them shows the names the run's reports show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

SEARCH_METHODS = ("qlp", "random")  # how a search chooses (search/curriculum.py); a policy.json's method is one of
# these or a baseline allocator's name (pruning/allocate.py). Here, below both, so that pruning needs no search.
STRUCTURES = ("weight", "channel", "depth", "channel,depth")  # what a run removes: unstructured weights, channels,
# residual blocks, or channels and blocks together (the last three share one pipeline: workflows/channels.py)
OP_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Linear", "Conv2d", "Conv1d", "Conv3d"})
_EXPORTER_PREFIXES = ("onnx::",)
_QUANTIZED_SUFFIXES = ("_quantized", "_DequantizeLinear", "_QuantizeLinear")


def structure_name(text: str) -> str:
    """The canonical spelling of a --structure value: parts in STRUCTURES' order ("depth,channel" → "channel,depth");
    an unknown spelling comes back as it is, for the caller's check to name."""
    parts = {p.strip() for p in text.split(",") if p.strip()}
    return next((s for s in STRUCTURES if set(s.split(",")) == parts), text)


def structure_parts(structure: str) -> tuple[bool, bool]:
    """(whether the structure narrows channel groups, whether it drops residual blocks)."""
    parts = structure.split(",")
    return "channel" in parts, "depth" in parts


def is_structured(structure: str) -> bool:
    """Whether the structure removes whole channels or blocks (a smaller, faster network), not single weights."""
    return structure != "weight"


def _is_op(part: str) -> bool:
    return re.sub(r"_\d+$", "", part) in OP_TYPES


def clean_path(path: str) -> str:
    """A module path from an exporter's or converter's spelling of it: `/1/layers/layers.0/conv1/Conv` (a
    torch.onnx node scope) and `1/layers/layers/0/conv1/Conv` (an onnx2torch module) both give
    `1.layers.0.conv1`. The operator type at the end is dropped, and a scope part that repeats or extends the
    one before it (`layers` then `layers.0`) replaces it."""
    parts = [p for p in path.split("/") if p]
    while len(parts) > 1 and _is_op(parts[-1]):
        parts.pop()
    out: list[str] = []
    for part in parts:
        if out and (part == out[-1] or part.startswith(out[-1] + ".")):
            out[-1] = part
        else:
            out.append(part)
    return ".".join(out) if out else path


def layer_name(weight: str | None = None, node: str | None = None) -> str:
    """The readable name of the layer whose weight initializer is `weight`, computed by node `node` (either may
    be unknown). The weight's own name wins when it is a module path plus `.weight`; then the node's scope."""
    w = weight or ""
    for suffix in _QUANTIZED_SUFFIXES:
        w = w.removesuffix(suffix)
    if w.endswith(".weight") and not w.startswith(_EXPORTER_PREFIXES) and len(w) > len(".weight"):
        base = w[: -len(".weight")]
        return clean_path(base) if "/" in base else base
    if node:
        return clean_path(node)
    if w and not w.startswith(_EXPORTER_PREFIXES):
        return clean_path(w) if "/" in w else w
    return weight or node or "?"


def unique(names: Sequence[str], fallbacks: Sequence[str]) -> list[str]:
    """`names`, except that any name given to two layers is replaced by that layer's fallback (its module path):
    a name must identify one layer."""
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [n if seen[n] == 1 else f for n, f in zip(names, fallbacks, strict=True)]


def onnx_layer_names(weights: Sequence[str], nodes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Weight initializer name → readable name for the weights of one ONNX graph (`nodes`: weight → node name)."""
    nodes = nodes or {}
    names = [layer_name(w, nodes.get(w)) for w in weights]
    return dict(zip(weights, unique(names, list(weights)), strict=True))
