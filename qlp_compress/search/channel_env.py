"""The QLP game on channel groups: same agent, same curriculum, same episode rule as on weights; only the units
change. A unit is a channel group; its density is the fraction of its channels kept; the episode's progress is the
fraction of the dense latency removed as a cost model (the latency table) predicts it, so a speedup target S is the
target 1 − 1/S. Widths are snapped to the allowed widths (multiples of --round-to)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from qlp_compress.search.env import EnvSettings, PruningEnv, RewardFn


class WidthCosts(Protocol):
    """What the channel game needs of a latency model: the group sizes, the widths each may take, the nearest
    allowed width, and the fraction of the dense latency a set of widths removes."""

    sizes: list[int]
    allowed: list[list[int]]

    def snap(self, group: int, width: float) -> int: ...

    def reduction(self, widths: Sequence[int]) -> float: ...


class ChannelEnv(PruningEnv):
    """PruningEnv over channel groups: densities snap to allowed widths; the target is predicted latency."""

    def __init__(self, table: WidthCosts, reward_fn: RewardFn, settings: EnvSettings = EnvSettings()):
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

    def removed(self) -> float:
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
            missing = self.target - self.removed()
            return self.state(), -self.settings.failure_penalty * missing, True
        return self.state(), 0.0, False
