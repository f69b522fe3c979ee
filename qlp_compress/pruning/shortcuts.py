"""Rewrite parameter-free channel maps (option-A shortcuts) into fixed 0/1 strided 1×1 convolutions.

A CIFAR ResNet's option-A shortcut is a strided slice followed by zero channel padding. Torch-Pruning
cannot follow channels through a Pad, so the residual stream it carries could not be pruned (pruning it
crashed the next forward pass). Any chain of parameter-free operations that maps channels linearly and
subsamples space by an integer stride is equal to a 1×1 convolution with stride s and a 0/1 weight. We
find such chains in the model's fx graph by probing them (not by matching op names, so the zoo's
`F.pad(x[:, :, ::2, ::2], ...)` and onnx2torch's Slice + Pad modules are found alike), check the
replacement gives identical outputs on random input, and swap it in. The convolution is a
`FixedChannelMap`: never trained (requires_grad False), never scored for importance, but its input and
output channels are pruned with the groups they belong to.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class FixedChannelMap(nn.Conv2d):
    """A 1×1 strided convolution with a fixed 0/1 weight: a channel gather/zero-pad plus spatial subsampling."""

    def __init__(self, weight: torch.Tensor, stride: int):
        out_channels, in_channels = weight.shape[:2]
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)
        with torch.no_grad():
            self.weight.copy_(weight.view(out_channels, in_channels, 1, 1))
        self.freeze()

    def freeze(self) -> None:
        self.weight.requires_grad_(False)


def freeze_channel_maps(model: nn.Module) -> None:
    """Pruning replaces parameters (with requires_grad True): freeze every FixedChannelMap again."""
    for m in model.modules():
        if isinstance(m, FixedChannelMap):
            m.freeze()


class _LeafTracer(fx.Tracer):
    """Every module without children is a leaf (onnx2torch's operators keep their Python inside)."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return super().is_leaf_module(m, qualified_name) or next(m.children(), None) is None


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's tensor inputs other than constants (get_attr: onnx2torch's initializers)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _parameter_free(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return next(module.parameters(), None) is None
    return node.op in ("call_function", "call_method")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _probe(run, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[torch.Tensor, int] | None:
    """The (weight, stride) of the 1×1 convolution that `run` equals on inputs of `in_shape`, else None."""
    _, c_in, h, w = in_shape
    _, c_out, h2, w2 = out_shape
    stride = (h + h2 - 1) // h2 if h2 else 0
    if not stride or (h + stride - 1) // stride != h2 or (w + stride - 1) // stride != w2:
        return None
    with torch.no_grad():
        basis = torch.eye(c_in).view(c_in, c_in, 1, 1).expand(c_in, c_in, h, w).contiguous()
        try:
            columns = run(basis)  # channel c on everywhere → column c of the weight at every sampled pixel
        except Exception:
            return None
        if tuple(columns.shape) != (c_in, c_out, h2, w2):
            return None
        weight = columns[:, :, 0, 0].T.contiguous()  # (c_out, c_in)
        if not torch.all((weight == 0) | (weight == 1)):
            return None
        x = torch.randn(2, c_in, h, w, generator=torch.Generator().manual_seed(0))
        conv = nn.functional.conv2d(x, weight.view(c_out, c_in, 1, 1), stride=stride)
        if not torch.equal(run(x), conv):
            return None
    return weight, stride


def run_node(graph_module: fx.GraphModule, modules: dict[str, nn.Module], node: fx.Node, values: dict) -> object:
    """Run one node of the graph on the given values of its input nodes (constants are read from the module)."""

    def load(a: fx.Node):
        if a in values:
            return values[a]
        if a.op == "get_attr":
            obj = graph_module
            for part in a.target.split("."):
                obj = getattr(obj, part)
            return obj
        return a

    args = fx.node.map_arg(node.args, load)
    kwargs = fx.node.map_arg(node.kwargs, load)
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _chain_function(chain: list[fx.Node], modules: dict[str, nn.Module], graph_module: fx.GraphModule):
    """A callable replaying `chain` (each node feeds the next) on a new input tensor."""

    def run(x: torch.Tensor) -> torch.Tensor:
        values: dict[fx.Node, object] = {}
        current = x
        for node in chain:
            values[_data_inputs(node)[0]] = current
            current = values[node] = run_node(graph_module, modules, node, values)
        return current

    return run


def _traced_copy(model: nn.Module, example: torch.Tensor) -> fx.GraphModule | None:
    """A copy of the model as a GraphModule whose nodes carry their shapes; None when it cannot be traced."""
    try:
        gm = fx.GraphModule(model, _LeafTracer().trace(model))
        ShapeProp(gm).propagate(example)
    except Exception:
        return None
    return copy.deepcopy(gm)


def _finish_exact(gm: fx.GraphModule, model: nn.Module, example: torch.Tensor) -> bool:
    """Clean up and recompile the rewritten graph; whether it computes exactly what the model does."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    with torch.no_grad():
        x = torch.rand(2, *example.shape[1:], generator=torch.Generator().manual_seed(1))
        return torch.equal(gm(x), model.eval()(x))


def rewrite_channel_maps(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """(model with every parameter-free channel map replaced by a FixedChannelMap, names of the new maps).

    The model comes back unchanged (same object) when it cannot be traced or has no such map. The rewritten
    model is a GraphModule; its outputs equal the original's exactly (checked)."""
    gm = _traced_copy(model, example)
    if gm is None:
        return model, []
    modules = dict(gm.named_modules())
    replaced: list[str] = []
    for end in list(gm.graph.nodes):
        if end.op not in ("call_module", "call_function", "call_method") or not _parameter_free(end, modules):
            continue
        if len(_data_inputs(end)) != 1:
            continue
        out_shape, in_shape = _shape(end), _shape(_data_inputs(end)[0])
        if out_shape is None or in_shape is None or len(out_shape) != 4 or len(in_shape) != 4 \
                or out_shape[1] == in_shape[1]:
            continue  # only chains that change the channel count block the dependency graph
        chain = [end]  # extend backwards over single-input, single-user parameter-free nodes
        while True:
            prev = _data_inputs(chain[0])[0]
            if prev.op not in ("call_module", "call_function", "call_method") or len(prev.users) != 1 \
                    or not _parameter_free(prev, modules) or len(_data_inputs(prev)) != 1 \
                    or _shape(_data_inputs(prev)[0]) is None or len(_shape(_data_inputs(prev)[0])) != 4:
                break
            chain.insert(0, prev)
        while chain:  # the longest chain that is a strided 1×1 convolution
            source = _data_inputs(chain[0])[0]
            found = _probe(_chain_function(chain, modules, gm), _shape(source), out_shape)
            if found is not None:
                break
            chain = chain[1:]
        if not chain:
            continue
        weight, stride = found
        name = f"qlp_channel_map_{len(replaced)}"
        gm.add_module(name, FixedChannelMap(weight, stride))
        with gm.graph.inserting_before(chain[0]):
            conv = gm.graph.call_module(name, (source,))
        end.replace_all_uses_with(conv)
        for node in reversed(chain):
            gm.graph.erase_node(node)
        replaced.append(name)
        modules = dict(gm.named_modules())
    if not replaced or not _finish_exact(gm, model, example):
        return model, []  # never change what the model computes
    return gm, replaced


def rewrite_flattens(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """(model with every reshape that flattens an (N, C, H, W) tensor into (N, C·H·W) replaced by
    `torch.flatten(x, 1)`, how many were replaced).

    An ONNX file stores `x.flatten(1)` as a Reshape to a constant shape such as [-1, 512]. Torch-Pruning maps the
    channels through it, but the constant stays, so pruning the last convolution broke the forward pass and its
    group was left whole. `torch.flatten` follows the pruned width. Found by probing each single-input node (its
    output must equal `torch.flatten` exactly); the model comes back unchanged (same object) when there is none
    or the rewrite would change an output."""
    gm = _traced_copy(model, example)
    if gm is None:
        return model, 0
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method") or node.target is torch.flatten \
                or not _parameter_free(node, modules) or len(_data_inputs(node)) != 1:
            continue
        source = _data_inputs(node)[0]
        in_shape, out_shape = _shape(source), _shape(node)
        if in_shape is None or out_shape is None or len(in_shape) != 4 \
                or out_shape != (in_shape[0], in_shape[1] * in_shape[2] * in_shape[3]):
            continue
        x = torch.randn(2, *in_shape[1:], generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                same = torch.equal(_chain_function([node], modules, gm)(x), torch.flatten(x, 1))
        except Exception:
            same = False
        if not same:
            continue
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_function(torch.flatten, (source, 1))
        node.replace_all_uses_with(flat)
        gm.graph.erase_node(node)
        count += 1
    if not count or not _finish_exact(gm, model, example):
        return model, 0
    return gm, count
