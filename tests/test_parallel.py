"""The answer's candidates and compare's cells on Ray workers (workflows.parallel): each unit gives what the serial
path gives in this process for the same seed and threads (one here, as in every worker), whoever finishes first; a
finished unit is kept at once, so Ctrl-C keeps it and --resume runs only the rest."""

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

import pytest
from conftest import default_sigint, make_tiny_task

from qlp_compress.base.errors import Interrupted, QLPError
from qlp_compress.pruning.allocate import AllocationSettings
from qlp_compress.reward.weights import RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.agent import AgentSettings
from qlp_compress.search.curriculum import SearchSettings
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows import parallel, selection
from qlp_compress.workflows.compare import compare_weights
from qlp_compress.workflows.selection import Candidate, SelectionSettings
from qlp_compress.workflows.weights import allocator, find_policy
from qlp_compress.workflows.workspace import DataSettings, ModelSettings, open_workspace

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get this module's unit functions

TWO = ScaleSettings(workers=2, threads=1)
TUNE = TrainSettings(epochs=1.0, lr=0.01, warmup_epochs=0.0, seed=3)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    make_tiny_task(root, n=1200, n_train=1000, steps=60, faint=True)  # candidates that differ
    return open_workspace(root / "lenet.onnx", ModelSettings(), DataSettings(str(root / "data.npz"), reward_size=400),
                          "cpu")


