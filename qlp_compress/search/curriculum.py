"""The QLP search: DQN episodes in the pruning environment through a curriculum of increasing targets.

Each stage of the curriculum is a block of episodes at one target (the share of the cost removed: of the weights,
or of the predicted latency); the replay buffer and the networks carry over from stage to stage, and the best
episode of every stage is kept, so one search gives a policy for each intermediate target too.

Demonstrations (our addition, see docs/method.md): each stage opens with one episode per baseline
allocation named in `demonstrations` (LAMP, ERK, …), played through the same game by steering every
step towards that allocation. They count as episodes and reward evaluations, go into the replay buffer
like any other episode, and compete for the stage's best; the search then explores from what they teach.

Near-best episodes (our addition, `near_best`; see docs/method.md): the last share of each stage's episodes
start from the stage's best allocation so far and change a few randomly chosen layers by relative steps
(`env.NearBestEnv`), the other layers rescaled to meet the target exactly. A second DQN learns which steps
pay; it has its own action set, replay and exploration schedule. Every such episode is a candidate for the
stage's best, so the search climbs from the best allocation instead of starting each episode from scratch.

Random search ("random") plays the same game with uniformly random actions, all at the final target, for
the same number of reward evaluations.

Batches (`batch_episodes` K): the agents play K episodes with their networks as they are, the K allocations are
scored together (`score_batch`: on workers, say), then the agents learn from them in episode order (K = 1: as ever).

Interrupts: a checkpoint (search.checkpoint) holds everything (agent, replay, RNG states, history, best-so-far) as
of the end of a batch. Ctrl-C or SIGTERM during a batch drops that batch and writes the checkpoint as of the last
one; `resume` continues and ends with the same policy as an uninterrupted run. A checkpoint keeps the settings and
the caller's `run_record` (base.resume), and a resume with others is refused, naming the option.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qlp_compress.base import validate
from qlp_compress.base.errors import Interrupted, UsageError
from qlp_compress.base.interrupts import deferred_interrupts, sigterm_as_interrupt
from qlp_compress.base.names import SEARCH_METHODS
from qlp_compress.search import checkpoint as saved
from qlp_compress.search.agent import AgentSettings, DQNAgent
from qlp_compress.search.checkpoint import SearchProgress, StageBest
from qlp_compress.search.env import EnvSettings, NearBestEnv, PruningEnv, RewardFn

ScoreBatch = Callable[[list[np.ndarray]], list[tuple[float, float]]]  # allocations → [(score, seconds)], in order


class SearchInterrupted(Interrupted):
    """The search stopped on Ctrl-C/SIGTERM after writing its checkpoint (exit code 130)."""


@dataclass(frozen=True)
class SearchSettings:
    """One search."""

    target_removed: float  # share of the cost the final stage removes: of the weights, or 1 - 1/speedup of latency
    episodes: int = 400  # total episodes (= reward evaluations) over all stages
    stages: int = 4  # curriculum stages; 1 = no curriculum
    first_target: float = 0.5  # sparsity of the first stage (capped at half the final target)
    final_share: float = 0.5  # share of the episodes spent at the final target
    stage_targets: tuple[float, ...] = ()  # explicit curriculum (increasing, ending at target); overrides stages
    method: str = "qlp"  # "qlp" (DQN with curriculum) or "random" (random actions, final target only)
    demonstrations: tuple[str, ...] = ("lamp", "erk", "global", "uniform")  # baseline allocations replayed at the
    #                                                                       start of every stage (qlp only)
    near_best: float = 0.5  # share of each stage's episodes after its demonstrations that start from the stage's
    #                         best allocation so far (near-best episodes, qlp only; 0 = none)
    exact_demonstrations: bool = True  # a demonstration is scored at its allocator's exact allocation (False:
    #                                    at the allocation its 10 %-step replay reaches)
    seed: int = 0  # agent initialisation, exploration and replay sampling
    batch_episodes: int = 1  # episodes played with one network before they are scored and learnt from (K)
    checkpoint_every: int = 10  # episodes between checkpoint writes
    env: EnvSettings = field(default_factory=EnvSettings)  # the pruning game
    agent: AgentSettings = field(default_factory=AgentSettings)  # DQN hyper-parameters


def curriculum_targets(target: float, stages: int, first_target: float = 0.5) -> list[float]:
    """Increasing targets ending at `target`, evenly spaced in log-density (0.5→0.71→0.83→0.9 for 0.9)."""
    if stages <= 1:
        return [target]
    first = first_target if target > first_target else target / 2
    d0, d1 = 1.0 - first, 1.0 - target
    return [round(1.0 - d0 * (d1 / d0) ** (k / (stages - 1)), 6) for k in range(stages - 1)] + [target]


def stage_episodes(total: int, stages: int, final_share: float = 0.5) -> list[int]:
    """Episodes per stage: the final stage gets `final_share` of them, the earlier stages equal blocks."""
    if stages == 1:
        return [total]
    base = round(total * (1.0 - final_share)) // (stages - 1)
    return [base] * (stages - 1) + [total - base * (stages - 1)]


@dataclass(frozen=True)
class SearchResult:
    settings: SearchSettings
    best: list[StageBest]  # the best episode of each stage; the last is the answer
    history: list[dict]
    reward_seconds: float
    total_seconds: float
    wall_seconds: float = 0.0

    @property
    def final(self) -> StageBest:
        return self.best[-1]


def _epsilon(a: AgentSettings, stage: int, episode_in_stage: int, stage_length: int, method: str) -> float:
    if method == "random":
        return 1.0
    start = a.eps_start if stage == 0 else a.eps_restart
    progress = min(1.0, episode_in_stage / max(1.0, a.exploration_fraction * stage_length))
    return float(start + (a.eps_end - start) * progress)  # a numpy scalar here would make the checkpoint unloadable


def _near_best_agent(env: PruningEnv, settings: SearchSettings) -> DQNAgent:
    """The near-best episodes' own DQN: its episodes are a few steps long, so it learns from the first."""
    agent = replace(settings.agent, learning_starts=0, demo_learning=False)
    return DQNAgent(env.state_size, len(settings.env.relative_steps), agent, settings.seed + 1_000_003)


