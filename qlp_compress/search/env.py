"""The pruning environment of QLP (our reading of the paper; see docs/method.md).

A layer's state is its density d (fraction of its weights kept). The agent sweeps the layers in order,
several passes, and at each visit removes a fraction `a` of the layer's *remaining* weights
(d ← d·(1−a)). The episode ends when the global sparsity reaches the target — the crossing step is
clipped so the target is met exactly, to the weight — and the reward is the accuracy of the pruned,
not fine-tuned network. An episode still short of the target after the last pass fails with a negative
reward proportional to the sparsity still missing.

Near-best episodes (`NearBestEnv`, our addition for searching around the best allocation found so far) start
from a given allocation instead of the dense network, visit a few layers, and change each visited layer's
density by a relative step (d ← d·(1+s); an emptied layer steps up to s × the target's overall density);
then the layers not visited are rescaled by one common factor so the target is met exactly, to the weight.
An episode whose visited layers alone keep more weights than the target allows, or prune so many that the
others cannot make up for it, fails with the failure penalty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_ACTIONS = tuple(round(0.1 * i, 1) for i in range(11))  # remove 0 %, 10 %, …, 100 % of what remains
RELATIVE_STEPS = (-0.3, -0.15, 0.15, 0.3)  # near-best episodes: d ← d·(1+s); no 0, so every visit changes something

RewardFn = Callable[[np.ndarray], float]  # per-layer sparsities → reward (accuracy on the reward split)


@dataclass(frozen=True)
class EnvSettings:
    """The pruning game."""

    actions: tuple[float, ...] = DEFAULT_ACTIONS  # fractions of a layer's remaining weights one step removes
    passes: int = 4  # how many times an episode may visit each layer
    failure_penalty: float = 1.0  # failed episode reward = −failure_penalty × (target − reached sparsity)
    target_in_state: bool = True  # append the episode's target sparsity to the state (our addition: it lets
    #                               the curriculum's stages share one replay buffer without contradicting it)
    pass_in_state: bool = True  # append the pass number, normalised to 0..1 (our addition: without it the agent
    #                             cannot tell the last visit of a layer from an earlier one)
    relative_steps: tuple[float, ...] = RELATIVE_STEPS  # near-best episodes: relative density steps
    near_best_layers: int = 3  # near-best episodes: how many layers one episode changes


class PruningEnv:
    """Per-layer densities, the step rule, and the terminal reward."""

    def __init__(self, numels: Sequence[int], reward_fn: RewardFn, settings: EnvSettings = EnvSettings()):
        self.numels = np.asarray(numels, dtype=np.int64)
        self.total = int(self.numels.sum())
        self.reward_fn = reward_fn
        self.settings = settings
        self.n_layers = len(self.numels)
        self.target = 0.5
        self.reset(self.target)

    @property
    def state_size(self) -> int:
        return self.n_layers + 1 + int(self.settings.target_in_state) + int(self.settings.pass_in_state)

    @property
    def n_actions(self) -> int:
        return len(self.settings.actions)

    def reset(self, target: float) -> np.ndarray:
        self.target = target
        self.target_pruned = round(target * self.total)  # weights the episode must remove, exactly
        self.density = np.ones(self.n_layers)
        self.step_count = 0
        return self.state()

    @property
    def layer(self) -> int:
        return self.step_count % self.n_layers

    def state(self) -> np.ndarray:
        """[index of the layer about to be visited, normalised to 0..1] (+ the target sparsity when
        `target_in_state`) (+ the pass number, normalised, when `pass_in_state`) + all layer densities."""
        index = self.layer / max(1, self.n_layers - 1)
        head = [index]
        if self.settings.target_in_state:
            head.append(self.target)
        if self.settings.pass_in_state:
            last = max(1, self.settings.passes - 1)
            head.append(min(self.step_count // self.n_layers, last) / last)
        return np.concatenate((head, self.density)).astype(np.float32)

    def pruned_counts(self, density: np.ndarray | None = None) -> np.ndarray:
        d = self.density if density is None else density
        return np.rint((1.0 - d) * self.numels).astype(np.int64)

    def sparsities(self) -> np.ndarray:
        """Per-layer sparsity in whole weights (what the masks will remove)."""
        return self.pruned_counts() / self.numels

    def removed(self) -> float:
        return float(self.pruned_counts().sum()) / self.total

    def met_target(self) -> bool:
        """Whether the episode has reached its target (the search counts only such episodes)."""
        return bool(self.pruned_counts().sum() >= self.target_pruned)

    def action_towards(self, goal: np.ndarray) -> int:
        """The action that brings the current layer closest to the density `goal[layer]` (used to replay a
        baseline allocation as a demonstration). Before the last pass it never prunes past the goal; on the
        last pass it takes the first action that reaches it, so the episode meets the target."""
        d, want = self.density[self.layer], float(goal[self.layer])
        after = [d * (1.0 - a) for a in self.settings.actions]
        if self.step_count // self.n_layers < self.settings.passes - 1:
            return min(range(self.n_actions), key=lambda k: (after[k] < want - 1e-9, after[k]))
        reaching = [k for k in range(self.n_actions) if after[k] <= want + 1e-9]
        return max(reaching, key=lambda k: after[k]) if reaching else min(range(self.n_actions), key=after.__getitem__)

    def exact_sparsities(self, sparsities: Sequence[float]) -> np.ndarray:
        """Per-layer sparsities (whole weights) closest to `sparsities` that meet the episode's target exactly:
        each layer is rounded to whole weights, and the few weights the rounding leaves over or short go to
        the layers with the largest rounding remainders."""
        wanted = np.clip(np.asarray(sparsities, dtype=np.float64), 0.0, 1.0) * self.numels
        counts = np.floor(wanted).astype(np.int64)
        short = self.target_pruned - int(counts.sum())
        order = np.argsort(-(wanted - counts), kind="stable")  # largest remainder first
        while short != 0:
            step = 1 if short > 0 else -1
            room = counts < self.numels if step > 0 else counts > 0
            if not room.any():
                break
            for i in (order if step > 0 else order[::-1]):
                if short == 0:
                    break
                if room[i]:
                    counts[i] += step
                    short -= step
        return counts / self.numels

    def step(self, action: int, evaluate_at: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
        """Apply `action` to the current layer; returns (next state, reward, done). When the episode meets its
        target and `evaluate_at` is given, the reward is measured at those per-layer sparsities instead of the
        ones the actions reached (a demonstration's exact allocation; see search.curriculum)."""
        i = self.layer
        new = self.density.copy()
        new[i] *= 1.0 - self.settings.actions[action]
        pruned = self.pruned_counts(new)
        if pruned.sum() >= self.target_pruned:  # clip the crossing step so the target is met exactly
            pruned_i = self.target_pruned - (pruned.sum() - pruned[i])
            new[i] = 1.0 - pruned_i / self.numels[i]
            self.density = new
            self.step_count += 1
            measured = self.sparsities() if evaluate_at is None else evaluate_at
            return self.state(), float(self.reward_fn(measured)), True
        self.density = new
        self.step_count += 1
        if self.step_count >= self.settings.passes * self.n_layers:
            missing = self.target - self.removed()
            return self.state(), -self.settings.failure_penalty * missing, True
        return self.state(), 0.0, False


class NearBestEnv(PruningEnv):
    """The near-best game: start from an allocation, step a few layers' densities up or down by a relative
    step, then rescale the other layers so the target is met exactly. Its state has the layout of
    `PruningEnv`'s (the pass slot holds the share of the episode's visits done)."""

    def __init__(self, numels: Sequence[int], reward_fn: RewardFn, settings: EnvSettings = EnvSettings()):
        self.visits: list[int] = [0]
        self.start = np.zeros(len(numels))
        self.succeeded = False
        super().__init__(numels, reward_fn, settings)

    @property
    def n_actions(self) -> int:
        return len(self.settings.relative_steps)

    def start_from(self, sparsities: Sequence[float], layers: Sequence[int]) -> None:
        """The allocation and the layers (visited in this order) of the next episode."""
        if not 0 < len(layers) < self.n_layers:
            raise ValueError(f"a near-best episode visits 1 to {self.n_layers - 1} layers, got {len(layers)}")
        self.start = np.clip(np.asarray(sparsities, dtype=np.float64), 0.0, 1.0)
        self.visits = [int(i) for i in layers]

    def reset(self, target: float) -> np.ndarray:
        super().reset(target)
        self.density = 1.0 - self.start
        self.succeeded = False
        return self.state()

    @property
    def layer(self) -> int:
        return self.visits[min(self.step_count, len(self.visits) - 1)]

    def state(self) -> np.ndarray:
        state = super().state()
        if self.settings.pass_in_state:
            state[1 + int(self.settings.target_in_state)] = self.step_count / len(self.visits)
        return state

    def met_target(self) -> bool:
        return self.succeeded

    def stepped(self, density: float, step: float) -> float:
        """d·(1 + step), capped at 1; an emptied layer steps up to step × the target's overall density (a
        relative step could never bring it back)."""
        if density == 0.0:
            return max(0.0, step) * (1.0 - self.target)
        return min(1.0, density * (1.0 + step))

    def rescaled(self, density: np.ndarray) -> tuple[np.ndarray | None, float]:
        """`density` with the layers not visited scaled by one factor c (each capped at 1) so that the kept
        weights meet the target: (new densities, 0), or (None, the sparsity missed) when no c can."""
        visited = np.zeros(self.n_layers, bool)
        visited[self.visits] = True
        goal = (self.total - self.target_pruned) - float(np.sum(density[visited] * self.numels[visited]))
        others_now = float(np.sum(density[~visited] * self.numels[~visited]))
        if goal < 0:  # the visited layers alone keep too much
            return None, -goal / self.total
        others_full = float(np.sum(np.where(density[~visited] > 0, self.numels[~visited], 0)))
        if goal > others_full:  # even kept whole, the others cannot make up for the visited layers' pruning
            return None, (goal - others_full) / self.total
        if others_now == 0:  # nothing to rescale, and nothing needed
            return density.copy(), 0.0

        def kept(c: float) -> float:
            return float(np.sum(np.minimum(1.0, c * density[~visited]) * self.numels[~visited]))

        lo, hi = 0.0, max(1.0, 1.0 / density[~visited][density[~visited] > 0].min())  # kept(hi) = others_full
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if kept(mid) < goal else (lo, mid)
        out = density.copy()
        out[~visited] = np.minimum(1.0, hi * density[~visited])
        return out, 0.0

    def step(self, action: int, evaluate_at: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
        """Move the visited layer's density by the action's relative step (capped at 1); after the last visit,
        rescale the others and measure, or fail."""
        i, step = self.layer, self.settings.relative_steps[action]
        self.density = self.density.copy()
        self.density[i] = self.stepped(self.density[i], step)
        self.step_count += 1
        if self.step_count < len(self.visits):
            return self.state(), 0.0, False
        density, missed = self.rescaled(self.density)
        if density is None:
            return self.state(), -self.settings.failure_penalty * missed, True
        self.density = 1.0 - self.exact_sparsities(1.0 - density)
        self.succeeded = True
        return self.state(), float(self.reward_fn(self.sparsities())), True
