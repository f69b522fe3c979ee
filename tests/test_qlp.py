"""The QLP search: the search learns a known optimum on a synthetic problem; the pruning game's invariants;
the curriculum; determinism and exact resume; the reward engines against PyTorch; the DQN's pieces."""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_task, near_tie_share
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import TensorDataset

from qlp_compress.base.errors import UsageError
from qlp_compress.base.io import load_checkpoint
from qlp_compress.data import TensorImages, to_float
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.reward import weights as weights_module
from qlp_compress.reward.weights import BRIEF_FINETUNE, Reward, RewardSettings
from qlp_compress.search import agent as agent_module
from qlp_compress.search.agent import AgentSettings, DQNAgent
from qlp_compress.search.curriculum import (
    SearchInterrupted,
    SearchSettings,
    curriculum_targets,
    run_search,
    stage_episodes,
)
from qlp_compress.search.env import DEFAULT_ACTIONS, EnvSettings, NearBestEnv, PruningEnv
from qlp_compress.train.finetune import train
from qlp_compress.train.zoo import build_model

# ------------------------------------------------------------------ a synthetic problem with a known optimum

NUMELS = np.array([500, 4000, 8000, 8000, 16000, 2000])
SENSITIVITY = np.array([8.0, 2.0, 1.0, 0.5, 0.25, 4.0])


def quadratic_reward(s) -> float:
    """1 − Σ c_l·n_l·s_l² / Σ n_l: a stand-in for accuracy whose optimum is known in closed form."""
    s = np.asarray(s, dtype=float)
    return 1.0 - float(np.sum(SENSITIVITY * NUMELS * s**2) / NUMELS.sum())


def optimal_allocation(target: float) -> tuple[np.ndarray, float]:
    """Maximise the reward subject to Σ n_l·s_l = target·Σ n_l, 0 ≤ s_l ≤ 1. The KKT conditions give
    s_l = clip(λ/(2c_l), 0, 1) (water-filling); the pruned count grows with λ, so bisect on λ."""
    def allocation(lam: float) -> np.ndarray:
        return np.clip(lam / (2.0 * SENSITIVITY), 0.0, 1.0)

    lo, hi = 0.0, 2.0 * SENSITIVITY.max()  # at hi every layer is fully pruned
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.sum(NUMELS * allocation(mid)) < target * NUMELS.sum():
            lo = mid
        else:
            hi = mid
    s = allocation(hi)
    return s, quadratic_reward(s)


def test_reference_optimum_is_feasible_and_beats_feasible_perturbations() -> None:
    s, best = optimal_allocation(0.9)
    assert np.sum(NUMELS * s) == pytest.approx(0.9 * NUMELS.sum(), rel=1e-9)
    assert best > quadratic_reward(np.full(len(NUMELS), 0.9))  # better than uniform
    rng = np.random.default_rng(0)
    for _ in range(200):  # random moves along the constraint, kept inside [0, 1]
        d = rng.normal(size=len(NUMELS))
        d -= NUMELS * (d @ NUMELS) / (NUMELS @ NUMELS)
        other = s + 0.05 * d
        if np.all((other >= 0) & (other <= 1)):
            assert quadratic_reward(other) <= best + 1e-12


def pruned_total(sparsities, numels) -> int:
    return int(np.sum(np.rint(np.asarray(sparsities) * np.asarray(numels))))


LEARNING_SEEDS = range(5)


def _learning_run(seed: int, target: float = 0.9) -> tuple[float, float, float, float]:
    """One seed of the test below (in a worker process): a QLP search and a random search with the same budget, the
    exact properties checked; (final/optimum, random final/optimum, mean of the last 50 rewards, the bound those
    must beat)."""
    torch.set_num_threads(1)
    _, optimum = optimal_allocation(target)
    qlp = run_search(PruningEnv(NUMELS, quadratic_reward),  # the DQN alone: the policy check below is about
                     SearchSettings(target_removed=target, episodes=400, seed=seed, near_best=0.0))  # its episodes
    rnd = run_search(PruningEnv(NUMELS, quadratic_reward),
                     SearchSettings(target_removed=target, episodes=400, seed=seed, method="random"))
    assert len(qlp.history) == len(rnd.history) == 400  # the same reward budget

    # exact properties, on every seed: each stage's best meets its own target to the weight, and the
    # continuous optimum bounds every whole-weight allocation
    for best in qlp.best:
        assert best.sparsities is not None
        assert pruned_total(best.sparsities, NUMELS) == round(best.target * NUMELS.sum())
    final = qlp.final
    assert final.target == target
    assert final.reward == pytest.approx(quadratic_reward(final.sparsities))
    assert final.reward <= optimum + 1e-9
    assert all(r["stage"] == len(qlp.best) and r["epsilon"] < 0.1 for r in qlp.history[-50:])

    random_mean = float(np.mean([r["reward"] for r in rnd.history if r["succeeded"]]))
    return (final.reward / optimum, rnd.final.reward / optimum,
            float(np.mean([r["reward"] for r in qlp.history[-50:]])),
            random_mean + 0.5 * (final.reward - random_mean))


