"""A search's checkpoint: the agents, the replay, the RNG states, the history and the best so far, as of the end of
a batch of episodes, with the settings and the caller's run record (base.resume); a resume with other settings is
refused, naming the option."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import atomic_torch_save, load_checkpoint
from qlp_compress.base.resume import check_same, flatten
from qlp_compress.search.agent import DQNAgent


@dataclass
class StageBest:
    target: float
    reward: float = -float("inf")
    sparsities: list[float] | None = None
    episode: int = -1
    demonstration: str | None = None  # the baseline whose demonstration this is, None when the agent found it
    near_best: bool = False  # found by a near-best episode (started from the stage's best so far)


@dataclass
class SearchProgress:
    """Everything a search accumulates besides the agent; saved in checkpoints."""

    episode: int = 0  # episodes completed
    history: list[dict] = field(default_factory=list)  # one record per episode
    best: list[StageBest] = field(default_factory=list)  # one per stage
    reward_seconds: float = 0.0  # wall time inside the reward function
    total_seconds: float = 0.0  # time of the episodes, reward included (their sum: worker time when scored in parallel)
    wall_seconds: float = 0.0  # wall time of the search's batches


def save(path: Path, settings: object, agent: DQNAgent, progress: SearchProgress,
         near: DQNAgent | None = None, run_record: Mapping | None = None) -> None:
    state = {"settings": asdict(settings), "record": dict(run_record or {}), "agent": agent.state_dict(),
             "progress": {**asdict(progress), "best": [asdict(b) for b in progress.best]}}
    if near is not None:
        state["near_agent"] = near.state_dict()
    atomic_torch_save(state, path)


# the search settings a user sets, by option (the others are the tool's own)
OPTIONS = {"seed": "--seed", "method": "--method", "episodes": "--episodes", "stages": "--stages",
           "env.passes": "--passes", "demonstrations": "--demonstrations", "near_best": "--near-best",
           "batch_episodes": "--batch-episodes"}


def load(path: Path, settings: object, agent: DQNAgent, near: DQNAgent | None = None,
         run_record: Mapping | None = None) -> SearchProgress:
    state = load_checkpoint(path)
    check_same(state.get("record"), run_record)
    old, new = normalise(state.get("settings")), normalise(asdict(settings))
    if old != new:
        if isinstance(old, dict):  # name the option that differs when a user can set it
            named = {OPTIONS.get(k, f"search setting {k}"): v for k, v in flatten(old).items()}
            check_same(named, {OPTIONS.get(k, f"search setting {k}"): v for k, v in flatten(new).items()})
        raise UsageError(f"{path} belongs to a search with other settings; rerun with the same options, or pass "
                         "--force instead of --resume to start over")
    try:
        agent.load_state_dict(state["agent"])
        if near is not None:
            near.load_state_dict(state["near_agent"])
        p = state["progress"]
        return SearchProgress(episode=p["episode"], history=p["history"], best=[StageBest(**b) for b in p["best"]],
                              reward_seconds=p["reward_seconds"], total_seconds=p["total_seconds"],
                              wall_seconds=p.get("wall_seconds", p["total_seconds"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise QLPError(f"checkpoint {path} is damaged ({type(e).__name__}); pass --force instead of --resume to "
                       "start over") from e


def normalise(settings: dict | None) -> dict | None:
    """Settings minus what may change between a run and its resumption (the checkpoint interval)."""
    if settings is None:
        return None
    out = dict(settings)
    out.pop("checkpoint_every", None)
    if "target" in out:  # checkpoints written before the field was named for what it is
        out["target_removed"] = out.pop("target")
    if out.get("batch_episodes", 1) == 1:  # the default; older checkpoints lack the field
        out.pop("batch_episodes", None)
    if out.get("exact_demonstrations", True):  # the default; older checkpoints lack the field
        out.pop("exact_demonstrations", None)
    if not out.get("near_best"):  # without near-best episodes their settings change nothing (and older
        out.pop("near_best", None)  # checkpoints, which lack them, stay resumable)
        out["env"] = {k: v for k, v in out.get("env", {}).items() if k not in ("relative_steps", "near_best_layers")}
    return _tuples_to_lists(out)


def _tuples_to_lists(x):
    if isinstance(x, dict):
        return {k: _tuples_to_lists(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_tuples_to_lists(v) for v in x]
    return x
