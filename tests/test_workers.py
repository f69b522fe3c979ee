"""Rewards on Ray workers (reward.workers) and batched episodes (search.curriculum): the same seed and batch size K
give the same search whatever the number of workers, whichever finishes first, with a worker killed mid-search, and
across a resume with another number of workers. The reference is the same search scored in this process."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import default_sigint, make_tiny_task

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.reward.spec import make_spec
from qlp_compress.reward.weights import Reward, RewardSettings
from qlp_compress.reward.workers import RewardPool, ScaleSettings, check_reachable, import_ray
from qlp_compress.search.agent import AgentSettings
from qlp_compress.search.curriculum import SearchInterrupted, SearchSettings, run_search
from qlp_compress.search.env import PruningEnv
from qlp_compress.workflows.weights import allocator
from qlp_compress.workflows.workspace import DataSettings, ModelSettings, open_workspace

ray = pytest.importorskip("ray")

REWARD = RewardSettings(images=200, bn_recalibrate=0, finetune_steps=0, device="cpu")
SEARCH = SearchSettings(target_removed=0.8, episodes=12, stages=2, seed=3, batch_episodes=2, checkpoint_every=2,
                        demonstrations=("lamp",), agent=AgentSettings(learning_starts=16, hidden=(32,)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("faint_task")
    make_tiny_task(root, n=700, n_train=600, steps=60, faint=True)
    return open_workspace(root / "lenet.onnx", ModelSettings(), DataSettings(str(root / "data.npz"), reward_size=400),
                          "cpu")


@pytest.fixture(scope="module")
def session():
    """One local Ray session for the module (starting Ray costs seconds); each pool starts its own actors in it (3
    CPUs' worth: the shared 2 workers and one more)."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(ws):
    return make_spec("weight", ws.loaded.module, ws.splits.reward, REWARD, ws.loaded.sha256)


@pytest.fixture(scope="module")
def two(spec, session):
    """2 workers, shared by the tests (each worker costs seconds to start)."""
    with RewardPool(spec, ScaleSettings(workers=2)) as pool:
        yield pool


def search(ws, score_batch=None, settings=SEARCH, **kwargs):
    """The search the tests compare: what it found, episode by episode, and each stage's best."""
    reward = Reward(ws.loaded.module, ws.splits.reward, REWARD)
    result = run_search(PruningEnv(reward.numels, reward, settings.env), settings, allocation=allocator(ws),
                        score_batch=score_batch, **kwargs)
    episodes = [(h["reward"], h["steps"], h["reached"], h.get("demonstration"), h.get("near_best"))
                for h in result.history]
    return episodes, [(b.reward, b.sparsities, b.episode) for b in result.best]


@pytest.fixture(scope="module")
def reference(ws):
    return search(ws)  # K = 2, every reward scored in this process


@pytest.mark.slow  # several processes (Ray workers / gloo ranks / a spawned scorer)
def test_workers_give_the_search_of_one_process_even_when_one_is_killed(ws, spec, two, reference):
    with RewardPool(spec, ScaleSettings(workers=1)) as one:
        assert search(ws, one.score) == reference
    assert {i["package"] for i in two.infos} == {os.path.dirname(sys.modules["qlp_compress"].__file__)}
    assert search(ws, two.score) == reference
    victim = two.infos[0]["pid"]

    def kill_after_episode_4(record):  # kill -9 a worker mid-search: its next allocation is scored elsewhere
        if record["episode"] == 4:
            os.kill(victim, signal.SIGKILL)

    assert search(ws, two.score, on_episode=kill_after_episode_4) == reference
    assert two.losses == 1 and two.rescored >= 1
    assert victim not in {ray.get(a.info.remote())["pid"] for a in two.actors}
    assert search(ws, settings=replace(SEARCH, batch_episodes=1)) != reference  # the result does depend on K


@pytest.mark.slow  # several processes (Ray workers / gloo ranks / a spawned scorer)
def test_a_search_resumed_with_another_number_of_workers_ends_as_an_uninterrupted_one(ws, two, reference, tmp_path):
    checkpoint = tmp_path / "search.ckpt"

    def stop_after_episode_6(record):
        if record["episode"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(SearchInterrupted):
        search(ws, checkpoint=checkpoint, on_episode=stop_after_episode_6)  # in this process
    assert search(ws, two.score, checkpoint=checkpoint, resume=True) == reference  # on 2 workers


def test_without_ray_or_a_cluster_the_run_fails_at_once_in_one_line(monkeypatch, tiny_task, qlp):
    model = ("search", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.8", "--out", "out")
    run = qlp(*model, "--workers", "1", "--ray-address", "127.0.0.1:1", cwd=tiny_task)
    assert run.code == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in run.line
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert "cannot reach the Ray cluster" in qlp(*model, "--workers", "2", cwd=tiny_task).line
    monkeypatch.delenv("RAY_ADDRESS")
    run = qlp(*model, "--ray-address", "127.0.0.1:1", cwd=tiny_task)
    assert run.code == 2 and "give --workers N too" in run.line
    assert qlp(*model, "--workers", "2", "--batch-episodes", "0", cwd=tiny_task).code == 2
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    run = qlp(*model, "--workers", "2", cwd=tiny_task)
    assert run.code == 2 and "pip install 'qlp-compress[distributed]'" in run.line
    with pytest.raises(UsageError, match="distributed"):
        import_ray()
    assert not (tiny_task / "out").exists()
    with pytest.raises(UsageError, match="HOST:PORT"):
        check_reachable("nowhere")
    with pytest.raises(QLPError, match="cannot reach"):
        check_reachable("ray://127.0.0.1:1")


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_a_resume_with_another_number_of_them_ends_as_one_process(tiny_task, qlp,
                                                                                               tmp_path):
    """search --workers 2 (K = 2 by default) stopped by Ctrl-C: exit 130, one line, a checkpoint, its workers gone;
    --resume with --workers 1 --batch-episodes 2 ends with the policy of --batch-episodes 2 in one process, and the
    report names the workers, K, the worker-seconds and the wall time."""
    for name in ("lenet.onnx", "data.npz"):
        shutil.copy(tiny_task / name, tmp_path / name)
    common = ("search", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.8", "--reward-size", "300",
              "--episodes", "40", "--stages", "2", "--reward-images", "100", "--finetune-epochs", "0",
              "--device", "cpu", "--no-sparse-storage")
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "qlp_compress", *common, "--workers", "2", "--out", "w"],
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=default_sigint)
        deadline, title = time.monotonic() + 120, "qlp search on 2 Ray worker(s) here, K = 2: episode"  # progress
        while title not in stderr.read_text() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == 130
    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "--resume" in lines[-1] and "Traceback" not in stderr.read_text()
    assert (tmp_path / "w" / ".work" / "search.ckpt").exists()
    pids = [int(p) for p in re.findall(r"pid (\d+)@", stderr.read_text())]
    assert len(pids) == 2
    time.sleep(1)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "a reward worker outlived Ctrl-C"

    resumed = qlp(*common, "--workers", "1", "--batch-episodes", "2", "--out", "w", "--resume", cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert "qlp search on 1 Ray worker(s) here, K = 2: episode" in resumed.stderr and "episodes/s" in resumed.stderr
    assert qlp(*common, "--batch-episodes", "2", "--out", "k2", cwd=tmp_path).code == 0
    w, k2 = (json.loads((tmp_path / d / "policy.json").read_text()) for d in ("w", "k2"))
    assert w["layers"] == k2["layers"] and w["search"]["rewards"] == k2["search"]["rewards"]
    scale = json.loads((tmp_path / "w" / "report.json").read_text())["scale"]
    assert scale["workers"] == 1 and scale["batch_episodes"] == 2 and scale["worker_seconds"] > 0
    assert scale["wall_seconds"] > 0 and "pid" in scale["where"] and np.isfinite(scale["episodes_per_second"])
    assert "Ray reward worker" in (tmp_path / "w" / "report.md").read_text()