@pytest.mark.slow
def test_qlp_learns_the_known_optimum_and_beats_random_search() -> None:
    """The criteria are means over five seeds, with margins measured on three CPU code paths.

    A DQN's trajectory depends on the order of floating-point sums, so on another CPU (AVX-512, AVX2, or
    ATen's default kernels) a seed plays as a different seed would. Measured over 20 runs (seeds 0–9 on two
    code paths, seeds 0–4 on a third): the final reward is 0.982 × the optimum on average, with a per-run
    standard deviation of 0.021 (worst run 0.918); the mean of five runs therefore varies by about 0.01, and
    the bound of 0.95 sits more than three of those below the measured mean. Random search with the same
    budget reaches 0.88 × (mean over these seeds; it draws no float-dependent decision), uniform pruning 0.47 ×,
    so the bound still fails an agent that does not learn. The policy check (the last, nearly greedy episodes
    against random play) has a margin of several times its spread: late episodes average 0.40–0.47 against
    random play's 0.255, where the bound asks about 0.36."""
    # the seeds are independent runs: two at a time where there are two cores (the result is the same)
    workers = min(2, os.cpu_count() or 1, len(LEARNING_SEEDS))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(_learning_run, LEARNING_SEEDS))
    else:
        runs = [_learning_run(seed) for seed in LEARNING_SEEDS]
    finals, random_finals, late_means, bounds = (list(x) for x in zip(*runs, strict=True))

    assert np.mean(finals) >= 0.95, finals  # close to the optimum (see the docstring for the margin)
    assert np.mean(finals) > np.mean(random_finals) + 0.03, (finals, random_finals)
    # the policy itself learned, not only its luckiest episode: the last, nearly greedy episodes of the final
    # stage score well above what random play scores on average at the same target
    assert np.mean(late_means) > np.mean(bounds), (late_means, bounds)


# ------------------------------------------------------------------------------------ the pruning game


@pytest.mark.parametrize("target", [0.5, 0.9, 0.98])
def test_a_demonstration_replays_an_allocation_within_one_action_step(target) -> None:
    wanted, _ = optimal_allocation(target)
    env = PruningEnv(NUMELS, quadratic_reward)
    env.reset(target)
    done = False
    while not done:
        _, reward, done = env.step(env.action_towards(1.0 - wanted))
    assert pruned_total(env.sparsities(), NUMELS) == round(target * NUMELS.sum())  # met exactly, not failed
    assert reward == pytest.approx(quadratic_reward(env.sparsities()))
    # the smallest step removes 10 % of what remains, so no layer can land further than 0.1 from its allocation
    assert np.abs(env.sparsities() - wanted).max() <= 0.1


@pytest.mark.slow
def test_demonstrations_open_every_stage_count_as_episodes_and_bound_the_result() -> None:
    allocations = {"uniform": lambda t: np.full(len(NUMELS), t), "optimal": lambda t: optimal_allocation(t)[0]}
    settings = SearchSettings(target_removed=0.9, episodes=60, stages=3, demonstrations=("uniform", "optimal"), seed=0)
    result = run_search(PruningEnv(NUMELS, quadratic_reward), settings,
                        allocation=lambda name, t: allocations[name](t))
    assert len(result.history) == 60  # the demonstrations spend the same budget
    starts = [0] + [i for i in range(1, 60) if result.history[i]["stage"] != result.history[i - 1]["stage"]]
    assert len(starts) == 3
    for start in starts:
        assert [h.get("demonstration") for h in result.history[start : start + 3]] == ["uniform", "optimal", None]
    for best, start in zip(result.best, starts, strict=True):
        demo_rewards = [h["reward"] for h in result.history[start : start + 2]]
        assert best.reward >= max(demo_rewards)
    optimal_demo = result.history[starts[-1] + 1]["reward"]
    _, optimum = optimal_allocation(0.9)
    assert optimal_demo > 0.97 * optimum  # the replayed allocation keeps its quality
    assert result.final.reward >= optimal_demo
    assert result.final.demonstration in (None, "optimal")

    plain = run_search(PruningEnv(NUMELS, quadratic_reward), settings)  # no allocator given: no demonstrations
    assert all("demonstration" not in h for h in plain.history)


@pytest.mark.parametrize("target", [pytest.param(0.5, marks=pytest.mark.slow), 0.9,
                                    pytest.param(0.98, marks=pytest.mark.slow)])
def test_a_demonstration_is_scored_at_its_exact_allocation(target) -> None:
    """The grid replay only steers the transitions; the reward and the recorded policy are the allocator's own
    allocation, met to the weight, so the search can never lose to a demonstration through the action grid."""
    wanted, _ = optimal_allocation(target)
    settings = SearchSettings(target_removed=target, episodes=2, stages=1, demonstrations=("optimal",), seed=0)
    seen = RecordingReward()
    result = run_search(PruningEnv(NUMELS, seen), settings, allocation=lambda name, t: wanted)
    demo = result.history[0]
    assert demo["demonstration"] == "optimal" and demo["succeeded"]
    scored = seen.calls[0]
    assert pruned_total(scored, NUMELS) == round(target * NUMELS.sum())  # the target, to the weight
    assert np.abs(scored - wanted).max() <= 1.0 / NUMELS.min()  # the allocation itself, up to whole weights
    assert result.best[0].reward >= demo["reward"] == pytest.approx(float(np.dot(scored, np.arange(1, 7))))
    if result.best[0].demonstration == "optimal":
        np.testing.assert_allclose(result.best[0].sparsities, scored)

    env = PruningEnv(NUMELS, quadratic_reward)  # the grid replay alone lands up to a step away, and scores less
    env.reset(target)
    done = False
    while not done:
        _, grid_reward, done = env.step(env.action_towards(1.0 - wanted))
    assert quadratic_reward(scored) >= grid_reward  # the optimum, exactly, beats any other feasible point


