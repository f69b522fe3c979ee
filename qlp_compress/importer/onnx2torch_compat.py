"""What onnx2torch needs besides itself: converters for operator versions it lacks (routed to the previous
version's converter where the two compute the same on float tensors), and MatMul/Gemm weights turned into
nn.Linear so that the pruner finds them. Used by qlp_compress.importer only; imports no other project module."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx
import torch
from torch import fx, nn

if TYPE_CHECKING:  # onnx2torch (and the torchvision it imports) loads on the first conversion, not on import
    from onnx2torch.onnx_node import OnnxNode


def unsupported_operators(proto: onnx.ModelProto) -> list[str]:
    """Operator types in `proto` that onnx2torch's converter registry has no converter for."""
    from onnx2torch.node_converters import get_converter

    _register_compat_converters()
    versions = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}
    missing = set()
    for node in proto.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            get_converter(node.op_type, versions.get(domain, 1), domain)
        except NotImplementedError:
            missing.add(f"{domain}.{node.op_type}" if domain else node.op_type)
    return sorted(missing)


def linear_from_matmul(module: fx.GraphModule) -> None:
    """Turn onnx2torch's MatMul (and Gemm it left generic) with a constant 2-D weight into nn.Linear, folding a
    following Add of a constant bias: the weight must be a module parameter for the pruner to find it."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
    from onnx2torch.node_converters.gemm import OnnxGemm
    from onnx2torch.node_converters.matmul import OnnxMatMul

    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        op = module.get_submodule(node.target)
        args = [*node.args, *node.kwargs.values()]
        if isinstance(op, OnnxMatMul) and len(args) == 2:
            weight, bias, scale = _constant(module, args[1]), None, 1.0
        elif isinstance(op, OnnxGemm) and not op.trans_a and len(args) in (2, 3):
            weight, scale = _constant(module, args[1]), op.alpha
            weight = weight.T if weight is not None and op.trans_b else weight
            bias = _constant(module, args[2]) if len(args) == 3 else None
            if len(args) == 3 and bias is None:
                continue
        else:
            continue
        if weight is None or weight.ndim != 2 or _constant(module, args[0]) is not None:
            continue
        out_features = weight.shape[1]
        if bias is not None:
            if bias.numel() != out_features or bias.shape[-1] != out_features:
                continue
            bias = bias.reshape(-1) * op.beta
        users = list(node.users)
        add = users[0] if len(users) == 1 and bias is None else None
        if add is not None and add.op == "call_module" and not add.kwargs and len(add.args) == 2:
            add_op = module.get_submodule(add.target)
            other = add.args[1] if add.args[0] is node else add.args[0]
            candidate = _constant(module, other)
            if (isinstance(add_op, OnnxBinaryMathOperation) and add_op.math_op_function is torch.add
                    and add_op.broadcast is None and candidate is not None
                    and candidate.numel() == out_features and candidate.shape[-1] == out_features):
                bias = candidate.reshape(-1)
            else:
                add = None
        else:
            add = None
        linear = nn.Linear(weight.shape[0], out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.T * scale)
            if bias is not None:
                linear.bias.copy_(bias)
        module.add_submodule(node.target, linear)
        node.args, node.kwargs = (args[0],), {}
        if add is not None:
            add.replace_all_uses_with(node)
            graph.erase_node(add)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        used = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name, _ in list(module.named_buffers()):
            if name.startswith("initializers.") and name not in used:
                delattr(module.get_submodule("initializers"), name.split(".", 1)[1])
        module.recompile()


def _constant(module: fx.GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor behind an fx argument that reads a stored constant, else None."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(arg.target, str)):
        return None
    value: object = module
    for part in arg.target.split("."):
        value = getattr(value, part, None)
    return value.detach().float() if isinstance(value, torch.Tensor) else None


# ------------------------------------------------------------------------------- onnx2torch compatibility


def _axes_input_to_attribute(node: OnnxNode, graph) -> OnnxNode:
    """Reduce* of opset 18 reads its axes from an input; the opset-13 converter wants an attribute."""
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import get_const_value

    def unsupported(why: str) -> NotImplementedError:
        return NotImplementedError(f"Converter is not implemented (operation_type='{node.operation_type}', "
                                   f"version=18: {why})")

    axes: list[int] = []
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in torch.as_tensor(get_const_value(node.input_values[1], graph)).flatten()]
        except KeyError as e:
            raise unsupported("axes computed in the graph") from e
    if not axes and node.attributes.get("noop_with_empty_axes", 0):  # the identity, which opset 13 cannot say
        raise unsupported("noop_with_empty_axes")
    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    del proto.input[1:]
    if axes:
        proto.attribute.append(onnx.helper.make_attribute("axes", axes))
    return OnnxNode(proto, unique_name=node.unique_name)


def _all_ones(name: str) -> Callable:
    return lambda node: all(v == 1 for v in node.attributes.get(name, [1]))


# Operator versions of opsets 16–21 that onnx2torch 1.5 has no converter for, although the previous version's
# converter computes the same thing on float tensors (the new version added types, or an input or attribute
# that the node leaves at its default). Each entry: operator, versions, the condition a node must meet (or a
# rewrite into the previous version's form). Whatever is converted is still checked against onnxruntime.
_SAME = None
_COMPAT: tuple[tuple[str, tuple[int, ...], Callable | None], ...] = (
    *((op, versions, _SAME) for op, versions in (
        ("Cast", (19, 21)), ("Constant", (19, 21)), ("ConstantOfShape", (20, 21)), ("Equal", (19,)),
        ("Flatten", (21,)), ("GreaterOrEqual", (16,)), ("LessOrEqual", (16,)), ("Identity", (19, 21)),
        ("IsInf", (20,)), ("IsNaN", (20,)), ("Reshape", (19, 21)), ("Shape", (19, 21)), ("Transpose", (21,)),
        ("Unsqueeze", (21,)), ("Split", (18,)))),
    ("AveragePool", (19,), _all_ones("dilations")),
    ("Pad", (18,), lambda node: len(node.input_values) < 4 or not node.input_values[3]),
    ("Pad", (19,), lambda node: node.attributes.get("mode", "constant") != "wrap"),
    ("Pad", (21,), _SAME),
    ("Resize", (18,), lambda node: not node.attributes.get("antialias", 0) and "axes" not in node.attributes
     and node.attributes.get("keep_aspect_ratio_policy", "stretch") == "stretch"),
    ("Resize", (19,), lambda node: node.attributes.get("coordinate_transformation_mode") != "half_pixel_symmetric"),
    ("ScatterND", (18,), lambda node: node.attributes.get("reduction", "none") not in ("max", "min")),
    *((op, (18,), _axes_input_to_attribute) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSumSquare")),
    ("ReduceMax", (20,), _SAME),
    ("ReduceMin", (20,), _SAME),
)


def _activation(make: Callable[[OnnxNode], nn.Module]) -> Callable:
    """A converter for an elementwise activation that torch has as a module."""

    def convert(node, graph):
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

        return OperationConverterResult(make(node), onnx_mapping_from_node(node))

    return convert


# Activations that became single operators in recent opsets (the exporter's default, 20, writes GELU as Gelu)
# and that onnx.version_converter cannot take back to an older opset.
_NEW_ACTIVATIONS: dict[tuple[str, int], Callable] = {
    ("Gelu", 20): _activation(lambda node: nn.GELU(approximate=node.attributes.get("approximate", "none"))),
    ("Mish", 18): _activation(lambda node: nn.Mish()),
}


@functools.cache
def _register_compat_converters() -> None:
    """Route the operator versions in _COMPAT to the previous version's converter, and add _NEW_ACTIVATIONS,
    through onnx2torch's own registry (add_converter); what a newer onnx2torch converts itself is left alone."""
    from onnx2torch.node_converters.registry import add_converter, get_converter

    def has(op: str, version: int) -> bool:
        try:
            get_converter(op, version)
            return True
        except NotImplementedError:
            return False

    for (op, version), converter in _NEW_ACTIVATIONS.items():
        if not has(op, version):
            add_converter(op, version)(converter)
    for op, versions, rule in sorted(_COMPAT, key=lambda entry: entry[1]):
        for version in versions:
            if has(op, version):
                continue
            previous = next((v for v in range(version - 1, 0, -1) if has(op, v)), None)
            if previous is not None:
                add_converter(op, version)(_compat_converter(op, version, get_converter(op, previous), rule))


def _compat_converter(op: str, version: int, previous: Callable, rule: Callable | None) -> Callable:
    def convert(node, graph):
        if rule is not None:
            result = rule(node) if rule is not _axes_input_to_attribute else rule(node, graph)
            if result is False:
                raise NotImplementedError(f"Converter is not implemented (operation_type='{op}', version={version}: "
                                          "it uses a feature of that version)")
            if result is not True:
                node = result
        return previous(node, graph)

    return convert

