"""Baseline per-layer sparsity allocators: uniform, global magnitude, LAMP and ERK.

Every allocator takes the dense weights of the prunable layers (name → tensor, in network order), a
global target sparsity and the settings, and returns a sparsity per layer. A layer at sparsity s loses
its `masks.pruned_count(s, n)` smallest-|w| weights. Global magnitude and LAMP choose weights one by one
and return count/n, so they remove exactly round(target·total) weights; uniform and ERK round per layer
and meet the target to within one weight per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError


@dataclass(frozen=True)
class AllocationSettings:
    """Options of the baseline allocators; each method reads only its own fields."""

    # "global" only: no layer keeps fewer than this fraction of its weights; the rest of the budget is
    # spread over the other layers by the same global threshold.
    min_density: float = 0.0
    # "erk" only: exponent on the ERK score (sum of dims / product of dims); 1.0 = the paper, 0.0 = uniform.
    erk_power_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_density <= 1.0:
            raise UsageError(f"min_density must be between 0 and 1, got {self.min_density}")
        if not (math.isfinite(self.erk_power_scale) and self.erk_power_scale >= 0.0):
            raise UsageError(f"erk_power_scale must be a finite number >= 0, got {self.erk_power_scale}")


Allocator = Callable[[Mapping[str, torch.Tensor], float, AllocationSettings], dict[str, float]]


def _check(weights: Mapping[str, torch.Tensor], sparsity: float) -> None:
    if not weights:
        raise UsageError("no prunable layers to allocate sparsity over")
    validate.sparsity(sparsity)
    for name, w in weights.items():
        if w.numel() == 0:
            raise UsageError(f"layer {name} has an empty weight tensor; there is nothing to prune in it")


def _cpu64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().flatten().to("cpu", torch.float64)


def _prune_smallest(scores: list[torch.Tensor], k: int) -> list[int]:
    """How many entries of each layer are among the k smallest scores of all layers together.

    Each layer's scores must be sorted ascending along its magnitude order, so that a count means the
    same weights the masks remove. Ties go to the earlier layer (stable sort): deterministic.
    """
    sizes = torch.tensor([len(s) for s in scores])
    layer_of = torch.repeat_interleave(torch.arange(len(scores)), sizes)
    chosen = layer_of[torch.argsort(torch.cat(scores), stable=True)[:k]]
    return torch.bincount(chosen, minlength=len(scores)).tolist()


def _min_kept(min_density: float, n: int) -> int:
    """The fewest weights out of n that keep a density of at least min_density (robust to float error)."""
    kept = min(n, math.ceil(min_density * n))
    return kept - 1 if kept > 0 and (kept - 1) / n >= min_density else kept


def uniform(weights: Mapping[str, torch.Tensor], sparsity: float, settings: AllocationSettings) -> dict[str, float]:
    """Uniform: every layer gets the target sparsity."""
    _check(weights, sparsity)
    return dict.fromkeys(weights, sparsity)


def global_magnitude(weights: Mapping[str, torch.Tensor], sparsity: float,
                     settings: AllocationSettings) -> dict[str, float]:
    """Global magnitude pruning: one threshold on |w| over all layers.

    Removes the round(sparsity·total) smallest |w| of the network, as
    `torch.nn.utils.prune.global_unstructured(..., L1Unstructured)` does; ties go to the earlier layer.
    With min_density > 0 a layer may lose at most n − ceil(min_density·n) weights. Taking the k smallest
    |w| among each layer's allowed smallest weights is the fixed point of "clamp the layers that would
    fall below min_density and recompute the threshold over the rest": one threshold t, and every layer
    pruned to min(cap, #{|w| ≤ t}).
    """
    _check(weights, sparsity)
    numels = [w.numel() for w in weights.values()]
    caps = [n - _min_kept(settings.min_density, n) for n in numels]
    total, k = sum(numels), round(sparsity * sum(numels))
    if k > sum(caps):
        reachable = math.floor(sum(caps) / total * 1e4) / 1e4  # rounded down, so it is reachable
        raise UsageError(f"sparsity {sparsity} is out of reach with min_density {settings.min_density}: "
                         f"the largest reachable sparsity is {reachable:.4f}; lower min_density or the target")
    scores = [_cpu64(w).abs().sort().values[:cap] for w, cap in zip(weights.values(), caps, strict=True)]
    counts = _prune_smallest(scores, k)
    return {name: c / n for name, c, n in zip(weights, counts, numels, strict=True)}


def lamp(weights: Mapping[str, torch.Tensor], sparsity: float, settings: AllocationSettings) -> dict[str, float]:
    """LAMP (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021).

    In each layer, with u the squared weights sorted ascending, score(u_i) = u_i / sum_{j >= i} u_j;
    the round(sparsity·total) smallest scores of all layers are removed. The largest weight of a layer
    scores 1, so every layer keeps at least one weight (unless the target leaves fewer than one per layer).
    """
    _check(weights, sparsity)
    scores = []
    for w in weights.values():
        u = _cpu64(w).square().sort().values
        tail = u.flip(0).cumsum(0).flip(0)  # tail[i] = sum of u[j] for j >= i
        score = torch.where(tail > 0, u / tail, torch.zeros_like(u))  # an all-zero tail scores 0
        # The scores rise with u in exact arithmetic; cummax keeps them so despite rounding.
        scores.append(score.cummax(0).values)
    counts = _prune_smallest(scores, round(sparsity * sum(w.numel() for w in weights.values())))
    return {name: c / w.numel() for (name, w), c in zip(weights.items(), counts, strict=True)}


def erk(weights: Mapping[str, torch.Tensor], sparsity: float, settings: AllocationSettings) -> dict[str, float]:
    """Erdős–Rényi-Kernel (Evci et al., "Rigging the Lottery", ICML 2020).

    density_l = ε·(sum of the weight's dims / product of its dims)^erk_power_scale, with ε solved so that
    the kept weights total (1 − sparsity)·total, densities capped at 1 (`proportional`).
    """
    _check(weights, sparsity)
    raw = {name: (sum(w.shape) / w.numel()) ** settings.erk_power_scale for name, w in weights.items()}
    return proportional(raw, {name: w.numel() for name, w in weights.items()}, sparsity)


def proportional(score: Mapping[str, float], numels: Mapping[str, int], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities whose densities are ε·score, capped at 1, with ε solved so that the kept weights
    total (1 − sparsity)·total. Where a density would exceed 1, the layers with the largest score are made
    dense and ε re-solved over the rest, until none does (as RigL's `get_sparsities_erdos_renyi`)."""
    total = sum(numels.values())
    dense: set[str] = set()
    while True:
        rest = [name for name in score if name not in dense]
        budget = (1.0 - sparsity) * total - sum(numels[name] for name in dense)
        eps = budget / sum(score[name] * numels[name] for name in rest)
        top = max(score[name] for name in rest)
        if eps * top <= 1.0:
            break
        dense |= {name for name in rest if score[name] == top}
    return {name: 0.0 if name in dense else 1.0 - eps * score[name] for name in score}


ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "global": global_magnitude, "lamp": lamp, "erk": erk}


def allocate(method: str, weights: Mapping[str, torch.Tensor], sparsity: float,
             settings: AllocationSettings = AllocationSettings()) -> dict[str, float]:
    """Per-layer sparsities from the named baseline allocator (see `ALLOCATORS`)."""
    if method not in ALLOCATORS:
        raise UsageError(f"unknown allocation method {method!r}; choose one of: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[method](weights, sparsity, settings)