@pytest.mark.parametrize("numels", [NUMELS, np.array([7, 130, 2001, 64, 999])], ids=["numels", "odd"])
@pytest.mark.parametrize("target", [0.3, 0.9, 0.98])
def test_exact_sparsities_meet_the_target_to_the_weight(numels, target) -> None:
    env = PruningEnv(numels, quadratic_reward)
    env.reset(target)
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = np.clip(rng.normal(target, 0.05, len(numels)), 0, 1)
        exact = env.exact_sparsities(s)
        counts = np.rint(exact * numels).astype(int)
        assert np.allclose(exact * numels, counts)  # whole weights
        assert counts.sum() == round(target * numels.sum())
        assert ((counts >= 0) & (counts <= numels)).all()


class RecordingReward:
    """Stub reward: remembers every argument; returns a value that depends on it."""

    def __init__(self):
        self.calls: list[np.ndarray] = []

    def __call__(self, sparsities: np.ndarray) -> float:
        self.calls.append(np.array(sparsities, copy=True))
        return float(np.dot(sparsities, np.arange(1, len(sparsities) + 1)))


ODD_NUMELS = [7, 130, 2001, 64, 999]  # sizes that make rounding to whole weights matter


@pytest.mark.parametrize("target", [0.3, 0.9, 0.98])
def test_random_episodes_keep_the_invariants(target) -> None:
    stub = RecordingReward()
    settings = EnvSettings(passes=3, failure_penalty=2.0)
    env = PruningEnv(ODD_NUMELS, stub, settings)
    n_layers, total = len(ODD_NUMELS), sum(ODD_NUMELS)
    rng = np.random.default_rng(int(target * 100))
    successes = 0
    for _ in range(60):
        state = env.reset(target)
        density = np.ones(n_layers)
        calls_before = len(stub.calls)
        steps, done = 0, False
        while not done:
            assert state.shape == (env.state_size,) and state.dtype == np.float32
            assert np.all((state >= 0) & (state <= 1))
            assert state[0] == pytest.approx((steps % n_layers) / (n_layers - 1))  # layer index in 0..1
            assert state[1] == pytest.approx(target)
            assert state[2] == pytest.approx((steps // n_layers) / (env.settings.passes - 1))  # the pass, 0..1
            np.testing.assert_allclose(state[3:], density, rtol=1e-6)
            state, reward, done = env.step(int(rng.integers(env.n_actions)))
            steps += 1
            assert np.all(env.density <= density)  # pruning is monotone
            assert np.all(env.density >= 0)
            density = env.density.copy()
            if not done:
                assert reward == 0.0 and len(stub.calls) == calls_before
        assert np.all((state >= 0) & (state <= 1))
        pruned = int(env.pruned_counts().sum())
        if pruned >= env.target_pruned:  # success: the target is met exactly, and measured once
            successes += 1
            assert pruned == round(target * total)
            assert len(stub.calls) == calls_before + 1
            np.testing.assert_array_equal(stub.calls[-1], env.sparsities())
            assert pruned_total(stub.calls[-1], ODD_NUMELS) == round(target * total)
            assert reward == stub(env.sparsities())
            stub.calls.pop()  # the call just made to check the value
            assert steps <= settings.passes * n_layers
        else:  # failure: never measured, penalised by the sparsity still missing
            assert len(stub.calls) == calls_before
            assert steps == settings.passes * n_layers
            assert reward == pytest.approx(-2.0 * (target - env.removed()))
            assert reward < 0
    assert successes > 0


@pytest.mark.parametrize("numels", [NUMELS, np.array(ODD_NUMELS)], ids=["numels", "odd"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.98])
def test_a_near_best_episode_steps_its_layers_and_meets_the_target_exactly(numels, target) -> None:
    """From an allocation that meets the target, each visit multiplies the layer's density by (1 + step) (capped
    at 1); the end rescales the layers not visited by one common factor so that the target is met to the weight,
    and the reward measures exactly that allocation. When no factor can, the episode fails unmeasured."""
    stub = RecordingReward()
    env = NearBestEnv(numels, stub, EnvSettings(failure_penalty=2.0))
    base = PruningEnv(numels, quadratic_reward)
    base.reset(target)
    rng = np.random.default_rng(int(target * 100))
    steps = env.settings.relative_steps
    successes = failures = 0
    for _ in range(40):
        start = np.clip(rng.normal(target, 0.05, len(numels)), 0, 1)
        start[int(rng.integers(len(numels)))] = 1.0  # one layer emptied
        start = base.exact_sparsities(start)
        layers = sorted(rng.choice(len(numels), int(rng.integers(1, len(numels))), replace=False).tolist())
        env.start_from(start, layers)
        state = env.reset(target)
        np.testing.assert_allclose(state[3:], 1.0 - start, rtol=1e-6)  # the episode starts from the allocation
        expected = 1.0 - start
        for k, i in enumerate(layers):
            assert state[0] == pytest.approx(i / (len(numels) - 1)) and state[2] == pytest.approx(k / len(layers))
            action = int(rng.integers(env.n_actions))
            expected[i] = min(1.0, expected[i] * (1.0 + steps[action])) if expected[i] > 0 \
                else max(0.0, steps[action]) * (1.0 - target)  # an emptied layer can come back
            calls = len(stub.calls)
            state, reward, done = env.step(action)
            assert done == (k == len(layers) - 1)
            if not done:
                assert reward == 0.0 and len(stub.calls) == calls
                np.testing.assert_allclose(env.density, expected, rtol=1e-12)  # moved by the stated step
        others = np.setdiff1d(np.arange(len(numels)), layers)
        if env.met_target():
            successes += 1
            assert len(stub.calls) == calls + 1 and reward == stub(env.sparsities())
            np.testing.assert_array_equal(stub.calls[-2], env.sparsities())
            assert pruned_total(env.sparsities(), numels) == round(target * numels.sum())  # to the weight
            one_weight = 1.0 / numels
            # the visited layers keep their stepped densities (up to the weight the rounding may move)
            assert np.all(np.abs(env.density[layers] - expected[layers]) <= one_weight[layers] + 1e-9)
            # the others were scaled by one factor: d_new = min(1, c·d_old) with the same c for all of them
            free = others[(env.density[others] < 1.0 - one_weight[others]) & (expected[others] > 0)]
            if len(free) >= 2:
                ratios = env.density[free] / expected[free]
                tolerance = one_weight[free] / expected[free] + 1e-9
                assert np.ptp(ratios) <= 2 * tolerance.max()
        else:
            failures += 1
            assert len(stub.calls) == calls and reward < 0  # never measured; penalised
    assert successes > 0


def test_a_near_best_episode_fails_when_its_layers_alone_break_the_target() -> None:
    stub = RecordingReward()
    env = NearBestEnv([10, 10000, 10], stub, EnvSettings(failure_penalty=1.0))
    env.reset(0.9)
    start = env.exact_sparsities([0.0, 0.902, 0.0])  # layer 1 carries all the pruning
    env.start_from(start, [1])
    env.reset(0.9)
    up = env.settings.relative_steps.index(max(env.settings.relative_steps))
    _, reward, done = env.step(up)  # layer 1 keeps more than the whole network may
    kept_allowed = 10020 - round(0.9 * 10020)
    assert done and not env.met_target() and stub.calls == []
    assert reward == pytest.approx(-(10000 * (1 - start[1]) * (1 + max(env.settings.relative_steps)) - kept_allowed)
                                   / 10020)


def test_near_best_episodes_start_from_the_stage_best_and_never_lose_it() -> None:
    """With `near_best`, the last share of every stage's episodes start from that stage's best so far: each one's
    allocation differs from that best in the visited layers and one common rescaling of the others, meets the
    stage's target exactly, and the stage's best never falls below its demonstrations."""
    allocations = {"uniform": lambda t: np.full(len(NUMELS), t), "optimal": lambda t: optimal_allocation(t)[0]}
    settings = SearchSettings(target_removed=0.9, episodes=60, stages=3, near_best=0.5, demonstrations=("uniform",),
                              seed=0, agent=SMALL_AGENT)
    bests: dict[int, list] = {}
    measured: list[np.ndarray] = []

    def reward(s) -> float:
        measured.append(np.array(s, copy=True))
        return quadratic_reward(s)

    def watch(record: dict) -> None:
        bests.setdefault(record["stage"], []).append(record["best"])

    result = run_search(PruningEnv(NUMELS, reward), settings, on_episode=watch,
                        allocation=lambda name, t: allocations[name](t))
    assert len(result.history) == 60
    for stage, length in enumerate(stage_episodes(60, 3), start=1):
        records = [h for h in result.history if h["stage"] == stage]
        near = [h.get("near_best", False) for h in records]
        n_near = round(0.5 * (length - 1))
        assert near == [False] * (length - n_near) + [True] * n_near  # the last share of the stage
        assert all(h["steps"] == settings.env.near_best_layers for h in records if h.get("near_best"))
        assert bests[stage] == sorted(bests[stage])  # the best only climbs
    calls = iter(measured)
    best: dict[int, tuple[float, np.ndarray]] = {}
    for h in result.history:
        if not h["succeeded"]:
            continue
        scored = next(calls)
        assert pruned_total(scored, NUMELS) == round(h["target"] * NUMELS.sum())
        if h.get("near_best"):  # the stage's best so far, rescaled outside the (at most 3) visited layers
            kept, kept_before = 1.0 - scored, 1.0 - best[h["stage"]][1]
            alive = kept_before > 0.05
            ratios = kept[alive] / kept_before[alive]
            slack = 2.0 / (NUMELS[alive] * kept_before[alive])  # a weight of rounding on either side
            agreeing = max(int(np.sum(np.abs(ratios - r) <= slack)) for r in ratios)
            assert agreeing >= len(ratios) - settings.env.near_best_layers, ratios
        if h["stage"] not in best or h["reward"] > best[h["stage"]][0]:
            best[h["stage"]] = (h["reward"], scored)
    assert result.final.reward >= result.history[-30]["reward"]  # the final stage's demonstration
    assert result.final.reward == pytest.approx(quadratic_reward(result.final.sparsities))


def test_no_pruning_fails_after_every_pass() -> None:
    stub = RecordingReward()
    env = PruningEnv(ODD_NUMELS, stub, EnvSettings(passes=3, failure_penalty=1.5))
    env.reset(0.8)
    results = [env.step(0) for _ in range(3 * len(ODD_NUMELS))]
    assert [done for _, _, done in results] == [False] * (3 * len(ODD_NUMELS) - 1) + [True]
    assert results[-1][1] == pytest.approx(-1.5 * 0.8)
    assert stub.calls == []
    assert np.all(env.density == 1.0)


def test_partial_pruning_fails_with_the_missing_sparsity() -> None:
    stub = RecordingReward()
    env = PruningEnv([100, 200, 300], stub, EnvSettings(passes=2, failure_penalty=1.0))
    env.reset(0.9)
    tenth = DEFAULT_ACTIONS.index(0.1)
    results = [env.step(tenth) for _ in range(6)]
    assert results[-1][2] and not any(done for _, _, done in results[:-1])
    reached = env.removed()
    assert reached == pytest.approx(1 - 0.9**2, abs=1e-2)
    assert results[-1][1] == pytest.approx(-(0.9 - reached))
    assert stub.calls == []


def test_full_removal_action_and_the_clipped_last_step() -> None:
    stub = RecordingReward()
    env = PruningEnv([100, 100, 100, 100], stub)
    env.reset(0.9)  # 360 weights to remove
    everything = DEFAULT_ACTIONS.index(1.0)
    for layer in range(3):
        _, reward, done = env.step(everything)
        assert not done and reward == 0.0
        assert env.density[layer] == 0.0 and env.sparsities()[layer] == 1.0
    _, reward, done = env.step(everything)  # would remove 400: clipped to the 60 still needed
    assert done
    np.testing.assert_allclose(env.sparsities(), [1.0, 1.0, 1.0, 0.6])
    assert len(stub.calls) == 1 and reward == stub(stub.calls[0])


def test_state_without_target() -> None:
    """The abstract's state: layer index and densities only."""
    env = PruningEnv(ODD_NUMELS, RecordingReward(), EnvSettings(target_in_state=False, pass_in_state=False))
    state = env.reset(0.7)
    assert env.state_size == len(ODD_NUMELS) + 1 == len(state)
    assert state[0] == 0.0 and np.all(state[1:] == 1.0)
    state, _, _ = env.step(DEFAULT_ACTIONS.index(0.5))
    assert state[0] == pytest.approx(1 / (len(ODD_NUMELS) - 1)) and state[1] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- curriculum


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.9, 0.95, 0.9123457, 0.99])
@pytest.mark.parametrize("stages", [2, 3, 4, 6])
def test_curriculum_targets(target, stages) -> None:
    targets = curriculum_targets(target, stages)
    assert len(targets) == stages
    assert all(a < b for a, b in itertools.pairwise(targets))
    assert targets[-1] == target  # exactly, not rounded
    assert 0 < targets[0] <= 0.5
    assert curriculum_targets(target, 1) == [target]


