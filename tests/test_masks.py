"""Prunable-layer discovery, magnitude masks and sparsity accounting, against torch.nn.utils.prune."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from qlp_compress.base.errors import QLPError
from qlp_compress.pruning.masks import (
    MagnitudePruner,
    apply_masks,
    check_finite,
    find_prunable_layers,
    global_sparsity,
    layer_sparsity,
    pruned_count,
)


def make_model(seed: int = 0) -> nn.Sequential:
    """Conv, BatchNorm, depthwise conv, conv, linear, linear: random float weights (no ties in |w|)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise, 72 weights
        nn.Conv2d(8, 6, 1, bias=False),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 13), nn.ReLU(), nn.Linear(13, 5),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight))
    return model


PRUNABLE = ["0", "3", "4", "6", "8"]


def modules_of(model: nn.Module) -> dict[str, nn.Module]:
    return {layer.name: layer.module for layer in find_prunable_layers(model)}


def no_ties(model: nn.Module) -> None:
    for m in modules_of(model).values():
        w = m.weight.detach().abs().flatten()
        assert len(torch.unique(w)) == len(w)


SPARSITY_SETS = [
    {"0": 0.5, "3": 0.3, "4": 0.9, "6": 0.75, "8": 0.1},
    {"0": 0.0, "3": 1.0, "4": 0.51, "6": 0.999, "8": 0.5},  # the ends, and rounding of .5 counts
    dict.fromkeys(PRUNABLE, 0.37),
]


@pytest.mark.parametrize("sparsities", SPARSITY_SETS)
def test_masks_equal_l1_unstructured(sparsities: dict[str, float]) -> None:
    model = make_model()
    no_ties(model)
    masks = MagnitudePruner(model).masks(sparsities)
    assert list(masks) == PRUNABLE
    for name, module in modules_of(model).items():
        reference = copy.deepcopy(module)
        prune.l1_unstructured(reference, "weight", amount=sparsities[name])
        expected = reference.weight_mask.bool()
        assert masks[name].dtype == torch.bool and masks[name].shape == module.weight.shape
        assert torch.equal(masks[name], expected), name
        assert int((~masks[name]).sum()) == pruned_count(sparsities[name], module.weight.numel())


def torch_global_masks(model: nn.Module, amount: float) -> dict[str, torch.Tensor]:
    reference = copy.deepcopy(model)
    modules = modules_of(reference)
    prune.global_unstructured([(m, "weight") for m in modules.values()], pruning_method=prune.L1Unstructured,
                              amount=amount)
    return {name: m.weight_mask.bool() for name, m in modules.items()}


@pytest.mark.parametrize("amount", [0.2, 0.6, 0.93])
def test_global_threshold_reproduced_by_per_layer_counts(amount: float) -> None:
    model = make_model(seed=1)
    no_ties(model)
    expected = torch_global_masks(model, amount)
    numels = {name: m.weight.numel() for name, m in modules_of(model).items()}
    counts = {name: int((~keep).sum()) for name, keep in expected.items()}
    assert len(set(counts.values())) > 1  # the global threshold really gives layers different sparsities
    sparsities = {name: counts[name] / numels[name] for name in numels}
    masks = MagnitudePruner(model).masks(sparsities)
    for name in PRUNABLE:
        assert torch.equal(masks[name], expected[name]), name
    total = sum(numels.values())
    assert global_sparsity(sparsities, numels) == sum(counts.values()) / total
    assert sum(counts.values()) == round(amount * total)


