"""The baseline allocators, each checked against its definition or an independent reference."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from qlp_compress.base.errors import UsageError
from qlp_compress.pruning.allocate import ALLOCATORS, AllocationSettings, allocate
from qlp_compress.pruning.masks import MagnitudePruner, global_sparsity, pruned_count

TARGETS = [0.5, 0.9, 0.98]


def make_model(tiny_scale: float = 1.0) -> nn.ModuleDict:
    """Conv, depthwise conv, conv, linear, linear; the last layer's weights multiplied by tiny_scale."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv1": nn.Conv2d(3, 8, 3), "dw": nn.Conv2d(8, 8, 3, groups=8),
                           "conv2": nn.Conv2d(8, 16, 3), "fc": nn.Linear(64, 10), "head": nn.Linear(10, 3)})
    with torch.no_grad():
        model["head"].weight.mul_(tiny_scale)
    return model


def weights_of(model: nn.ModuleDict) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in model.items()}


def counts(sparsities: dict[str, float], weights: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: pruned_count(sparsities[name], w.numel()) for name, w in weights.items()}


def smallest_kept(min_density: float, n: int) -> int:
    return next(m for m in range(n + 1) if m / n >= min_density)


def test_uniform_gives_every_layer_the_target() -> None:
    weights = weights_of(make_model())
    assert allocate("uniform", weights, 0.7) == dict.fromkeys(weights, 0.7)


@pytest.mark.parametrize("target", TARGETS)
def test_global_matches_torch_global_unstructured(target: float) -> None:
    model = make_model()
    result = allocate("global", weights_of(model), target)
    pruner = MagnitudePruner(model)
    masks = pruner.masks(result)
    prune.global_unstructured([(m, "weight") for m in model.values()], pruning_method=prune.L1Unstructured,
                              amount=target)
    for name, m in model.items():
        assert pruned_count(result[name], m.weight.numel()) == int((m.weight_mask == 0).sum())
        assert torch.equal(masks[name], m.weight_mask.bool())


def lamp_reference(weights: dict[str, torch.Tensor], target: float) -> dict[str, int]:
    """LAMP by the paper's formula with plain Python loops: the k smallest scores over all layers."""
    scored = []
    for name, w in weights.items():
        u = sorted(float(x) ** 2 for x in w.flatten())
        tail = 0.0
        for i in reversed(range(len(u))):
            tail += u[i]
            scored.append((u[i] / tail, name))
    scored.sort()
    k = round(target * sum(w.numel() for w in weights.values()))
    out = dict.fromkeys(weights, 0)
    for _, name in scored[:k]:
        out[name] += 1
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_lamp_matches_reference(target: float) -> None:
    weights = weights_of(make_model())
    assert counts(allocate("lamp", weights, target), weights) == lamp_reference(weights, target)


def test_lamp_keeps_the_largest_weight_of_every_layer() -> None:
    weights = weights_of(make_model(tiny_scale=1e-3))
    # Global magnitude empties the down-scaled layer, so keeping a weight there is LAMP's doing.
    assert counts(allocate("global", weights, 0.98), weights)["head"] == weights["head"].numel()
    for name, c in counts(allocate("lamp", weights, 0.98), weights).items():
        assert c < weights[name].numel(), name


def test_lamp_tolerates_an_all_zero_layer() -> None:
    weights = weights_of(make_model())
    weights["head"] = torch.zeros_like(weights["head"])
    result = allocate("lamp", weights, 0.5)
    assert all(math.isfinite(s) for s in result.values())
    assert result["head"] == 1.0  # zeros score 0 and go first


def erk_score(w: torch.Tensor, power: float) -> float:
    return (sum(w.shape) / math.prod(w.shape)) ** power


def erk_reference_densities(weights: dict[str, torch.Tensor], target: float, power: float) -> dict[str, float]:
    """Densities min(1, ε·score) with ε found by bisection so the kept weights total (1 − target)·total."""
    total = sum(w.numel() for w in weights.values())

    def kept(eps: float) -> float:
        return sum(min(1.0, eps * erk_score(w, power)) * w.numel() for w in weights.values())

    lo, hi = 0.0, 1.0
    while kept(hi) < (1 - target) * total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < (1 - target) * total else (lo, mid)
    return {name: min(1.0, hi * erk_score(w, power)) for name, w in weights.items()}