@pytest.mark.parametrize("total", [4, 10, 99, 400, 1001])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("final_share", [0.3, 0.5, 0.8])
def test_stage_episodes(total, stages, final_share) -> None:
    lengths = stage_episodes(total, stages, final_share)
    assert len(lengths) == stages and sum(lengths) == total
    assert len(set(lengths[:-1])) <= 1  # the earlier stages get equal blocks
    assert lengths[-1] >= total - round(total * (1 - final_share))  # the final stage gets at least its share


def test_search_refuses_bad_settings() -> None:
    env = PruningEnv(NUMELS, quadratic_reward)
    for settings in (SearchSettings(target_removed=0.9, episodes=3), SearchSettings(target_removed=1.0),
                     SearchSettings(target_removed=0.9, method="grid")):
        with pytest.raises(UsageError):
            run_search(env, settings)


# ------------------------------------------------------------------------------- determinism and resume

SMALL_AGENT = AgentSettings(hidden=(32, 32), batch_size=32, learning_starts=64)  # learns from episode ~5 on


def history_key(result) -> list[tuple]:
    return [(r["reward"], r["steps"], r["reached"], r["succeeded"], r["epsilon"], r["stage"]) for r in result.history]


@pytest.mark.slow
def test_same_seed_same_search_other_seed_other_search() -> None:
    def search(seed):
        return run_search(PruningEnv(NUMELS, quadratic_reward),
                          SearchSettings(target_removed=0.9, episodes=48, seed=seed, agent=SMALL_AGENT))

    a, b, c = search(3), search(3), search(4)
    assert history_key(a) == history_key(b)
    assert [(s.reward, s.sparsities, s.episode) for s in a.best] == [(s.reward, s.sparsities, s.episode)
                                                                       for s in b.best]
    assert [r["reward"] for r in a.history] != [r["reward"] for r in c.history]


