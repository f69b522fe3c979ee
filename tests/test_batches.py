"""Batched episodes (search.curriculum, `batch_episodes` K): the agent plays K episodes with one network, their
allocations are scored together, and it learns from them in episode order. A search interrupted inside a batch resumes
to the result of an uninterrupted one, and the result does not depend on who scores a batch or in which order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from qlp_compress.base.io import load_checkpoint
from qlp_compress.search.agent import AgentSettings
from qlp_compress.search.curriculum import SearchInterrupted, SearchSettings, run_search, scored_in_turn
from qlp_compress.search.env import PruningEnv

NUMELS = np.array([500, 4000, 8000, 2000])
SETTINGS = SearchSettings(target_removed=0.8, episodes=30, stages=2, seed=2, batch_episodes=3, checkpoint_every=4,
                          agent=AgentSettings(hidden=(16,), batch_size=16, learning_starts=32))


def reward(s) -> float:
    return 1.0 - float(np.sum(np.array([8.0, 2.0, 1.0, 4.0]) * NUMELS * np.asarray(s) ** 2) / NUMELS.sum())


def key(result) -> tuple:
    return ([(h["reward"], h["steps"], h["reached"], h["epsilon"]) for h in result.history],
            [(b.reward, b.sparsities, b.episode) for b in result.best])


def test_a_batch_interrupted_while_it_is_scored_resumes_to_the_uninterrupted_search(tmp_path):
    reference = run_search(PruningEnv(NUMELS, reward), SETTINGS, checkpoint=tmp_path / "reference.pt")
    assert key(reference) != key(run_search(PruningEnv(NUMELS, reward), replace(SETTINGS, batch_episodes=1)))

    calls = []

    def stopped_on_call_14(s):
        calls.append(1)
        if len(calls) == 14:
            raise KeyboardInterrupt
        return reward(s)

    checkpoint = tmp_path / "search.pt"
    with pytest.raises(SearchInterrupted):
        run_search(PruningEnv(NUMELS, stopped_on_call_14), SETTINGS, checkpoint=checkpoint)
    assert load_checkpoint(checkpoint)["progress"]["episode"] % SETTINGS.batch_episodes == 0  # whole batches only

    def backwards(allocations):  # scored last first: only the order of the answers counts
        return scored_in_turn(reward)(allocations[::-1])[::-1]

    resumed = run_search(PruningEnv(NUMELS, reward), SETTINGS, checkpoint=checkpoint, resume=True,
                         score_batch=backwards)
    assert key(resumed) == key(reference)
    final, expected = load_checkpoint(checkpoint)["agent"], load_checkpoint(tmp_path / "reference.pt")["agent"]
    assert all(torch.equal(final["q"][k], v) for k, v in expected["q"].items())
