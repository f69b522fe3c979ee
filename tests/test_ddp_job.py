"""search, prune and compare as a torchrun job (train.job): rank 0 runs the command alone and the other rank joins
its fine-tunings; the result is the single process's, and a rank whose peer went silent ends the job in one line."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tiny_task
from ddp_ranks import fine_tune_in_a_ray_worker, frozen_bn_model, silent_rank, tiny_data
from onnx import numpy_helper

from qlp_compress.base.errors import QLPError
from qlp_compress.train import distributed
from qlp_compress.train.finetune import TrainSettings, train

# a search that fine-tunes in the reward (on rank 0 alone), chooses among 3 fine-tuned candidates and fine-tunes its
# answer: 4 fine-tunings shared with rank 1
SEARCH = ("--sparsity", "0.9", "--reward-size", "300", "--episodes", "12", "--stages", "2", "--reward-images", "200",
          "--reward-finetune-from", "0.5", "--reward-finetune-steps", "2", "--finetune-epochs", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def faint_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faint_task")
    make_tiny_task(root, n=1200, n_train=1000, steps=60, faint=True)  # pruning costs accuracy: fine-tuning moves
    return root


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a 2-rank torchrun job on this machine (gloo, one thread per rank, as torchrun sets it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "qlp_compress", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.slow  # a torchrun job of 2 processes
def test_a_search_under_torchrun_writes_what_one_process_writes(qlp, faint_task, tmp_path):
    """Rank 0 searches alone (its reward's brief fine-tunings included) and rank 1 joins the candidates' and the
    answer's fine-tunings: the same answer as one process and the same weights within 1e-5 (LeNet has no BatchNorm,
    so 2 ranks take one process's steps); only rank 0 prints and writes."""
    data = ("--data", faint_task / "data.npz")
    job = torchrun("search", faint_task / "lenet.onnx", *data, *SEARCH, "--out", tmp_path / "job", "--json",
                   cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(job.stdout)  # one JSON document: rank 1 printed nothing
    one = qlp("search", faint_task / "lenet.onnx", *data, *SEARCH, "--out", tmp_path / "one", cwd=tmp_path)
    assert one.code == 0, one.stderr[-3000:]
    assert result["out"] == str(tmp_path / "job")

    policies = [json.loads((tmp_path / run / "policy.json").read_text()) for run in ("job", "one")]
    assert policies[0]["layers"] == policies[1]["layers"]
    assert policies[0]["search"]["selection"] == policies[1]["search"]["selection"]  # the same candidates, scores
    tuned, reference = weights(tmp_path / "job" / "model.onnx"), weights(tmp_path / "one" / "model.onnx")
    assert tuned.keys() == reference.keys()
    for name, w in reference.items():
        assert np.allclose(tuned[name], w, rtol=0, atol=1e-5), name
    dense = {w.shape: w for w in weights(faint_task / "lenet.onnx").values() if w.ndim >= 2}  # shapes all differ
    moved = max(float(np.abs(w - dense[w.shape] * (w != 0)).max()) for w in tuned.values() if w.shape in dense)
    assert moved > 1e-2  # fine-tuning did train (the pruned start is the dense weights where they are kept)


@pytest.mark.slow
def test_compare_under_torchrun_and_a_refusal_on_rank_0_ends_the_job(faint_task, tmp_path):
    """compare joins the job as search does; a command rank 0 refuses (its folder exists) ends every rank at once,
    with rank 0's one line."""
    args = ("compare", faint_task / "lenet.onnx", "--data", faint_task / "data.npz", "--sparsity", "0.9", "--method",
            "lamp,uniform", "--finetune-epochs", "0.5", "--device", "cpu", "--out", tmp_path / "c", "--json")
    job = torchrun(*args, cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    rows = json.loads(job.stdout)["rows"]
    assert [r["method"] for r in rows] == ["lamp", "uniform"] and all(r["finetuned_accuracy"] for r in rows)
    started = time.monotonic()
    again = torchrun(*args, cwd=tmp_path)
    assert time.monotonic() - started < 60
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already exists" in errors[0], again.stderr[-3000:]


@pytest.mark.slow  # two gloo ranks each
@pytest.mark.parametrize(("silent", "expected"), [
    (0, "rank 1: rank 0 has been silent for"), (1, "rank 0: rank 1 has been silent for")])
def test_a_rank_whose_peer_went_silent_ends_the_job_in_one_line(monkeypatch, silent, expected):
    """Rank 1 waits for rank 0's word and watches its heartbeat; rank 0 checks rank 1's before it fine-tunes. With a
    collective timeout of 2 s a silent peer is noticed after 4 s (60 s by default)."""
    monkeypatch.setenv("QLP_DDP_TIMEOUT", "2")
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.05, warmup_epochs=0.0, seed=3)
    started = time.monotonic()
    with pytest.raises(QLPError) as caught:
        distributed.launch(2, functools.partial(silent_rank, silent), (frozen_bn_model(), tiny_data(64), settings))
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message


@pytest.mark.slow  # a Ray worker and 2 gloo ranks
def test_a_ray_worker_fine_tunes_on_ranks_of_its_own_even_when_the_driver_is_a_torchrun_rank(monkeypatch):
    """A Ray task with 2 CPUs runs --nproc 2: the launcher starts 2 ranks inside the worker, the weights within 1e-5
    of one process. The driver here is rank 0 of a torchrun job (its variables set): the worker inherits them, and
    must not take itself for that rank. Each rank takes its share of the worker's CPUs (Ray's OMP_NUM_THREADS)."""
    ray = pytest.importorskip("ray")
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))  # ddp_ranks
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(name, value)
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, warmup_epochs=0.0,
                             augment=True, seed=3)
    reference = frozen_bn_model()
    train(reference, tiny_data(), settings)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=2)(fine_tune_in_a_ray_worker)
        state, in_job, threads = ray.get(task.remote(replace(settings, nproc=2)), timeout=300)
    finally:
        ray.shutdown()
    assert not in_job and threads == 1
    for name, p in reference.state_dict().items():
        assert np.allclose(state[name].numpy(), p.numpy(), rtol=0, atol=1e-5), name


def test_each_launched_rank_takes_its_share_of_the_threads_it_was_given(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # a Ray worker's CPUs, or the user's setting
    assert distributed._threads_per_rank() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert distributed._threads_per_rank() == max(1, len(os.sched_getaffinity(0)) // 2)