class InterruptingReward:
    """The quadratic reward, but Ctrl-C arrives during its k-th call."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __call__(self, s) -> float:
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt
        return quadratic_reward(s)


@pytest.mark.slow
@pytest.mark.parametrize("near_best", [0.0, 0.5], ids=["plain", "near-best"])
def test_interrupted_search_resumes_to_the_same_result(tmp_path, near_best) -> None:
    settings = SearchSettings(target_removed=0.9, episodes=80, seed=5, checkpoint_every=5, agent=SMALL_AGENT,
                              near_best=near_best)
    reference_ckpt = tmp_path / "reference.pt"
    reference = run_search(PruningEnv(NUMELS, quadratic_reward), settings, checkpoint=reference_ckpt)

    ckpt = tmp_path / "search.pt"
    seen: list[dict] = []
    with pytest.raises(SearchInterrupted) as info:
        run_search(PruningEnv(NUMELS, InterruptingReward(37)), settings, checkpoint=ckpt, on_episode=seen.append)
    assert info.value.exit_code == 130
    assert ckpt.exists()
    saved = load_checkpoint(ckpt)
    done = saved["progress"]["episode"]
    assert done == len(seen)  # the checkpoint holds every finished episode, not just the last multiple of 5
    assert 36 <= done < settings.episodes
    assert saved["agent"]["updates"] > 0  # the agent had been learning when it was interrupted

    with pytest.raises(UsageError):  # another search's checkpoint
        run_search(PruningEnv(NUMELS, quadratic_reward), replace(settings, target_removed=0.8), checkpoint=ckpt,
                   resume=True)

    resumed = run_search(PruningEnv(NUMELS, quadratic_reward), replace(settings, checkpoint_every=7),
                         checkpoint=ckpt, resume=True)
    assert history_key(resumed) == history_key(reference)
    assert [(s.target, s.reward, s.sparsities, s.episode) for s in resumed.best] == \
        [(s.target, s.reward, s.sparsities, s.episode) for s in reference.best]
    # and the same agent: Q-network, target network and replay buffer, bit for bit
    final, expected = load_checkpoint(ckpt)["agent"], load_checkpoint(reference_ckpt)["agent"]
    for part in ("q", "target", "replay"):
        for name, value in expected[part].items():
            assert torch.equal(torch.as_tensor(final[part][name]), torch.as_tensor(value)), (part, name)
    assert final["updates"] == expected["updates"]


# ------------------------------------------------------------------------------------------ reward engines


def reward_fixture(n: int = 300, arch: str = "resnet20") -> tuple[nn.Module, TensorImages]:
    """A ResNet-20 (or another zoo `arch`) with non-trivial BatchNorm statistics and `n` random grey 28×28 images
    labelled with the dense model's own predictions, so that accuracy starts at 1 and falls as pruning changes the
    outputs."""
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, (0.5,), (0.5,))
    g = torch.Generator().manual_seed(1)

    def images(n: int) -> torch.Tensor:  # smooth random patterns, varied enough to spread the predictions
        low = F.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=28, mode="bilinear")
        noise = torch.rand(n, 1, 28, 28, generator=g) * 0.3
        return ((0.7 * low + noise) * 255).clamp(0, 255).to(torch.uint8)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
        model.train()
        for _ in range(3):
            model(to_float(images(64)))
        model.eval()
        x = images(n)
        logits = model(to_float(x))
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].bias -= logits.mean(0)  # balance the classes
        y = model(to_float(x)).argmax(1)
    return model, TensorImages(x, y)


def reference_accuracy(model: nn.Module, data: TensorImages, sparsities, recalibrate: int = 0,
                       ties: list | None = None) -> float:
    """Independent reference: a copy pruned by torch.nn.utils.prune, BatchNorm re-estimated by hand. `ties`, when
    given, receives the share of images whose two best logits are within float noise (conftest.near_tie_share)."""
    pruned = copy.deepcopy(model)
    for layer, s in zip(find_prunable_layers(pruned), sparsities, strict=True):
        prune.l1_unstructured(layer.module, "weight", amount=round(float(s) * layer.numel))
    x = to_float(data.x)
    with torch.no_grad():
        if recalibrate:
            for m in pruned.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            pruned.train()
            pruned(x[:recalibrate])
        pruned.eval()
        logits = pruned(x)
        if ties is not None:
            ties.append(near_tie_share(logits))
        return int((logits.argmax(1) == data.y).sum()) / len(data.y)


def ties_at_zero(model: nn.Module, data: TensorImages) -> float:
    """The dense model's near-tied share on the reward images: labels taken from its own answers may flip there."""
    with torch.no_grad():
        return near_tie_share(model(to_float(data.x)))


