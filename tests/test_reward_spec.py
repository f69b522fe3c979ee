"""The reward description (reward.spec): a frozen, picklable RewardSpec from which any process builds the scorer that
the search builds in memory, scoring every allocation alike. The reference is the reward the workflows build today
(Reward, ChannelReward) in this process."""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle

import numpy as np
import pytest
from conftest import make_tiny_task

from qlp_compress.base.errors import QLPError
from qlp_compress.data import materialize
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.reward.channels import ChannelReward, ChannelRewardSettings
from qlp_compress.reward.spec import load_network, make_spec, score_all
from qlp_compress.reward.weights import Reward, RewardSettings
from qlp_compress.workflows.workspace import DataSettings, ModelSettings, open_workspace

WEIGHT = RewardSettings(images=200, finetune_steps=2, finetune_from=0.8, device="cpu")  # brief fine-tuning at ≥ 0.8
CHANNEL = ChannelRewardSettings(images=200, device="cpu")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("faint_task")
    make_tiny_task(root, n=700, n_train=600, steps=60, faint=True)  # faint shapes: pruning costs accuracy
    return open_workspace(root / "lenet.onnx", ModelSettings(), DataSettings(str(root / "data.npz"), reward_size=400),
                          "cpu")


def weight_case(ws):
    reward = Reward(ws.loaded.module, ws.splits.reward, WEIGHT)
    rng = np.random.default_rng(0)
    n = len(reward.numels)
    allocations = [np.zeros(n), rng.uniform(0.5, 0.95, n), np.full(n, 0.9)]  # the last is fine-tuned briefly
    spec = make_spec("weight", ws.loaded.module, ws.splits.reward, WEIGHT, ws.loaded.sha256, "tiny", 0)
    return spec, allocations, [reward(a) for a in allocations]


def channel_case(ws):
    x, _ = materialize(ws.splits.reward, limit=2)
    reward = ChannelReward(ChannelSpace(ws.loaded.module, x), ws.splits.reward, CHANNEL)
    n = len(reward.space.sizes)
    allocations = [np.zeros(n), np.full(n, 0.6), np.linspace(0.2, 0.8, n)]
    spec = make_spec("channel", ws.loaded.module, ws.splits.reward, CHANNEL, ws.loaded.sha256, "tiny", 0)
    return spec, allocations, [reward(a) for a in allocations]


@pytest.mark.slow  # several processes (Ray workers / gloo ranks / a spawned scorer)
def test_a_spec_scores_as_the_reward_it_describes_here_and_in_a_spawned_process(ws):
    cases = [weight_case(ws), channel_case(ws)]
    for spec, allocations, expected in cases:
        assert len(set(expected)) > 1  # the allocations do change the score
        copy = pickle.loads(pickle.dumps(spec))
        assert copy.digest == spec.digest and copy.model_digest == spec.model_digest
        assert score_all(copy, allocations) == expected
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter: nothing shared but the spec
        for spec, allocations, expected in cases:
            assert pool.apply(score_all, (spec, allocations, 1)) == expected


def test_a_damaged_network_is_refused_before_it_is_unpickled(ws):
    spec = make_spec("weight", ws.loaded.module, ws.splits.reward, WEIGHT, ws.loaded.sha256)
    damaged = dataclasses.replace(spec, model=spec.model[:-1] + bytes([spec.model[-1] ^ 1]))
    with pytest.raises(QLPError, match="SHA-256"):
        load_network(damaged)
    with pytest.raises(QLPError, match="unknown structure"):
        make_spec("block", ws.loaded.module, ws.splits.reward, WEIGHT, ws.loaded.sha256)
