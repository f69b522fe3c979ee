"""Channel groups of a model (Torch-Pruning's DepGraph) and pruning them to given widths.

A group is a set of coupled channels: removing channel k of the group removes output channel k of every
layer that writes it (convolutions, BatchNorm; in a ResNet, every block writing the residual stream) and
input channel k of every layer that reads it. The classifier's outputs never form a group.

Before grouping, parameter-free channel maps (option-A shortcuts) are rewritten into FixedChannelMaps, and
reshapes that flatten into `torch.flatten` (see shortcuts.py). Every group is then try-pruned alone on a copy, the
copy run forward, and its outputs compared with the model whose pruned channels write zeros (`_silenced`); a group
that fails or differs (a pad, slice, reshape or concat the library mishandles) is left whole and listed in
`unsafe`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency.group import Group

from qlp_compress.base.errors import QLPError
from qlp_compress.pruning.depth import ResidualBlock, drop_blocks, find_blocks
from qlp_compress.pruning.masks import refuse_wrapped
from qlp_compress.pruning.shortcuts import FixedChannelMap, freeze_channel_maps, rewrite_channel_maps, rewrite_flattens

CRITERIA = ("l1", "bn")  # how channels are ranked inside a group: filter L1 norm, or BatchNorm |scale|


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable group of coupled channels."""

    name: str  # the module whose output channels root the group (its first trained Conv/Linear)
    size: int  # channels in the dense model
    layers: tuple[str, ...]  # modules whose output channels belong to the group
    l1: tuple[float, ...]  # per-channel importance: mean-normalised group L1 filter norm (Torch-Pruning)
    bn: tuple[float, ...] | None  # per-channel mean |BatchNorm scale| over the group's BatchNorms, or None

    def order(self, criterion: str) -> list[int]:
        """Channel indices, least important first (stable)."""
        scores = self.bn if criterion == "bn" and self.bn is not None else self.l1
        return sorted(range(self.size), key=lambda i: (scores[i], i))