def test_near_tied_images_bound_the_difference_between_two_summation_orders() -> None:
    """The allowance above is what it claims: logits equal to float noise may change their top-1 when summed in
    another order, and only those (the two "orders" below differ by one rounding step, ~1e-7 relative)."""
    logits = torch.tensor([[1.0, 1.0 + 3e-7, 0.0], [2.0, 1.0, 0.0], [5.0, -1.0, 4.99]])
    other = logits.clone()
    other[0, 0] += 6e-7  # the first image's two best logits swap; the others keep their answer
    labels = logits.argmax(1)
    assert near_tie_share(logits) == pytest.approx(1 / 3)
    changed = float((other.argmax(1) != labels).float().mean())
    assert 0 < changed <= near_tie_share(logits)
    assert near_tie_share(torch.tensor([[1e4, 1e4 - 0.5, 0.0]])) == 1.0  # noise scales with the largest |logit|
    assert near_tie_share(torch.tensor([[1e4, 1e4 - 2.0, 0.0]])) == 0.0


@pytest.mark.parametrize("n", [pytest.param(300, marks=pytest.mark.slow), 64])
def test_reward_engines_match_pytorch_prune(n) -> None:
    model, data = reward_fixture(n)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ort_reward = Reward(model, data, RewardSettings(engine="onnxruntime", bn_recalibrate=0, finetune_steps=0))
    torch_reward = Reward(model, data, RewardSettings(engine="torch", bn_recalibrate=0, finetune_steps=0))
    assert ort_reward.engine == "onnxruntime" and torch_reward.engine == "torch"
    n_layers = len(ort_reward.numels)
    assert n_layers == len(find_prunable_layers(model))

    rng = np.random.default_rng(0)
    vectors = [np.zeros(n_layers), rng.uniform(0, 0.9, n_layers), rng.uniform(0.3, 0.95, n_layers),
               np.where(rng.random(n_layers) < 0.3, 1.0, rng.uniform(0, 0.8, n_layers))]
    # the engines sum in other orders than the reference (onnxruntime's kernels, another CPU's vector width), so an
    # image whose two best logits lie within float noise may flip: the accuracies may differ by those images only
    accuracies = []
    for s in vectors:
        ties: list[float] = []
        expected = reference_accuracy(model, data, s, ties=ties)
        assert abs(ort_reward(s) - expected) <= ties[0] + 1e-12, (ort_reward(s), expected, ties)
        assert abs(torch_reward(s) - expected) <= ties[0] + 1e-12, (torch_reward(s), expected, ties)
        accuracies.append(expected)
    # the labels are the dense model's own answers; the sparsities do change the outcome
    assert accuracies[0] >= 1.0 - ties_at_zero(model, data) - 1e-12 and len(set(accuracies)) > 2

    ort_bn = Reward(model, data, RewardSettings(engine="onnxruntime", bn_recalibrate=100, finetune_steps=0))
    torch_bn = Reward(model, data, RewardSettings(engine="torch", bn_recalibrate=100, finetune_steps=0))
    for s in vectors[1:3]:
        ties = []
        expected = reference_accuracy(model, data, s, recalibrate=100, ties=ties)
        for got in (ort_bn(s), torch_bn(s)):
            assert abs(got - expected) <= ties[0] + 1e-12, (got, expected, ties)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is left alone