def test_apply_zeroes_in_place_and_restore_brings_back_dense() -> None:
    model = make_model(seed=2)
    modules = modules_of(model)
    dense = {name: m.weight.detach().clone() for name, m in modules.items()}
    storage = {name: m.weight.data_ptr() for name, m in modules.items()}
    pruner = MagnitudePruner(model)
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".weight") or
              k.split(".")[0] not in modules}

    for sparsities in SPARSITY_SETS:  # each apply starts again from the dense weights, never compounds
        pruner.apply(sparsities)
        masks = pruner.masks(sparsities)
        for name, m in modules.items():
            assert m.weight.data_ptr() == storage[name]  # in place
            assert torch.equal(m.weight.detach(), dense[name] * masks[name])
            assert torch.equal(m.weight.detach() == 0, ~masks[name])  # zero exactly where pruned
        sparsity = layer_sparsity(model)
        for name in PRUNABLE:
            assert sparsity[name] == int((~masks[name]).sum()) / modules[name].weight.numel()
        numels = {name: m.weight.numel() for name, m in modules.items()}
        zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
        assert global_sparsity(sparsities, numels) == zeros / sum(numels.values())

    pruner.restore()
    for name, m in modules.items():
        assert m.weight.data_ptr() == storage[name]
        assert torch.equal(m.weight.detach(), dense[name])
    state = model.state_dict()
    for key, value in others.items():  # biases and BatchNorm untouched throughout
        assert torch.equal(state[key], value), key


def test_apply_masks_matches_pruner_apply() -> None:
    sparsities = SPARSITY_SETS[0]
    a, b = make_model(seed=3), make_model(seed=3)
    MagnitudePruner(a).apply(sparsities)
    apply_masks(b, MagnitudePruner(b).masks(sparsities))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_layer_sparsity_counts_exact_zeros() -> None:
    model = make_model()
    modules = modules_of(model)
    with torch.no_grad():
        modules["3"].weight.view(-1)[:10] = 0
        modules["8"].weight.zero_()
    sparsity = layer_sparsity(model)
    assert sparsity == {"0": 0.0, "3": 10 / 72, "4": 0.0, "6": 0.0, "8": 1.0}


def test_global_sparsity_counts_whole_weights() -> None:
    numels = {"a": 10, "b": 30}
    # 0.25·10 = 2.5 rounds to 2 (as round() and torch.prune do); 0.5·30 = 15
    assert global_sparsity({"a": 0.25, "b": 0.5}, numels) == (2 + 15) / 40
    assert global_sparsity({"a": 1.0, "b": 0.0}, numels) == 10 / 40
    assert pruned_count(1.2, 10) == 10 and pruned_count(-0.1, 10) == 0


class Everything(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3)
        self.bn1 = nn.BatchNorm1d(4)
        self.c2 = nn.Conv2d(3, 6, 3)
        self.dw = nn.Conv2d(6, 6, 3, groups=6)
        self.bn2 = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 3, 2, stride=2)
        self.norm = nn.LayerNorm(5)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(5, 7))
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(7, 2, bias=False)


def test_find_prunable_layers_finds_every_conv_and_linear() -> None:
    model = Everything()
    layers = find_prunable_layers(model)
    assert [layer.name for layer in layers] == ["c1", "c2", "dw", "up", "block.1", "head"]
    assert [layer.numel for layer in layers] == [24, 162, 54, 72, 35, 14]
    assert all(layer.weight is layer.module.weight for layer in layers)
    # a depthwise conv is found as such and its masks work like any other
    pruner = MagnitudePruner(model)
    masks = pruner.masks(dict.fromkeys(pruner.names, 0.5))
    reference = copy.deepcopy(model.dw)
    prune.l1_unstructured(reference, "weight", amount=0.5)
    assert torch.equal(masks["dw"], reference.weight_mask.bool())


def test_model_without_prunable_layers_raises() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.LayerNorm(4), nn.Flatten())
    with pytest.raises(QLPError, match="no prunable layer"):
        find_prunable_layers(model)
    with pytest.raises(QLPError, match="no prunable layer"):
        MagnitudePruner(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["4.weight", "1.bias", "6.bias"])
def test_check_finite(bad: float, where: str) -> None:
    model = make_model()
    check_finite(model)  # a healthy model passes
    with torch.no_grad():
        dict(model.named_parameters())[where].view(-1)[1] = bad
    with pytest.raises(QLPError, match=where.replace(".", r"\.")):
        check_finite(model)