def scored_in_turn(reward_fn: RewardFn) -> ScoreBatch:
    """Score a batch's allocations one after another in this process: [(score, seconds)] in their order."""

    def score(allocations: list[np.ndarray]) -> list[tuple[float, float]]:
        out = []
        for allocation in allocations:
            t0 = time.perf_counter()
            value = float(reward_fn(allocation))
            out.append((value, time.perf_counter() - t0))
        return out

    return score


class _Deferred:
    """The environments' reward function while a batch is played: it keeps the allocation to be scored and answers
    0; the batch's allocations are scored together once all its episodes are played."""

    def __init__(self):
        self.allocation: np.ndarray | None = None

    def __call__(self, sparsities: np.ndarray) -> float:
        self.allocation = np.asarray(sparsities, dtype=np.float64).copy()
        return 0.0


def run_search(
    env: PruningEnv,
    settings: SearchSettings,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_episode: Callable[[dict], None] | None = None,
    allocation: Callable[[str, float], np.ndarray] | None = None,
    run_record: Mapping[str, object] | None = None,
    score_batch: ScoreBatch | None = None,
) -> SearchResult:
    """Run (or resume) a search; returns the best policy of every stage.

    `allocation(name, target)` gives the per-layer sparsities of a baseline allocator, for the
    demonstrations; without it the search plays none. `run_record`: what else shapes the run's results
    (base.resume), kept in the checkpoint and compared on resume. `score_batch` scores a batch's allocations (in
    parallel, on workers, say) and returns them in order; without it `env.reward_fn` scores them in turn.

    Episodes are played in batches of `settings.batch_episodes`, all with the networks as they were at the batch's
    start; their allocations are then scored, and the agents learn from the episodes in episode order. The result
    depends on the batch size, never on who scored the allocations or in which order they finished."""
    if settings.method not in SEARCH_METHODS:
        raise UsageError(f"unknown search method {settings.method!r}; use one of {', '.join(SEARCH_METHODS)}")
    target = settings.target_removed  # (--sparsity and --speedup were checked as the options they are)
    if not 0.0 < target < 1.0:
        raise UsageError(f"the search's target share of the cost removed must lie strictly in (0, 1), got {target}")
    validate.whole("--batch-episodes", settings.batch_episodes, 1, "4")
    if settings.method == "random":
        targets = [target]
    elif settings.stage_targets:
        targets = list(settings.stage_targets)
        if targets[-1] != target or any(a >= b for a, b in itertools.pairwise(targets)):
            raise UsageError(f"curriculum targets {targets} must increase and end at the target {target}")
    else:
        targets = curriculum_targets(target, settings.stages, settings.first_target)
    stages = len(targets)
    lengths = stage_episodes(settings.episodes, stages, settings.final_share)
    if min(lengths) < 1:
        raise UsageError(f"--episodes {settings.episodes} is fewer than the {stages} curriculum stages")
    if not 0.0 <= settings.near_best <= 1.0 or settings.env.near_best_layers < 1:
        raise UsageError(f"the near-best share must be between 0 and 1 (got {settings.near_best}) and the layers "
                         f"a near-best episode changes at least 1 (got {settings.env.near_best_layers})")
    agent = DQNAgent(env.state_size, env.n_actions, settings.agent, settings.seed)
    learn = settings.method == "qlp"
    demos = settings.demonstrations if learn and allocation is not None else ()
    score = score_batch or scored_in_turn(env.reward_fn)
    deferred = _Deferred()
    near_env = NearBestEnv(env.numels, deferred, env.settings) if learn and settings.near_best > 0 else None
    near = _near_best_agent(env, settings) if near_env is not None else None
    near_counts = [round(settings.near_best * max(0, n - len(demos))) if near_env is not None else 0
                   for n in lengths]
    progress = SearchProgress(best=[StageBest(t) for t in targets])
    if resume and checkpoint is not None and checkpoint.exists():
        progress = saved.load(checkpoint, settings, agent, near, run_record)

    stage_of = np.repeat(np.arange(stages), lengths)
    stage_start = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    rngs = [a.rng for a in (agent, near) if a is not None]
    rng_at_start, episode_at_start = [r.bit_generator.state for r in rngs], progress.episode
    reward_fn, env.reward_fn = env.reward_fn, deferred
    with sigterm_as_interrupt():
        try:
            while progress.episode < settings.episodes:
                started = time.perf_counter()
                rng_at_start, episode_at_start = [r.bit_generator.state for r in rngs], progress.episode
                played = []
                for e in range(progress.episode, min(progress.episode + settings.batch_episodes, settings.episodes)):
                    k = int(stage_of[e])
                    in_stage = e - stage_start[k]
                    eps = _epsilon(settings.agent, k, in_stage, lengths[k], settings.method)
                    near_from = lengths[k] - near_counts[k]
                    learner = agent
                    deferred.allocation = None
                    if in_stage >= near_from and progress.best[k].sparsities is not None:
                        eps = _epsilon(settings.agent, 1, in_stage - near_from, near_counts[k], settings.method)
                        n_layers = min(settings.env.near_best_layers, env.n_layers - 1)
                        layers = sorted(int(i) for i in near.rng.choice(env.n_layers, n_layers, replace=False))
                        near_env.start_from(progress.best[k].sparsities, layers)
                        record, transitions = _play_episode(near_env, targets[k],
                                                            lambda state, e=eps: near.act(state, e))
                        record.update(epsilon=round(eps, 4), near_best=True)
                        learner = near
                    elif in_stage < len(demos):
                        wanted = np.asarray(allocation(demos[in_stage], targets[k]), dtype=np.float64)
                        record, transitions = _play_episode(env, targets[k], lambda _, g=1.0 - wanted:
                                                            env.action_towards(g),
                                                            exact=wanted if settings.exact_demonstrations else None)
                        record.update(epsilon=0.0, demonstration=demos[in_stage],
                                      last_demonstration=in_stage == len(demos) - 1)
                    else:
                        record, transitions = _play_episode(env, targets[k],
                                                            lambda state, e=eps: agent.act(state, e))
                        record["epsilon"] = round(eps, 4)
                    played.append((k, record, transitions, learner, deferred.allocation))
                _score_played(played, score)
                bests = _finish_batch(settings, agent, progress, checkpoint, learn, played, targets, near, run_record,
                                      time.perf_counter() - started)
                if on_episode:
                    for (_, record, _, _, _), best in zip(played, bests, strict=True):
                        on_episode({**record, "best": best.reward, "stages": stages, "episodes": settings.episodes})
        except KeyboardInterrupt:  # anywhere in the loop: keep the batches that finished, drop the one running
            if progress.episode == episode_at_start:  # the running batch did not count
                for r, state in zip(rngs, rng_at_start, strict=True):
                    r.bit_generator.state = state  # as if it never started
            if checkpoint is not None:
                with deferred_interrupts():
                    saved.save(checkpoint, settings, agent, progress, near, run_record)
            where = f"; rerun the same command with --resume to continue (checkpoint {checkpoint})" \
                if checkpoint else "; rerun the command to start again"
            raise SearchInterrupted(f"search interrupted after {progress.episode} episodes{where}") from None
        finally:
            env.reward_fn = reward_fn
    return SearchResult(settings, progress.best, progress.history, progress.reward_seconds, progress.total_seconds,
                        progress.wall_seconds)