@dataclass(frozen=True)
class LayerShape:
    """A Conv2d or Linear layer as the latency table sees it."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    depthwise: bool  # groups == in_channels == out_channels
    in_hw: tuple[int, ...]  # spatial size of its input (empty for Linear)
    in_group: int | None  # the group its input channels belong to (None: fixed)
    out_group: int | None  # the group its output channels belong to (None: fixed)


def _root_name(group: Group, names: dict[nn.Module, str]) -> str:
    return names[group[0].dep.target.module]


class ChannelSpace:
    """The groups of a model and the means to prune them to given widths; with `depth`, also its removable
    residual blocks (pruning.depth).

    An allocation over the space is a list of *units*: one width per group (1 … its channels), then, with depth,
    one keep flag per block (1 kept, 0 dropped). A block is a unit of size 1, so a sparsity of 1 drops it.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, depth: bool = False, width: bool = True):
        refuse_wrapped(model)
        self.example = example[:1].detach().cpu()
        source = copy.deepcopy(model).cpu().eval()
        self.model, self.channel_maps = rewrite_channel_maps(source, self.example)
        self.model, _ = rewrite_flattens(self.model, self.example)
        with torch.no_grad():
            self.output_shape = tuple(self.model(self.example).shape)
        self.unsafe: list[tuple[str, str]] = []  # (group, why it is left whole)
        graph = self._graph(self.model)
        names = {m: n for n, m in self.model.named_modules()}
        candidates = list(graph.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear))) if width else []
        groups, roots = [], []
        for group in candidates:
            root = _root_name(group, names)
            size = len(group[0].idxs)
            reason = self._try_prune(root, size)
            if reason == "output":
                continue  # the classifier's outputs
            layers = tuple(dict.fromkeys(names[d.target.module] for d, _ in group
                                         if graph.is_out_channel_pruning_fn(d.handler) and d.target.module in names))
            trained = [n for n in layers if isinstance(self.model.get_submodule(n), nn.modules.conv._ConvNd | nn.Linear)
                       and not isinstance(self.model.get_submodule(n), FixedChannelMap)]
            label = trained[0] if trained else root
            if reason is not None:
                self.unsafe.append((label, reason))
                continue
            if size < 2:
                continue
            groups.append(ChannelGroup(label, size, layers, *self._importance(group)))
            roots.append(root)
        position = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        ordered = sorted(zip(groups, roots, strict=True), key=lambda gr: position.get(gr[0].name, len(position)))
        self.groups = [g for g, _ in ordered]  # network order
        self._roots = [r for _, r in ordered]
        self.layers = self._layer_shapes(graph, names)
        self.blocks: list[ResidualBlock] = find_blocks(self.model, self.example) if depth else []

    # ------------------------------------------------------------------------------------- building

    def _graph(self, model: nn.Module) -> tp.DependencyGraph:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=self.example, verbose=False)

    def _try_prune(self, root: str, size: int) -> str | None:
        """None when pruning half of the group (at least one channel, never all) keeps the model running with
        its output shape; "output" when it changes the output shape; else why it fails."""
        if size < 2:
            return None
        trial = copy.deepcopy(self.model)
        try:
            graph = self._graph(trial)
            names = {m: n for n, m in trial.named_modules()}
            module = trial.get_submodule(root)
            group = graph.get_pruning_group(module, _out_fn(module), list(range(size // 2)))
            writers = [(names[i.dep.target.module], list(i.idxs)) for i in group.items
                       if graph.is_out_channel_pruning_fn(i.dep.handler) and i.dep.target.module in names]
            group.prune()
            with torch.no_grad():
                pruned = trial(self.example)
        except Exception as e:  # the library mishandled an op in the group
            return f"pruning it breaks the model ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        if tuple(pruned.shape) != self.output_shape:
            return "output"
        with torch.no_grad():
            reference = _silenced(self.model, writers)(self.example)
        if not torch.allclose(pruned, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()) + 1e-6):
            return ("pruning it changes what the other channels compute (an operation the library maps wrongly, "
                    "such as a concat or reshape it does not know)")
        return None

    @staticmethod
    def _importance(group: Group) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """(L1 importance, BatchNorm-scale importance or None) of each channel; FixedChannelMaps never count."""
        trained = Group()
        trained._DG = group._DG
        for item in group.items:
            if not isinstance(item.dep.layer, FixedChannelMap):
                trained._group.append(item)
        size = len(group[0].idxs)
        l1 = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")(trained)
        l1_scores = tuple(float(v) for v in l1) if l1 is not None else (1.0,) * size
        bn = tp.importance.BNScaleImportance(normalizer=None)(trained)
        bn_scores = tuple(float(v) for v in bn) if bn is not None else None
        return l1_scores, bn_scores

    def _layer_shapes(self, graph: tp.DependencyGraph, names: dict[nn.Module, str]) -> list[LayerShape]:
        in_group: dict[str, int] = {}
        out_group: dict[str, int] = {}
        for index, root in enumerate(self._roots):
            module = self.model.get_submodule(root)
            for dep, _ in graph.get_pruning_group(module, _out_fn(module), list(range(self.groups[index].size))):
                name = names.get(dep.target.module)
                if name is None:
                    continue
                if graph.is_out_channel_pruning_fn(dep.handler):
                    out_group[name] = index
                elif graph.is_in_channel_pruning_fn(dep.handler):
                    in_group[name] = index
        inputs: dict[str, tuple[int, ...]] = {}

        def record(name: str):
            def hook(module, args, output) -> None:
                inputs.setdefault(name, tuple(args[0].shape))
            return hook

        hooks = [m.register_forward_hook(record(n)) for n, m in self.model.named_modules()
                 if isinstance(m, nn.Conv2d | nn.Linear)]
        with torch.no_grad():
            self.model(self.example)
        for h in hooks:
            h.remove()
        shapes = []
        for name, shape in inputs.items():
            m = self.model.get_submodule(name)
            if isinstance(m, nn.Conv2d):
                depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                if m.groups > 1 and not depthwise:
                    continue  # grouped convolutions: timed with the rest of the model
                if isinstance(m.padding, str) or m.padding_mode != "zeros":
                    continue  # timed with the rest of the model
                shapes.append(LayerShape(name, "conv", m.in_channels, m.out_channels, tuple(m.kernel_size),
                                         tuple(m.stride), tuple(m.padding), tuple(m.dilation), depthwise,
                                         tuple(shape[2:]), out_group.get(name) if depthwise else in_group.get(name),
                                         out_group.get(name)))
            else:
                if len(shape) != 2:
                    continue
                shapes.append(LayerShape(name, "linear", m.in_features, m.out_features, (), (), (), (), False, (),
                                         in_group.get(name), out_group.get(name)))
        return shapes

    # ------------------------------------------------------------------------------------- pruning

    @property
    def sizes(self) -> list[int]:
        """The channels of each group."""
        return [g.size for g in self.groups]

    @property
    def unit_sizes(self) -> list[int]:
        """The size of each unit: the groups' channels, then 1 per block."""
        return self.sizes + [1] * len(self.blocks)

    def units_from(self, sparsities: Sequence[float]) -> list[int]:
        """The units of per-unit sparsities: a group keeps at least one channel; a block is kept below 0.5."""
        n = len(self.groups)
        if len(sparsities) not in (n, n + len(self.blocks)):
            raise QLPError(f"{len(sparsities)} sparsities for {n} channel groups and {len(self.blocks)} blocks")
        widths = [max(1, round(size * (1.0 - s))) for size, s in zip(self.sizes, sparsities[:n], strict=True)]
        return widths + [0 if s >= 0.5 else 1 for s in sparsities[n:]]

    def dropped(self, units: Sequence[int]) -> list[str]:
        """The names of the blocks `units` drops."""
        return [b.name for b, keep in zip(self.blocks, units[len(self.groups):], strict=False) if not keep]

    def prune(self, widths: Sequence[int], criterion: str = "l1", orders: Sequence[Sequence[int]] | None = None
              ) -> nn.Module:
        """A copy of the (rewritten) model with group i cut to widths[i] channels, dropping its least
        important channels by `criterion` (or by the given per-group `orders`), then without the blocks whose
        keep flag (after the widths) is 0. Checked by a forward pass."""
        if len(widths) not in (len(self.groups), len(self.groups) + len(self.blocks)):
            raise QLPError(f"{len(widths)} widths for {len(self.groups)} channel groups; the policy belongs to "
                           "another model")
        dropped = self.dropped(widths)
        widths = widths[: len(self.groups)]
        model = copy.deepcopy(self.model)
        graph = self._graph(model)
        for index, (group, root, width) in enumerate(zip(self.groups, self._roots, widths, strict=True)):
            if not 1 <= width <= group.size:
                raise QLPError(f"group {group.name} cannot keep {width} of its {group.size} channels")
            if width == group.size:
                continue
            order = orders[index] if orders is not None else group.order(criterion)
            module = model.get_submodule(root)
            graph.get_pruning_group(module, _out_fn(module), list(order[: group.size - width])).prune()
        freeze_channel_maps(model)
        if dropped:
            model = drop_blocks(model.eval(), self.example, dropped, found=self.blocks)
        with torch.no_grad():
            shape = tuple(model.eval()(self.example).shape)
        if shape != self.output_shape:
            raise QLPError(f"the pruned network outputs shape {list(shape)} instead of {list(self.output_shape)}; "
                           "rerun with --debug and report it")
        return model


def _silenced(model: nn.Module, writers: Sequence[tuple[str, Sequence[int]]]) -> nn.Module:
    """A copy of the model in which the given output channels of each layer are exactly zero (weight and bias rows
    of convolutions and Linear layers; scale and shift of BatchNorms). Removing those channels, when the library
    maps every consumer's input channels correctly, computes the same outputs: the reference `_try_prune` checks
    the pruned model against."""
    silent = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, idxs in writers:
            layer = silent.get_submodule(name)
            for tensor in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[0] > max(idxs, default=-1):
                    tensor[list(idxs)] = 0
    return silent


def _out_fn(module: nn.Module):
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_conv_out_channels


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one image and parameters (Torch-Pruning's counter)."""
    macs, params = tp.utils.count_ops_and_params(model.eval(), example[:1])
    return int(macs), int(params)
