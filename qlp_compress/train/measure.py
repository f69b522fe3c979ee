"""Measurements on a trained model that are not training: top-1 accuracy over batches, and BatchNorm statistics
re-estimated after pruning."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model` (in eval mode) over the batches."""
    model.eval()
    correct = seen = 0
    for x, y in batches:  # labels already on the GPU (the reward's) stay there: one sync per batch, no copies
        predicted = model(x.to(device)).argmax(1)
        correct += int((predicted == y.to(predicted.device)).sum())
        seen += len(y)
    return correct / max(1, seen)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate BatchNorm running statistics from the batches (cumulative average), then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the given batches
    model.train()
    for x in batches:
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()
