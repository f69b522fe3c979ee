"""Depth: residual blocks that can be removed whole, found in the model's fx graph and dropped from it.

A residual block computes `shortcut(x) + branch(x)`. When the shortcut has no trainable parameters (an identity,
or an option-A channel map: a strided slice plus zero padding, or the FixedChannelMap it is rewritten into), the
block can be removed by keeping only `shortcut(x)`. That removes operators, not just channels, which is what
makes small networks faster once width stops paying (per-operator overhead dominates narrow layers).

Blocks are found by structure, not by name: a node that adds two tensors of its own shape (checked by running it,
so onnx2torch's Add modules, `torch.add` and `+` are found alike), whose two sides meet at one input `x`, where
one side holds parameters and is used by nothing else (the branch) and the other is parameter-free. A block whose
shortcut is a trained 1×1 convolution (torchvision's `downsample`) is not removable: its output is not the
shortcut alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qlp_compress.base.errors import QLPError
from qlp_compress.base.names import clean_path
from qlp_compress.pruning.shortcuts import (
    FixedChannelMap,
    _data_inputs,
    _LeafTracer,
    _parameter_free,
    _shape,
    run_node,
)


@dataclass(frozen=True)
class ResidualBlock:
    """A removable block: `name` for people (the module path its layers share), the fx node names of its sum,
    its branch (removed with it) and the node whose value replaces the sum."""

    name: str
    add: str
    branch: tuple[str, ...]
    shortcut: str
    parameters: int  # trainable parameters removed with the branch
    modules: tuple[str, ...] = ()  # module paths of the branch's layers (what the latency table stops timing)
    shape: tuple[int, ...] = ()  # the sum's output shape: blocks of one stage share it


def stages(blocks: list[ResidualBlock]) -> list[list[int]]:
    """Indices of the blocks, grouped into stages: runs of consecutive blocks whose sums have one shape (channels
    and resolution), which is how a ResNet's stages are drawn."""
    grouped: list[list[int]] = []
    for i, block in enumerate(blocks):
        if grouped and blocks[grouped[-1][-1]].shape[1:] == block.shape[1:]:
            grouped[-1].append(i)
        else:
            grouped.append([i])
    return grouped


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The model as a GraphModule whose nodes carry their output shapes (a copy; the model is not changed)."""
    try:
        gm = fx.GraphModule(model, _LeafTracer().trace(model))
        ShapeProp(gm).propagate(example)
    except Exception as e:
        raise QLPError(f"the model cannot be traced into a graph, so its residual blocks cannot be found "
                       f"({type(e).__name__}: {str(e)[:120]}); depth pruning needs a model without "
                       "data-dependent control flow") from e
    return copy.deepcopy(gm)


def _is_sum(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` adds its two data inputs (run on random tensors of their shapes and compared with `+`)."""
    inputs = _data_inputs(node)
    if node.op not in ("call_module", "call_function", "call_method") or not _parameter_free(node, modules) \
            or len(inputs) != 2 or inputs[0] is inputs[1]:
        return False
    shape = _shape(node)
    if shape is None or any(_shape(a) != shape for a in inputs):
        return False
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(shape, generator=g) for _ in inputs)
    try:
        with torch.no_grad():
            out = run_node(gm, modules, node, {inputs[0]: x, inputs[1]: y})
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and torch.allclose(out, x + y, atol=1e-6)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for a in _data_inputs(stack.pop()):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _trainable(nodes: set[fx.Node], modules: dict[str, nn.Module]) -> int:
    return sum(p.numel() for n in nodes if n.op == "call_module" for p in modules[n.target].parameters()
               if p.requires_grad and not isinstance(modules[n.target], FixedChannelMap))


def _block_name(branch: set[fx.Node], fallback: str) -> str:
    paths = [clean_path(n.target).split(".") for n in branch if n.op == "call_module"]
    common: list[str] = []
    for parts in zip(*paths, strict=False) if paths else ():
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or fallback


def _as_block(gm: fx.GraphModule, add: fx.Node, modules: dict[str, nn.Module]) -> ResidualBlock | None:
    a, b = _data_inputs(add)
    sides = {}
    for one, other in ((a, b), (b, a)):
        reach = _ancestors(one) | {one}
        sides[one] = reach - (_ancestors(other) | {other})
    for branch_end, short_end in ((a, b), (b, a)):
        branch, short = sides[branch_end], sides[short_end]
        entries = {x for n in branch for x in _data_inputs(n) if x not in branch}
        if len(entries) != 1 or not branch:
            continue
        (entry,) = entries
        if short and {x for n in short for x in _data_inputs(n) if x not in short} != {entry}:
            continue
        if not short and short_end is not entry:
            continue
        if any(u not in branch and u is not add for n in branch for u in n.users):
            continue  # something else reads the branch: removing it would change that too
        if _trainable(short, modules):
            continue
        parameters = _trainable(branch, modules)
        if parameters == 0:
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        ordered = sorted(branch, key=order.__getitem__)
        return ResidualBlock(_block_name(branch, add.name), add.name, tuple(n.name for n in ordered), short_end.name,
                             parameters, tuple(n.target for n in ordered if n.op == "call_module"),
                             _shape(add) or ())
    return None


def find_blocks(model: nn.Module, example: torch.Tensor) -> list[ResidualBlock]:
    """The model's removable residual blocks, in graph order. A block inside another block's branch is left out:
    the outer one is the unit (dropping both would remove the inner one twice)."""
    gm = trace(model, example)
    modules = dict(gm.named_modules())
    blocks = []
    for node in gm.graph.nodes:
        if _is_sum(gm, node, modules):
            block = _as_block(gm, node, modules)
            if block is not None:
                blocks.append(block)
    inner = {b.add for b in blocks for outer in blocks if b is not outer and b.add in outer.branch}
    return [b for b in blocks if b.add not in inner]


def drop_blocks(model: nn.Module, example: torch.Tensor, names: list[str] | tuple[str, ...],
                found: list[ResidualBlock] | None = None) -> fx.GraphModule:
    """A copy of the model without the named blocks: each block's sum is replaced by its shortcut's output and its
    branch is deleted, parameters and all. Raises QLPError for a name that is not a removable block. `found`: the
    model's blocks when already known (ChannelSpace's, found once on the model its pruned copies share the graph
    of), which saves finding them again on every reward."""
    blocks = {b.name: b for b in (found if found is not None else find_blocks(model, example))}
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise QLPError(f"not removable residual blocks: {', '.join(unknown)}; the model's are: "
                       f"{', '.join(blocks) or 'none'}")
    gm = trace(model, example)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in names:
        block = blocks[name]
        add = nodes[block.add]
        add.replace_all_uses_with(nodes[block.shortcut])
        gm.graph.erase_node(add)
        for node_name in reversed(block.branch):
            gm.graph.erase_node(nodes[node_name])
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