@pytest.fixture(scope="module")
def session():
    """One local Ray session for the module; each run starts its tasks in it (2 CPUs: 2 workers × 1 thread)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def found(ws):
    lamp = find_policy(ws, "lamp", 0.6)
    baseline = allocator(ws)
    return lamp, [Candidate("search", baseline("uniform", 0.6), 0.5), Candidate("lamp", lamp.sparsities, 0.4),
                  Candidate("erk", baseline("erk", 0.6), 0.3)]


def test_a_workspace_travels_with_its_network_checked(ws):
    portable = parallel.to_portable(ws, test=False)
    back = parallel.from_portable(portable)
    assert back.splits.test is None and back.data.train is None and back.loaded.sha256 == ws.loaded.sha256
    assert all(a.equal(b) for a, b in zip(back.loaded.module.state_dict().values(),
                                          ws.loaded.module.state_dict().values(), strict=True))
    with pytest.raises(QLPError, match="damaged in transit"):
        parallel.from_portable(replace(portable, model=portable.model[:-1] + b"x"))


@pytest.mark.slow  # Ray workers
def test_candidates_on_workers_choose_as_in_this_process_and_ctrl_c_keeps_the_finished(ws, found, session, tmp_path,
                                                                                     monkeypatch):
    policy, candidates = found
    settings = SelectionSettings(candidates=3, epochs=0.3)
    serial_chosen, serial = selection.select(ws, policy, candidates, settings, TUNE, 100)
    chosen, record = selection.select(ws, policy, candidates, settings, TUNE, 100, scale=TWO)
    assert chosen == serial_chosen and record["candidates"] == serial["candidates"]
    assert len({r["held_out_accuracy"] for r in serial["candidates"]}) > 1  # the candidates really differ
    assert record["scale"]["workers"] == 2 and record["scale"]["units"] == 3 and record["scale"]["worker_seconds"] > 0

    real_write = selection.atomic_write_json

    def ctrl_c_after_the_first(path, document):  # Ctrl-C right after the first candidate is kept
        real_write(path, document)
        raise KeyboardInterrupt

    monkeypatch.setattr(selection, "atomic_write_json", ctrl_c_after_the_first)
    with pytest.raises(Interrupted, match="1 of 3 finished"):
        selection.select(ws, policy, candidates, settings, TUNE, 100, work=tmp_path, scale=TWO)
    monkeypatch.undo()
    kept = json.loads((tmp_path / "selection.json").read_text())["candidates"]
    assert len(kept) == 1 and kept[0]["held_out_accuracy"] in [r["held_out_accuracy"] for r in serial["candidates"]]
    ran = []
    real_run = selection.run_units
    monkeypatch.setattr(selection, "run_units", lambda *a, **k: ran.append(len(a[3])) or real_run(*a, **k))
    again, resumed = selection.select(ws, policy, candidates, settings, TUNE, 100, work=tmp_path, resume=True,
                                      scale=TWO)
    assert ran == [2]  # only the two unfinished candidates ran
    assert again == serial_chosen and resumed["candidates"] == serial["candidates"]


@pytest.mark.slow  # Ray workers
def test_compare_cells_on_workers_give_the_serial_rows_in_the_serial_order(ws, session, tmp_path):
    search = SearchSettings(target_removed=0.6, episodes=6, stages=2, seed=1, demonstrations=("lamp",),
                            agent=AgentSettings(learning_starts=4, hidden=(16,)))
    reward = RewardSettings(images=100, bn_recalibrate=0, finetune_steps=0)
    common = (ws, ["qlp", "lamp", "uniform"], [0.6, 0.7], search, reward, AllocationSettings(),
              replace(TUNE, epochs=0.3))
    selecting = SelectionSettings(candidates=2, epochs=0.2)
    serial = compare_weights(*common, tmp_path / "serial", "serial", selection=selecting)
    on_workers = compare_weights(*common, tmp_path / "workers", "workers", selection=selecting, scale=TWO)

    def same(rows):
        return [{k: v for k, v in r.items() if k != "search_seconds"} for r in rows]

    assert same(on_workers) == same(serial)
    assert [(r["method"], r["target"]) for r in on_workers] == [(m, t) for t in (0.6, 0.7)
                                                                for m in ("qlp", "lamp", "uniform")]
    document = json.loads((tmp_path / "workers" / "compare.json").read_text())
    assert document["scale"]["workers"] == 2 and document["scale"]["units"] == 6


@pytest.mark.slow  # Ray workers
def test_a_failure_on_a_worker_is_one_line_and_a_lost_worker_reruns_its_unit(session, tmp_path):
    with pytest.raises(QLPError, match="give a model"):
        parallel.run_units(TWO, _fail, None, [1], "a test", ["unit 1"], lambda i, r: None)
    marker = tmp_path / "killed"
    done = {}
    record = parallel.run_units(TWO, _die_once, str(marker), [1, 2, 3], "a test", ["u1", "u2", "u3"],
                                done.__setitem__)
    assert done == {0: 2, 1: 4, 2: 6} and record.workers_lost == 1 and marker.exists()


def _fail(shared, item):
    raise QLPError("the model is empty; give a model")


def _die_once(marker: str, item: int) -> int:
    """The worker that first runs item 2 dies (kill -9 of itself); the unit then runs again elsewhere."""
    if item == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), 9)
    return 2 * item


def test_compare_workers_are_checked_before_anything_is_read(tiny_task, qlp):
    model = ("compare", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.8", "--out", "cmp")
    run = qlp(*model, "--structure", "channel", "--speedup", "1.5", "--workers", "2", cwd=tiny_task)
    assert run.code == 2 and "latency, which runs alone" in run.line
    run = qlp(*model, "--workers", "1", "--ray-address", "127.0.0.1:1", cwd=tiny_task)
    assert run.code == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in run.line
    assert qlp(*model, "--workers", "-1", cwd=tiny_task).code == 2
    assert not (tiny_task / "cmp").exists()


@pytest.mark.slow  # Ray workers
def test_compare_on_workers_from_the_command_line_says_where_its_cells_ran(tiny_task, qlp, tmp_path):
    run = qlp("compare", tiny_task / "lenet.onnx", "--data", tiny_task / "data.npz", "--sparsity", "0.8", "--method",
              "lamp,uniform", "--finetune-epochs", "0.1", "--device", "cpu", "--workers", "2", "--out", "cmp",
              cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    assert "compare: lamp @ 0.8 done on pid" in run.stderr
    assert "2 cell(s) ran on 2 Ray worker(s) × 1 thread(s)" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.slow  # Ray workers, a subprocess
def test_ctrl_c_while_the_candidates_run_on_workers_keeps_the_finished_and_resume_runs_the_rest(tiny_task, qlp,
                                                                                                tmp_path):
    """search --workers 2 stopped by Ctrl-C once the first candidate finished: exit 130 in one line, the finished
    candidate in .work/selection.json, no worker left; --resume ends with the choice of the run in one process."""
    for name in ("lenet.onnx", "data.npz"):
        shutil.copy(tiny_task / name, tmp_path / name)
    common = ("search", "lenet.onnx", "--data", "data.npz", "--sparsity", "0.8", "--reward-size", "300",
              "--episodes", "12", "--stages", "2", "--reward-images", "100", "--finetune-epochs", "0.3",
              "--select-epochs", "0.3", "--candidates", "3", "--lr", "0.01", "--device", "cpu",
              "--no-sparse-storage", "--batch-episodes", "2")
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "qlp_compress", *common, "--workers", "2", "--out", "w"],
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=default_sigint)
        deadline = time.monotonic() + 240
        while "choosing the answer: candidate" not in stderr.read_text() and child.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == 130
    text = stderr.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "--resume" in lines[-1] and "Traceback" not in text, text[-2000:]
    kept = json.loads((tmp_path / "w" / ".work" / "selection.json").read_text())["candidates"]
    assert 1 <= len(kept) < 3
    pids = [int(p) for p in re.findall(r"done on pid (\d+)@", text)]
    time.sleep(1)
    assert pids and not [p for p in pids if os.path.exists(f"/proc/{p}")], "a worker outlived Ctrl-C"

    resumed = qlp(*common, "--workers", "2", "--out", "w", "--resume", cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert f"choosing the answer: {3 - len(kept)} unit(s) on 2 Ray worker(s)" in resumed.stderr
    assert qlp(*common, "--out", "serial", cwd=tmp_path).code == 0  # one process, one thread (conftest), K = 2
    w, serial = (json.loads((tmp_path / d / "policy.json").read_text()) for d in ("w", "serial"))
    assert w["search"]["selection"]["candidates"] == serial["search"]["selection"]["candidates"]
    assert w["layers"] == serial["layers"]
    assert "ran on 2 Ray worker(s)" in (tmp_path / "w" / "report.md").read_text()