@pytest.mark.slow
def test_reward_fine_tunes_briefly_from_its_threshold_on_other_images() -> None:
    """Both engines (onnxruntime, torch) against one reference."""
    model, data = reward_fixture()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = RewardSettings(images=200, bn_recalibrate=100, finetune_steps=3, finetune_from=0.6)
    n_layers = len(find_prunable_layers(model))
    below, above = np.full(n_layers, 0.5), np.full(n_layers, 0.7)
    ties: list[float] = []
    unchanged = reference_accuracy(model, TensorImages(data.x[:200], data.y[:200]), below, 100, ties=ties)

    # the reference: pruned by torch.nn.utils.prune, BatchNorm re-estimated by hand, then 3 steps of the
    # brief fine-tuning on the 100 images after the 200 measured ones, its masks from prune's weight_mask
    pruned = copy.deepcopy(model)
    masks = {}
    for layer, s in zip(find_prunable_layers(pruned), above, strict=True):
        prune.l1_unstructured(layer.module, "weight", amount=round(float(s) * layer.numel))
        masks[layer.name] = layer.module.weight_mask.bool()
        prune.remove(layer.module, "weight")
    x = to_float(data.x)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        pruned.train()
        pruned(x[:100])
    train(pruned, TensorDataset(x[200:], data.y[200:]), replace(BRIEF_FINETUNE, epochs=3.0), masks=masks)
    with torch.no_grad():
        logits = pruned.eval()(x[:200])
    expected = int((logits.argmax(1) == data.y[:200]).sum()) / 200
    assert expected != reference_accuracy(model, TensorImages(data.x[:200], data.y[:200]), above, 100)

    for engine in ("onnxruntime", "torch"):
        reward = Reward(model, data, replace(settings, engine=engine))
        assert reward.engine == engine
        # below the threshold: no fine-tuning (near-tied images may flip, see the test above)
        assert abs(reward(below) - unchanged) <= ties[0] + 1e-12, engine
        first = reward(above)
        assert abs(first - expected) <= near_tie_share(logits) + 1e-12, (engine, first, expected)
        assert reward(above) == first, engine  # the same images every time: a deterministic reward
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is left alone


def test_reward_averages_the_brief_fine_tuning_over_image_orders(monkeypatch, tmp_path) -> None:
    """With finetune_repeats=3 the reward is the mean of three brief fine-tunings of the same pruned model, one
    per image order: the rewards that one fine-tuning gives with the order seeds 0 (the default, one order: the
    reward as before), 1 and 2. The rule holds for any model and learning rate: a LeNet-5 trained on conftest's
    faint task, fine-tuned at a learning rate at which the orders give other rewards (at the default 0.01 three
    steps change too little for 100 images to show it, so a mean of equal numbers would prove nothing)."""
    model = make_tiny_task(tmp_path, n=400, n_train=300, steps=60, faint=True)
    arrays = np.load(tmp_path / "data.npz")
    data = TensorImages(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).long())
    # 3 steps of 128 on the 200 images after the 100 measured ones: 1.5 epochs, so the order matters
    settings = RewardSettings(engine="torch", images=100, bn_recalibrate=0, finetune_steps=3, finetune_from=0.6)
    sparsities = np.full(len(find_prunable_layers(model)), 0.8)
    assert BRIEF_FINETUNE.seed == 0
    brief = replace(BRIEF_FINETUNE, lr=0.2)
    single = []
    for seed in (0, 1, 2):
        monkeypatch.setattr(weights_module, "BRIEF_FINETUNE", replace(brief, seed=seed))
        single.append(Reward(model, data, settings)(sparsities))
    assert len(set(single)) > 1, single  # the orders give other rewards, so the mean below means something
    monkeypatch.setattr(weights_module, "BRIEF_FINETUNE", brief)
    assert Reward(model, data, replace(settings, finetune_repeats=3))(sparsities) == pytest.approx(
        sum(single) / 3, abs=1e-12)
    with pytest.raises(UsageError):
        Reward(model, data, replace(settings, finetune_repeats=0))


# ------------------------------------------------------------------------------------------------ agent


def test_update_fits_a_fixed_batch(monkeypatch) -> None:
    agent = DQNAgent(4, 3, AgentSettings(hidden=(32,), batch_size=16, lr=1e-2), seed=0)
    rng = np.random.default_rng(0)
    states = rng.random((16, 4)).astype(np.float32)
    actions, rewards = rng.integers(0, 3, 16), rng.random(16).astype(np.float32)
    for i in range(16):
        agent.replay.add(states[i], actions[i], rewards[i], states[(i + 1) % 16], 1.0)
    batch = tuple(torch.from_numpy(a) for a in (agent.replay.states[:16], agent.replay.actions[:16],
                                                 agent.replay.rewards[:16], agent.replay.next_states[:16],
                                                 agent.replay.dones[:16]))
    monkeypatch.setattr(agent.replay, "sample", lambda batch_size, rng: batch)
    losses = [agent.update() for _ in range(300)]
    assert losses[-1] < 0.05 * losses[0]
    assert agent.updates == 300
    with torch.no_grad():
        fitted = agent.q(batch[0]).gather(1, batch[1][:, None]).squeeze(1)
    np.testing.assert_allclose(fitted.numpy(), rewards, atol=0.05)


