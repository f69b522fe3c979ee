"""Depth as units of the structured search: a block is a unit of size 1 (kept or dropped) beside the channel
groups; pruning to units equals narrowing the groups and then zeroing the dropped blocks' branches; the latency
table removes a dropped block's layers; the reward scores exactly that network; the game and the depth baseline
reach targets that width alone cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import trained_looking

from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.depth import stages, trace
from qlp_compress.pruning.latency import LatencySettings, LatencyTable, calibration_units
from qlp_compress.pruning.widths import allocate_widths, speedup_to_target
from qlp_compress.reward.channels import ChannelReward, ChannelRewardSettings
from qlp_compress.search.channel_env import ChannelEnv
from qlp_compress.search.env import EnvSettings
from qlp_compress.train.zoo import build_model

X = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def space() -> ChannelSpace:
    torch.manual_seed(0)
    return ChannelSpace(trained_looking(build_model("resnet20", 1, 4, (0.5,), (0.25,))), X, depth=True)


def _known_table(space: ChannelSpace, round_to: int = 8) -> LatencyTable:
    """A table whose entries are a known cost (in × out channels × kernel area) and no untimed rest."""
    settings = LatencySettings(batch=2, threads=1, round_to=round_to, repeats=1)

    def cost(key: str) -> float:
        _, cin, cout, kernel, *_ = json.loads(key)
        return 1e-3 * cin * cout * (int(np.prod(kernel)) if kernel else 1)

    keys = {LatencyTable._key(layer, a, b) for layer in space.layers
            for a, b in LatencyTable._points(layer, space.sizes, round_to)}
    data = {"settings": vars(settings), "entries": {k: cost(k) for k in keys}, "calibration": [],
            "rewrite": {"dense_ms": 1.0, "pruned_ms": 1.0, "pruned_min_ms": 0.0, "speedup": 1.0}}
    return LatencyTable(space, data)


def test_blocks_are_units_after_the_groups(space):
    assert len(space.blocks) == 9 and stages(space.blocks) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert space.unit_sizes == space.sizes + [1] * 9
    sparsities = [0.5] * len(space.sizes) + [0.0, 1.0, 0.49, 0.5, 0, 0, 0, 0, 0.9]
    units = space.units_from(sparsities)
    assert units[len(space.sizes):] == [1, 0, 1, 0, 1, 1, 1, 1, 0]
    assert space.dropped(units) == [space.blocks[i].name for i in (1, 3, 8)]
    assert ChannelSpace(space.model, X).blocks == []  # depth is looked for only when asked


def test_pruning_to_units_equals_narrowing_then_zeroing_the_dropped_branches(space):
    widths = [max(1, n // 2) for n in space.sizes]
    keep = [1, 0, 1, 1, 0, 1, 1, 1, 0]
    pruned = space.prune(widths + keep)
    narrowed = space.prune(widths)  # the same channels removed, every block kept
    reference = trace(narrowed, X[:1])
    nodes = {n.name: n for n in reference.graph.nodes}
    for block, k in zip(space.blocks, keep, strict=True):
        if not k:  # the branch's last node writes zeros: the sum passes the shortcut alone
            end = nodes[block.branch[-1]]
            reference.get_submodule(end.target).register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    with torch.no_grad():
        assert torch.allclose(pruned(X), reference(X), atol=1e-5)
        assert not torch.allclose(pruned(X), narrowed(X), atol=1e-3)
    removed = sum(p.numel() for p in narrowed.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert removed > 0


def test_the_table_drops_a_blocks_layers_and_reaches_further(space):
    table = _known_table(space)
    full = table.sizes
    assert full == space.unit_sizes and all(a == [0, 1] for a in table.allowed[len(space.sizes):])
    for i, block in enumerate(space.blocks):
        units = list(full)
        units[len(space.sizes) + i] = 0
        layers = [layer for layer in space.layers if layer.name in block.modules]
        assert len(layers) == 2  # a basic block's two convolutions
        assert table.predict_ms(units) == pytest.approx(
            table.predict_ms(full) - sum(table._layer_ms(layer, full) for layer in layers), rel=1e-12)
    widths_only = table.speedup([a[0] for a in table.allowed[: len(space.sizes)]] + [1] * 9)
    assert table.max_speedup() > widths_only
    assert table.snap(len(space.sizes), 0.49) == 0 and table.snap(len(space.sizes), 0.5) == 1
    points = calibration_units(space, 8)
    assert len(points) == 8 and points[-1][len(space.sizes):] == [0] * 9  # depth calibration points


def test_the_depth_baseline_drops_the_same_share_of_every_stage(space):
    table = _known_table(space)
    units = allocate_widths("depth", space, table, speedup_to_target(1.3))
    groups, keep = units[: len(space.sizes)], units[len(space.sizes):]
    assert groups == space.sizes and table.speedup(units) >= 1.3 - 1e-9
    dropped = [keep[s[0]:s[-1] + 1].count(0) for s in stages(space.blocks)]
    assert len(set(dropped)) == 1 and dropped[0] >= 1
    assert all(keep[s[-1]] == 0 for s in stages(space.blocks))  # last blocks first
    width_units = allocate_widths("l1", space, table, speedup_to_target(1.3))
    assert width_units[len(space.sizes):] == [1] * 9  # width baselines keep every block


def test_the_game_drops_blocks_when_widths_cannot_reach(space):
    table = _known_table(space, round_to=1024)  # no group may narrow: only blocks can make it faster
    assert all(len(a) == 1 for a in table.allowed[: len(space.sizes)])
    target = speedup_to_target(1.4)
    env = ChannelEnv(table, lambda s: 1.0, EnvSettings(passes=4))
    env.target = target
    rng = np.random.default_rng(0)
    met = 0
    for _ in range(5):
        env.reset(target)
        done = False
        while not done:
            _, _, done = env.step(int(rng.integers(len(env.settings.actions))))
        if env.met_target():
            met += 1
            units = env.widths()
            assert units[: len(space.sizes)] == space.sizes and 0 in units[len(space.sizes):]
            assert table.reduction(units) >= target - 1e-9
    assert met >= 3  # random play crosses it by dropping blocks


def test_the_reward_scores_the_pruned_network(space):
    labels = torch.arange(len(X)) % 4
    split = torch.utils.data.TensorDataset(X, labels)
    reward = ChannelReward(space, split, ChannelRewardSettings(images=4, bn_recalibrate=0, batch_size=2))
    sparsities = [0.5] * len(space.sizes) + [0, 1, 0, 0, 1, 0, 0, 0, 1]
    with torch.no_grad():
        expected = (space.prune(space.units_from(sparsities))(X).argmax(1) == labels).float().mean().item()
    assert reward(np.asarray(sparsities)) == pytest.approx(expected)


def test_a_width_baseline_drops_blocks_only_where_widths_fall_short(space):
    table = _known_table(space)
    widths_only = table.speedup([a[0] for a in table.allowed[: len(space.sizes)]] + [1] * 9)
    beyond = min(widths_only * 1.05, (widths_only + table.max_speedup()) / 2)
    for method in ("l1", "uniform", "bn-slimming"):
        within = allocate_widths(method, space, table, speedup_to_target(widths_only * 0.9))
        assert within[len(space.sizes):] == [1] * 9
        units = allocate_widths(method, space, table, speedup_to_target(beyond))
        keep = units[len(space.sizes):]
        assert 0 in keep and table.speedup(units) >= beyond - 1e-9
        counts = [keep[s[0]:s[-1] + 1].count(0) for s in stages(space.blocks)]
        assert len(set(counts)) == 1  # the same share of every stage