@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("target", TARGETS)
def test_erk_follows_its_definition(target: float, power: float) -> None:
    weights = weights_of(make_model())
    result = allocate("erk", weights, target, AllocationSettings(erk_power_scale=power))
    density = {name: 1 - s for name, s in result.items()}
    assert all(0 < d <= 1 for d in density.values())
    free = [name for name, d in density.items() if d < 1]
    for a in free:
        for b in free:
            ratio = erk_score(weights[a], power) / erk_score(weights[b], power)
            assert density[a] / density[b] == pytest.approx(ratio, rel=1e-9)
    # Dense layers are the ones with the largest scores (made dense first).
    for name in set(density) - set(free):
        assert all(erk_score(weights[name], power) >= erk_score(weights[f], power) for f in free)
    total = sum(w.numel() for w in weights.values())
    kept = sum(density[name] * w.numel() for name, w in weights.items())
    assert kept == pytest.approx((1 - target) * total, abs=1e-6)
    reference = erk_reference_densities(weights, target, power)
    assert density == pytest.approx(reference, rel=1e-9)


def test_erk_makes_a_small_layer_dense_and_resolves_the_rest() -> None:
    weights = {"conv": weights_of(make_model())["conv2"], "tiny": torch.ones(2, 2)}  # tiny scores 1: ε ≫ 1
    result = allocate("erk", weights, 0.5)
    assert result["tiny"] == 0.0
    total = weights["conv"].numel() + 4
    assert 1 - result["conv"] == pytest.approx((0.5 * total - 4) / weights["conv"].numel())


def test_erk_power_zero_is_uniform() -> None:
    weights = weights_of(make_model())
    result = allocate("erk", weights, 0.9, AllocationSettings(erk_power_scale=0.0))
    assert result == pytest.approx(dict.fromkeys(weights, 0.9))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", sorted(ALLOCATORS))
def test_every_method_meets_the_global_target(method: str, target: float) -> None:
    weights = weights_of(make_model())
    numels = {name: w.numel() for name, w in weights.items()}
    result = allocate(method, weights, target)
    assert list(result) == list(weights)
    assert all(0.0 <= s <= 1.0 for s in result.values())
    pruned = global_sparsity(result, numels) * sum(numels.values())
    assert abs(pruned - target * sum(numels.values())) <= len(weights)
    if method in ("global", "lamp"):
        assert round(pruned) == round(target * sum(numels.values()))


def global_min_density_reference(weights: dict[str, torch.Tensor], target: float, min_density: float) -> dict[str, int]:
    """The iterative rule: clamp layers that fall below min_density, recompute the threshold over the rest."""
    k = round(target * sum(w.numel() for w in weights.values()))
    clamped: dict[str, int] = {}
    while True:
        free = [name for name in weights if name not in clamped]
        pool = sorted((float(x), i, name) for i, name in enumerate(free) for x in weights[name].abs().flatten())
        out = dict.fromkeys(free, 0)
        for _, _, name in pool[: k - sum(clamped.values())]:
            out[name] += 1
        over = [name for name in free
                if weights[name].numel() - out[name] < smallest_kept(min_density, weights[name].numel())]
        if not over:
            return out | clamped
        for name in over:
            clamped[name] = weights[name].numel() - smallest_kept(min_density, weights[name].numel())


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_global_min_density_is_respected_and_the_target_met(target: float) -> None:
    weights = weights_of(make_model(tiny_scale=1e-3))
    min_density = 0.05
    result = counts(allocate("global", weights, target, AllocationSettings(min_density=min_density)), weights)
    assert result == global_min_density_reference(weights, target, min_density)
    for name, c in result.items():
        assert (weights[name].numel() - c) / weights[name].numel() >= min_density
    assert result["head"] == weights["head"].numel() - smallest_kept(min_density, weights["head"].numel())
    assert sum(result.values()) == round(target * sum(w.numel() for w in weights.values()))


def test_global_min_density_out_of_reach_names_the_largest_reachable_sparsity() -> None:
    weights = weights_of(make_model())
    settings = AllocationSettings(min_density=0.5)
    with pytest.raises(UsageError, match="largest reachable sparsity") as info:
        allocate("global", weights, 0.9, settings)
    reachable = float(re.search(r"largest reachable sparsity is ([0-9.]+)", str(info.value)).group(1))
    allocate("global", weights, reachable, settings)
    with pytest.raises(UsageError):
        allocate("global", weights, reachable + 1e-3, settings)


def test_unknown_method_names_the_valid_ones() -> None:
    with pytest.raises(UsageError) as info:
        allocate("magic", weights_of(make_model()), 0.5)
    assert all(name in str(info.value) for name in ALLOCATORS)


@pytest.mark.parametrize("method", sorted(ALLOCATORS))
@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_target_outside_open_unit_interval_is_refused(method: str, target: float) -> None:
    with pytest.raises(UsageError):
        allocate(method, weights_of(make_model()), target)


def test_bad_settings_and_empty_input_are_refused() -> None:
    for kwargs in ({"min_density": -0.1}, {"min_density": 1.5}, {"erk_power_scale": -1.0}):
        with pytest.raises(UsageError):
            AllocationSettings(**kwargs)
    with pytest.raises(UsageError):
        allocate("global", {}, 0.5)