def constant_q(net: nn.Module, values: list[float]) -> None:
    """Make a Q-network output `values` for every state: zero last-layer weights, bias = values."""
    last = net.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(values))


def test_double_dqn_target_uses_online_argmax_and_target_value(monkeypatch) -> None:
    settings = AgentSettings(hidden=(8,), gamma=0.9, n_step=2, target_tau=0.25)
    agent = DQNAgent(3, 3, settings, seed=0)
    constant_q(agent.q, [0.0, 1.0, 0.5])  # online argmax: action 1
    constant_q(agent.target, [5.0, 2.0, 7.0])  # target max is action 2 (7); at the online choice: 2
    rewards = torch.tensor([0.3, -0.2, 0.6, 0.1])
    dones = torch.tensor([0.0, 0.0, 1.0, 1.0])
    batch = (torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), rewards, torch.rand(4, 3), dones)
    monkeypatch.setattr(agent.replay, "sample", lambda batch_size, rng: batch)
    seen = {}

    def loss(values, td_target):
        seen["values"], seen["td_target"] = values.detach().clone(), td_target.clone()
        return F.smooth_l1_loss(values, td_target)

    monkeypatch.setattr(agent_module, "F", SimpleNamespace(smooth_l1_loss=loss))
    target_before = [p.detach().clone() for p in agent.target.parameters()]
    agent.update()
    expected = rewards + 0.9**2 * 2.0 * (1 - dones)  # Double DQN: r + γⁿ·Q_target(s', argmax Q_online(s'))
    torch.testing.assert_close(seen["td_target"], expected)
    torch.testing.assert_close(seen["values"], torch.tensor([0.0, 1.0, 0.5, 0.0]))
    # the target network moved a quarter of the way towards the updated online network
    for before, p, tp in zip(target_before, agent.q.parameters(), agent.target.parameters(), strict=True):
        torch.testing.assert_close(tp.detach(), before + 0.25 * (p.detach() - before))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_n_step_transitions_carry_the_terminal_reward_back(gamma) -> None:
    n, steps, final_reward = 3, 6, 0.7
    agent = DQNAgent(4, 3, AgentSettings(hidden=(8,), n_step=n, gamma=gamma, learning_starts=10**6), seed=0)
    states = [np.full(4, t / 10, np.float32) for t in range(steps + 1)]
    transitions = [(states[t], t % 3, final_reward if t == steps - 1 else 0.0, states[t + 1],
                    float(t == steps - 1)) for t in range(steps)]
    agent.learn_from_episode(transitions)
    assert agent.replay.size == steps and agent.updates == 0
    for t in range(steps):
        to_end = steps - 1 - t  # steps from t to the terminal one
        expected_return = gamma**to_end * final_reward if to_end < n else 0.0
        assert agent.replay.rewards[t] == pytest.approx(expected_return)
        assert agent.replay.dones[t] == float(to_end < n)
        np.testing.assert_array_equal(agent.replay.next_states[t], states[min(t + n, steps)])
        np.testing.assert_array_equal(agent.replay.states[t], states[t])
        assert agent.replay.actions[t] == t % 3


def test_learning_starts_and_updates_per_step() -> None:
    agent = DQNAgent(4, 3, AgentSettings(hidden=(8,), batch_size=4, learning_starts=10, updates_per_step=0.5),
                     seed=0)
    episode = [(np.zeros(4, np.float32), 0, 0.0, np.zeros(4, np.float32), 0.0)] * 5 + \
        [(np.zeros(4, np.float32), 1, 1.0, np.ones(4, np.float32), 1.0)]
    agent.learn_from_episode(episode)
    assert agent.updates == 0  # 6 transitions < learning_starts
    agent.learn_from_episode(episode)
    assert agent.updates == 3  # half a gradient step per environment step


def test_brief_fine_tuning_starts_at_its_threshold_met_to_the_weight(monkeypatch) -> None:
    """A search episode meets its target to the weight, round(target × total); when that count rounds down,
    the episode is a fraction of a weight short of the threshold and must still be fine-tuned."""
    model, data = reward_fixture()
    total = sum(layer.numel for layer in find_prunable_layers(model))
    threshold = (int(0.7 * total) + 0.45) / total  # its whole-weight count rounds down by 0.45 of a weight
    assert round(threshold * total) < threshold * total - 0.4
    reward = Reward(model, data, RewardSettings(images=200, bn_recalibrate=0, finetune_steps=1,
                                                finetune_from=threshold))
    fine_tuned = []
    monkeypatch.setattr(reward, "_briefly_finetuned_accuracy", lambda per_layer: fine_tuned.append(1) or 0.5)

    env = PruningEnv(reward.numels, reward)
    env.reset(threshold)
    done = False
    while not done:  # remove everything from each layer: the crossing step is clipped to the target
        _, value, done = env.step(len(DEFAULT_ACTIONS) - 1)
    assert env.pruned_counts().sum() == round(threshold * total)
    assert value == 0.5 and fine_tuned == [1]

    short = env.sparsities().copy()
    short[0] -= 1.0 / env.numels[0]  # one weight fewer: below the threshold
    reward(short)
    assert fine_tuned == [1]