def _score_played(played: list[tuple], score: ScoreBatch) -> None:
    """Score the allocations of the batch's episodes that met their target, and write each score where the reward
    function's answer would have gone: the episode's reward and its last transition's."""
    waiting = [p for p in played if p[4] is not None]
    results = score([p[4] for p in waiting]) if waiting else []
    for (_, record, transitions, _, _), (value, seconds) in zip(waiting, results, strict=True):
        state, action, _, next_state, done = transitions[-1]
        transitions[-1] = (state, action, float(value), next_state, done)
        record.update(reward=float(value), _reward_seconds=seconds, seconds=record["seconds"] + seconds)


def _finish_batch(settings: SearchSettings, agent: DQNAgent, progress: SearchProgress, checkpoint: Path | None,
                  learn: bool, played: list[tuple], targets: list[float], near: DQNAgent | None,
                  run_record: Mapping | None, seconds: float) -> list[StageBest]:
    """Learn from a scored batch in episode order and record it, as one unit that an interrupt cannot split; the
    checkpoint is written at the end of a batch that reached a multiple of `checkpoint_every` or the last episode."""
    with deferred_interrupts():
        bests = [_finish_episode(agent, progress, learn, record, transitions, k, targets[k], learner)
                 for k, record, transitions, learner, _ in played]
        progress.wall_seconds += seconds
        end, every = progress.episode, settings.checkpoint_every
        if checkpoint is not None and (end // every > (end - len(played)) // every or end == settings.episodes):
            saved.save(checkpoint, settings, agent, progress, near, run_record)
    return bests


def _finish_episode(agent: DQNAgent, progress: SearchProgress, learn: bool, record: dict, transitions: list[tuple],
                    k: int, target: float, learner: DQNAgent) -> StageBest:
    """Learn from a finished episode (`learner`: the agent that played it) and record it."""
    if learn:
        learner.learn_from_episode(transitions, demonstration=record.get("demonstration") is not None)
        if record.get("last_demonstration"):
            agent.pretrain()  # the stage's demonstrations are all in: DQfD's pre-training on them
    record.pop("last_demonstration", None)
    record.update(stage=k + 1, target=target, episode=progress.episode + 1)
    progress.history.append(record)
    progress.reward_seconds += record.pop("_reward_seconds")
    progress.total_seconds += record["seconds"]
    best = progress.best[k]
    if record["succeeded"] and record["reward"] > best.reward:
        best.reward, best.sparsities, best.episode = record["reward"], record.pop("_sparsities"), progress.episode + 1
        best.demonstration = record.get("demonstration")
        best.near_best = bool(record.get("near_best"))
    record.pop("_sparsities", None)
    progress.episode += 1
    return best


def _play_episode(env: PruningEnv, target: float, choose: Callable[[np.ndarray], int],
                  exact: np.ndarray | None = None) -> tuple[dict, list[tuple]]:
    """One episode; `exact` (a demonstration's allocation) is what its reward measures and what it records,
    so that a demonstration is never worse than its allocator because of the action grid; its transitions
    still show how the game's actions reach that allocation."""
    started = time.perf_counter()
    reward_seconds = 0.0
    state = env.reset(target)
    exact_sparsities = env.exact_sparsities(exact) if exact is not None else None
    transitions = []
    done = False
    while not done:
        action = choose(state)
        t0 = time.perf_counter()
        next_state, reward, done = env.step(action, evaluate_at=exact_sparsities)
        if done:
            reward_seconds = time.perf_counter() - t0
        transitions.append((state, action, reward, next_state, float(done)))
        state = next_state
    succeeded = env.met_target()
    record = {"reward": float(reward), "steps": len(transitions),
              "reached": env.removed(), "succeeded": bool(succeeded),
              "seconds": time.perf_counter() - started, "_reward_seconds": reward_seconds if succeeded else 0.0,
              "_sparsities": [float(s) for s in (env.sparsities() if exact_sparsities is None else exact_sparsities)]
              if succeeded else None}
    return record, transitions


def check_budget(episodes: int, stages: int, stages_option: bool = True) -> None:
    """Every curriculum stage needs at least one episode (`stages_option`: the command has --stages)."""
    validate.whole("--episodes", episodes, 1, "400")
    validate.whole("--stages", stages, 1, "4")
    if stages > episodes or min(stage_episodes(episodes, stages)) < 1:
        least = next(n for n in range(stages, 4 * stages + 2) if min(stage_episodes(n, stages)) >= 1)
        fewer = ", or fewer --stages" if stages_option else ""
        raise UsageError(f"--episodes {episodes} is too few for {stages} curriculum stages (each needs at least "
                         f"one episode); give --episodes {least} or more{fewer}")
