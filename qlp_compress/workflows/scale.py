"""Where a search's rewards are scored: in this process (the reward the workflows build in memory) or on Ray workers
(each building the same scorer from the reward description), and what the report says about it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError
from qlp_compress.base.messages import console
from qlp_compress.report.progress import is_quiet, phase
from qlp_compress.reward.spec import make_spec
from qlp_compress.reward.workers import RewardPool, ScaleSettings, check_reachable, import_ray
from qlp_compress.search.curriculum import ScoreBatch, SearchResult
from qlp_compress.workflows.workspace import Workspace


def check_scale(workers: int, threads: int, batch_episodes: int | None, address: str | None) -> None:
    """The search's --workers, --worker-threads, --batch-episodes and --ray-address, before anything is loaded: Ray
    installed, and a cluster named by --ray-address or RAY_ADDRESS reachable."""
    validate.whole("--workers", workers, 0, "2")
    validate.whole("--worker-threads", threads, 1, "1")
    if batch_episodes is not None:
        validate.whole("--batch-episodes", batch_episodes, 1, "4")
    if address is not None and not workers:
        raise UsageError("--ray-address joins a Ray cluster for the reward workers; give --workers N too")
    if workers:
        import_ray()
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address)


@dataclass
class Scoring:
    """What a search scores with: `reward_fn` for one allocation, and `score_batch` for a batch (None: in turn)."""

    reward_fn: Callable
    score_batch: ScoreBatch | None
    engine: str
    pool: RewardPool | None = None


@contextlib.contextmanager
def scoring(structure: str, ws: Workspace, settings, scale: ScaleSettings,
            local: Callable[[], object]) -> Iterator[Scoring]:
    """In this process (`scale.workers` 0): the reward `local()` builds. On workers: a Ray pool built from the
    description of that reward, stopped when the block ends (Ctrl-C included)."""
    if not scale.workers:
        reward = local()
        yield Scoring(reward, None, getattr(reward, "engine", "torch"))
        return
    spec = make_spec(structure, ws.loaded.module, ws.splits.reward, settings, ws.loaded.sha256, ws.data.name,
                     ws.split_seed)
    with phase(f"start {scale.workers} Ray reward worker(s)"):
        pool = RewardPool(spec, scale)
    try:
        if not is_quiet():
            console.print(pool.describe(), highlight=False, soft_wrap=True)
        yield Scoring(lambda s: pool.score([s])[0][0], pool.score, pool.engine, pool)
    finally:
        pool.close()


def scale_record(scale: ScaleSettings, batch_episodes: int, result: SearchResult, pool: RewardPool | None) -> dict:
    """{"scale": the workers, K, the worker-seconds spent and the search's wall time} for policy.json and the report;
    {} for a search in this process one episode at a time, which records what it always did."""
    if not (scale.workers or batch_episodes > 1):
        return {}
    episodes = len(result.history)
    wall = result.wall_seconds or result.total_seconds
    return {"scale": {
        "workers": scale.workers, "worker_threads": scale.threads if scale.workers else None,
        "batch_episodes": batch_episodes, "where": pool.describe() if pool else "in this process",
        "worker_seconds": round(result.reward_seconds, 2) if pool else None,  # inside the workers' scorers
        "wall_seconds": round(wall, 2), "episodes_per_second": round(episodes / max(wall, 1e-9), 4),
        "workers_lost": pool.losses if pool else 0, "allocations_rescored": pool.rescored if pool else 0,
        "dispatch_seconds_per_batch": round(pool.dispatch_seconds / max(1, pool.batches), 4) if pool else None}}


def search_title(title: str, scale: ScaleSettings, batch_episodes: int) -> str:
    """The search's progress title, naming the workers and K when the rewards are scored on workers."""
    if not scale.workers:
        return title if batch_episodes == 1 else f"{title} (K = {batch_episodes})"
    where = f"at {scale.address}" if scale.address else "here"
    return f"{title} on {scale.workers} Ray worker(s) {where}, K = {batch_episodes}"


IN_PROCESS = {"workers": 0, "batch_episodes": 1, "where": "in this process"}  # the report's `scale` by default
