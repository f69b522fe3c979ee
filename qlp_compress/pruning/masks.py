"""Prunable layers, magnitude masks and sparsity accounting.

A layer pruned to sparsity s loses its round(s·n) smallest-|w| weights, as in
`torch.nn.utils.prune.l1_unstructured`. Each layer's magnitude order is computed once, from the dense
weights, so that applying a new sparsity costs a copy and a scatter, never a sort.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qlp_compress.base.errors import QLPError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)


@dataclass(frozen=True)
class PrunableLayer:
    """The weight tensor of one Conv or Linear module (never its bias)."""

    name: str  # module path inside the model, e.g. "1.layers.0.conv1"
    module: nn.Module

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def refuse_wrapped(model: nn.Module) -> None:
    """Pruning comes before DDP: a module already wrapped in DistributedDataParallel is refused. DDP records its
    parameters' shapes and gradient hooks when it wraps, so a model pruned under it (channels removed) trains other
    tensors than it synchronises, and the ranks' shapes drift apart (the size mismatches and hangs Torch-Pruning's and
    NNI's users met). Prune, then hand the model to train.distributed.fit, which wraps it inside the training loop."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise QLPError("the model is already wrapped in DistributedDataParallel; prune it before wrapping (pass the "
                       "pruned model to fine-tuning, which wraps it for DDP itself)")


def find_prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every Conv (any kind, depthwise included) and Linear module with a weight, in module order."""
    refuse_wrapped(model)
    layers = [PrunableLayer(name, m) for name, m in model.named_modules()
              if isinstance(m, PRUNABLE_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        raise QLPError("the model has no prunable layer (Conv or Linear/Gemm weights); nothing to compress")
    return layers


def pruned_count(sparsity: float, numel: int) -> int:
    """How many weights a layer of `numel` weights loses at `sparsity` (the rounding torch.prune uses)."""
    return min(numel, max(0, round(sparsity * numel)))


class MagnitudePruner:
    """Holds the dense weights and magnitude order of every prunable layer and prunes them in place."""

    def __init__(self, model: nn.Module):
        self.layers = find_prunable_layers(model)
        self.dense = [layer.weight.detach().clone() for layer in self.layers]
        self.order = [w.abs().flatten().argsort(stable=True) for w in self.dense]  # ascending |w|
        self.numels = [layer.numel for layer in self.layers]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def masks(self, sparsities: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Boolean keep-masks (True = kept) for the given per-layer sparsities."""
        out = {}
        for layer, dense, order in zip(self.layers, self.dense, self.order, strict=True):
            keep = torch.ones(dense.numel(), dtype=torch.bool, device=dense.device)
            keep[order[: pruned_count(sparsities[layer.name], dense.numel())]] = False
            out[layer.name] = keep.view_as(dense)
        return out

    @torch.no_grad()
    def apply(self, sparsities: Mapping[str, float]) -> None:
        """Set every layer to its dense weights with its smallest weights zeroed (in place, no copies)."""
        for layer, dense, order in zip(self.layers, self.dense, self.order, strict=True):
            w = layer.weight
            w.copy_(dense)
            w.view(-1)[order[: pruned_count(sparsities[layer.name], dense.numel())]] = 0

    @torch.no_grad()
    def restore(self) -> None:
        for layer, dense in zip(self.layers, self.dense, strict=True):
            layer.weight.copy_(dense)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the weights outside the masks (masks from `MagnitudePruner.masks`)."""
    refuse_wrapped(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            modules[name].weight.mul_(keep.to(modules[name].weight.device))


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each prunable layer's weight."""
    return {layer.name: float((layer.weight == 0).sum()) / layer.numel for layer in find_prunable_layers(model)}


def global_sparsity(sparsities: Mapping[str, float], numels: Mapping[str, int]) -> float:
    """Fraction of all prunable weights removed, counting whole weights per layer."""
    total = sum(numels.values())
    return sum(pruned_count(sparsities[name], n) for name, n in numels.items()) / total


def check_finite(model: nn.Module) -> None:
    """Refuse weights with NaN or inf: magnitude order and accuracy mean nothing for them."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise QLPError(f"parameter {name} holds NaN or inf values; re-export the model from a healthy checkpoint")
