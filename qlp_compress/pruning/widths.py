"""Channel widths and blocks: the speedup target as a latency fraction, and the baseline allocations over a latency
table: uniform width, global filter-norm ranking, BatchNorm-scale ranking (every block kept), and uniform depth (the
same share of blocks dropped in every stage, full widths)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.names import SEARCH_METHODS, structure_parts
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.depth import stages as block_stages

if TYPE_CHECKING:
    from qlp_compress.pruning.latency import LatencyTable

BASELINES = ("uniform", "l1", "bn-slimming", "depth")  # closed-form allocations (prune --method); depth drops blocks
WIDTH_BASELINES = ("uniform", "l1", "bn-slimming")


def baselines_for(structure: str) -> tuple[str, ...]:
    """The closed-form allocations of a structured --structure: width baselines, depth, or both."""
    narrows, drops = structure_parts(structure)
    return (*(WIDTH_BASELINES if narrows else ()), *(("depth",) if drops else ()))


def speedup_to_target(speedup: float) -> float:
    """The fraction of latency to remove for `speedup` (2× → 0.5)."""
    return 1.0 - 1.0 / speedup


def check_speedup(speedup: float) -> None:
    if not speedup > 1.0 or speedup != speedup or speedup == float("inf"):
        raise UsageError(f"--speedup must be a number above 1, got {speedup}; e.g. --speedup 2 asks for half the "
                         "dense latency")


def _by_fraction(table: LatencyTable, target: float, keep: list[int]) -> list[int]:
    """uniform: the smallest common fraction removed from every group that meets the target (blocks as `keep`)."""
    for f in np.linspace(0.0, 1.0, 401):
        widths = [table.snap(i, n * (1.0 - f)) for i, n in enumerate(table.sizes[: table.groups])] + keep
        if table.reduction(widths) >= target - 1e-9:
            return widths
    raise _unreachable(table, target)


def _by_depth(space: ChannelSpace, table: LatencyTable, target: float) -> list[int]:
    """depth: full widths, and in every stage the same share of its blocks dropped, its last blocks first (the first
    block of a stage changes the resolution or the channels; the later ones refine), the smallest share that meets
    the target."""
    if not space.blocks:
        raise UsageError("--method depth drops residual blocks, and none were looked for; use --structure "
                         "channel,depth (or depth)")
    for keep in _depth_steps(space):
        units = list(space.sizes) + keep
        if table.reduction(units) >= target - 1e-9:
            return units
    raise _unreachable(table, target)


def _depth_steps(space: ChannelSpace) -> list[list[int]]:
    """Block keep flags with k = 0, 1, … blocks dropped in the longest stage, the same share in every other stage,
    each stage's last blocks first."""
    stages = block_stages(space.blocks)
    longest = max((len(s) for s in stages), default=0)
    steps = []
    for k in range(longest + 1):
        keep = [1] * len(space.blocks)
        for stage in stages:
            for i in stage[len(stage) - round(k * len(stage) / longest):]:
                keep[i] = 0
        steps.append(keep)
    return steps


def _by_ranking(table: LatencyTable, scores: Sequence[Sequence[float] | None], target: float,
                keep: list[int]) -> list[int]:
    """Remove channels in increasing score order across all groups (groups without scores stay whole) until
    the predicted latency meets the target (blocks as `keep`)."""
    ranked = sorted((s, g) for g, group_scores in enumerate(scores) if group_scores is not None
                    for s in group_scores)
    lo, hi = 0, len(ranked)

    def widths_after(k: int) -> list[int]:
        counts = [0] * table.groups
        for _, g in ranked[:k]:
            counts[g] += 1
        return [table.snap(g, n - counts[g]) if counts[g] else n
                for g, n in enumerate(table.sizes[: table.groups])] + keep

    if table.reduction(widths_after(hi)) < target - 1e-9:
        raise _unreachable(table, target)
    while lo < hi:  # the fewest channels whose removal meets the target (the prediction falls with k)
        mid = (lo + hi) // 2
        if table.reduction(widths_after(mid)) >= target - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return widths_after(lo)


def _unreachable(table: LatencyTable, target: float) -> QLPError:
    return QLPError(f"this allocation cannot reach a {1 / (1 - target):.2f}× predicted speedup (the table predicts "
                    f"at most {table.max_speedup():.2f}× at the narrowest widths); ask for a smaller --speedup")


def allocate_widths(method: str, space: ChannelSpace, table: LatencyTable, target: float) -> list[int]:
    """The units (widths, then block keep flags) of a baseline at latency-reduction `target`. A width baseline keeps
    every block where widths alone reach the target; beyond that (with depth) it drops the fewest blocks, the same
    share of every stage, with which its widths reach it."""
    if method == "depth":
        return _by_depth(space, table, target)
    if method == "bn-slimming" and all(g.bn is None for g in space.groups):
        raise UsageError("bn-slimming ranks channels by BatchNorm scale, and this model has no BatchNorm; use "
                         "--method l1 or uniform")
    if method not in WIDTH_BASELINES:
        raise UsageError(f"unknown channel method {method!r}; use one of {', '.join((*SEARCH_METHODS, *BASELINES))}")
    for keep in _depth_steps(space):
        try:
            if method == "uniform":
                return _by_fraction(table, target, keep)
            return _by_ranking(table, [g.l1 if method == "l1" else g.bn for g in space.groups], target, keep)
        except QLPError:
            continue  # widths alone fall short: one more block of each stage goes
    raise _unreachable(table, target)


CRITERION_OF = {"uniform": "l1", "l1": "l1", "bn-slimming": "bn", "depth": "l1", "qlp": "l1", "random": "l1"}


def demonstration_allocator(space: ChannelSpace, table: LatencyTable) -> Callable[[str, float], np.ndarray]:
    def allocation(name: str, target: float) -> np.ndarray:
        units = allocate_widths(name, space, table, target)
        return 1.0 - np.asarray(units) / np.asarray(space.unit_sizes)

    return allocation


def default_demonstrations(space: ChannelSpace) -> tuple[str, ...]:
    names = ["l1", "uniform"]
    if any(g.bn is not None for g in space.groups):
        names.insert(1, "bn-slimming")
    if space.blocks:
        names.append("depth")
    return tuple(names)
