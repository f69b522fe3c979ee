"""The QLP game on channel groups, its reward, and the baseline width allocations.

Same agent, same curriculum, same episode rule as the weight mode (qlp/): only the units change. A unit is
a channel group; its density is the fraction of its channels kept; the episode's progress is the fraction
of the dense onnxruntime latency removed as the latency table predicts it, so a speedup target S is the
target 1 − 1/S. Widths are snapped to the allowed widths (multiples of --round-to).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from qlp_compress.channel.groups import ChannelSpace
from qlp_compress.channel.latency import LatencyTable
from qlp_compress.data import materialize
from qlp_compress.errors import QLPError, UsageError
from qlp_compress.finetune import accuracy, recalibrate_batchnorm
from qlp_compress.qlp.env import EnvSettings, PruningEnv, RewardFn

BASELINES = ("uniform", "l1", "bn-slimming")  # closed-form width allocations (prune --method)
SEARCHES = ("qlp", "random")


def speedup_to_target(speedup: float) -> float:
    """The fraction of latency to remove for `speedup` (2× → 0.5)."""
    return 1.0 - 1.0 / speedup


def check_speedup(speedup: float) -> None:
    if not speedup > 1.0 or speedup != speedup or speedup == float("inf"):
        raise UsageError(f"--speedup must be a number above 1, got {speedup}; e.g. --speedup 2 asks for half the "
                         "dense latency")


def widths_from(space_sizes: Sequence[int], sparsities: Sequence[float]) -> list[int]:
    return [max(1, round(n * (1.0 - s))) for n, s in zip(space_sizes, sparsities, strict=True)]


class ChannelEnv(PruningEnv):
    """PruningEnv over channel groups: densities snap to allowed widths; the target is predicted latency."""

    def __init__(self, table: LatencyTable, reward_fn: RewardFn, settings: EnvSettings = EnvSettings()):
        self.table = table
        self.sizes = np.asarray(table.sizes, dtype=np.int64)
        self.floor = np.array([a[0] / n for a, n in zip(table.allowed, table.sizes, strict=True)])
        super().__init__(table.sizes, reward_fn, settings)

    def widths(self, density: np.ndarray | None = None) -> list[int]:
        d = self.density if density is None else density
        return [self.table.snap(i, d[i] * n) for i, n in enumerate(self.sizes)]

    def pruned_counts(self, density: np.ndarray | None = None) -> np.ndarray:
        return self.sizes - np.asarray(self.widths(density))

    def sparsities(self) -> np.ndarray:
        return 1.0 - np.asarray(self.widths()) / self.sizes

    def global_sparsity(self) -> float:
        """Here: the fraction of the dense latency removed (predicted)."""
        return self.table.reduction(self.widths())

    def met_target(self) -> bool:
        return self.table.reduction(self.widths()) >= self.target - 1e-9

    def exact_sparsities(self, sparsities: Sequence[float]) -> np.ndarray:
        """A demonstration's allocation is already allowed widths that meet the budget: taken as it is."""
        return np.asarray(sparsities, dtype=np.float64)

    def step(self, action: int, evaluate_at: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
        i = self.layer
        new = self.density.copy()
        new[i] = max(self.floor[i], new[i] * (1.0 - self.settings.actions[action]))
        self.step_count += 1
        if self.table.reduction(self.widths(new)) >= self.target - 1e-9:
            # clip the crossing step: the widest allowed width of this group that meets the target
            old_width, new_width = self.widths()[i], self.widths(new)[i]
            for w in reversed(self.table.allowed[i]):
                if new_width <= w <= old_width:
                    trial = new.copy()
                    trial[i] = w / self.sizes[i]
                    if self.table.reduction(self.widths(trial)) >= self.target - 1e-9:
                        new = trial
                        break
            self.density = new
            measured = self.sparsities() if evaluate_at is None else evaluate_at
            return self.state(), float(self.reward_fn(measured)), True
        self.density = new
        if self.step_count >= self.settings.passes * self.n_layers:
            missing = self.target - self.global_sparsity()
            return self.state(), -self.settings.failure_penalty * missing, True
        return self.state(), 0.0, False


@dataclass(frozen=True)
class ChannelRewardSettings:
    """How a pruned network is scored during the search."""

    images: int = 1000  # reward-split images per evaluation (always the same ones)
    bn_recalibrate: int = 256  # reward images used to re-estimate BatchNorm after pruning (0 = off)
    batch_size: int = 500  # images per forward pass
    criterion: str = "l1"  # which channels a group loses: "l1" (filter norm) or "bn" (BatchNorm scale)
    device: str = "cpu"


class ChannelReward:
    """Callable: per-group sparsities → accuracy of the channel-pruned network on the reward images."""

    def __init__(self, space: ChannelSpace, reward_split: Dataset, settings: ChannelRewardSettings):
        self.space = space
        self.settings = settings
        x, y = materialize(reward_split, limit=settings.images)
        self.x, self.y = x.to(settings.device), y.to(settings.device)
        self.calibration = self.x[: settings.bn_recalibrate]
        self.cache: dict[tuple[int, ...], float] = {}  # the same widths always score the same
        self.evaluations = 0
        self.failures: list[str] = []

    def __call__(self, sparsities: Sequence[float]) -> float:
        self.evaluations += 1
        widths = tuple(widths_from(self.space.sizes, sparsities))
        if widths not in self.cache:
            self.cache[widths] = self.score(widths)
        return self.cache[widths]

    def score(self, widths: Sequence[int]) -> float:
        try:
            model = self.space.prune(widths, self.settings.criterion).to(self.settings.device)
        except QLPError as e:  # never score a network that does not run: it scores 0
            self.failures.append(str(e))
            return 0.0
        if self.settings.bn_recalibrate:
            recalibrate_batchnorm(model, self.calibration.split(self.settings.batch_size))
        with torch.inference_mode():
            batches = zip(self.x.split(self.settings.batch_size), self.y.split(self.settings.batch_size), strict=True)
            return accuracy(model, batches, self.settings.device)


# ----------------------------------------------------------------------------------------- baselines


def _by_fraction(table: LatencyTable, target: float) -> list[int]:
    """uniform: the smallest common fraction removed from every group that meets the target."""
    for f in np.linspace(0.0, 1.0, 401):
        widths = [table.snap(i, n * (1.0 - f)) for i, n in enumerate(table.sizes)]
        if table.reduction(widths) >= target - 1e-9:
            return widths
    raise _unreachable(table, target)


def _by_ranking(table: LatencyTable, scores: Sequence[Sequence[float] | None], target: float) -> list[int]:
    """Remove channels in increasing score order across all groups (groups without scores stay whole) until
    the predicted latency meets the target."""
    ranked = sorted((s, g) for g, group_scores in enumerate(scores) if group_scores is not None
                    for s in group_scores)
    removed = [0] * len(table.sizes)
    lo, hi = 0, len(ranked)

    def widths_after(k: int) -> list[int]:
        counts = [0] * len(table.sizes)
        for _, g in ranked[:k]:
            counts[g] += 1
        return [table.snap(g, n - counts[g]) if counts[g] else n for g, n in enumerate(table.sizes)]

    if table.reduction(widths_after(hi)) < target - 1e-9:
        raise _unreachable(table, target)
    while lo < hi:  # the fewest channels whose removal meets the target (the prediction falls with k)
        mid = (lo + hi) // 2
        if table.reduction(widths_after(mid)) >= target - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    del removed
    return widths_after(lo)


def _unreachable(table: LatencyTable, target: float) -> QLPError:
    return QLPError(f"this allocation cannot reach a {1 / (1 - target):.2f}× predicted speedup (the table predicts "
                    f"at most {table.max_speedup():.2f}× at the narrowest widths); ask for a smaller --speedup")


def allocate_widths(method: str, space: ChannelSpace, table: LatencyTable, target: float) -> list[int]:
    """Per-group widths of a baseline at latency-reduction `target`."""
    if method == "uniform":
        return _by_fraction(table, target)
    if method == "l1":
        return _by_ranking(table, [g.l1 for g in space.groups], target)
    if method == "bn-slimming":
        if all(g.bn is None for g in space.groups):
            raise UsageError("bn-slimming ranks channels by BatchNorm scale, and this model has no BatchNorm; use "
                             "--method l1 or uniform")
        return _by_ranking(table, [g.bn for g in space.groups], target)
    raise UsageError(f"unknown channel method {method!r}; use one of {', '.join((*SEARCHES, *BASELINES))}")


CRITERION_OF = {"uniform": "l1", "l1": "l1", "bn-slimming": "bn", "qlp": "l1", "random": "l1"}


def demonstration_allocator(space: ChannelSpace, table: LatencyTable) -> Callable[[str, float], np.ndarray]:
    def allocation(name: str, target: float) -> np.ndarray:
        widths = allocate_widths(name, space, table, target)
        return 1.0 - np.asarray(widths) / np.asarray(space.sizes)

    return allocation


def default_demonstrations(space: ChannelSpace) -> tuple[str, ...]:
    names = ["l1", "uniform"]
    if any(g.bn is not None for g in space.groups):
        names.insert(1, "bn-slimming")
    return tuple(names)


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
