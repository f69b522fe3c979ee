"""Choosing a QLP search's answer among its best allocations by fine-tuning them (workflows.selection): which
allocations compete, which images judge them, and that the most accurate one wins, checked against an independent
fine-tuning and measurement of every candidate."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_task

from qlp_compress.data import materialize
from qlp_compress.data.images import TensorImages
from qlp_compress.pruning.policy import Policy
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.train.measure import accuracy
from qlp_compress.workflows import DataSettings, ModelSettings, open_workspace, prune_weights_and_finetune, selection
from qlp_compress.workflows.selection import Candidate, SelectionSettings
from qlp_compress.workflows.weights import allocator, find_policy


def searched_policy(winner: str | None) -> Policy:
    """A two-stage search record: stage 2's demonstrations scored erk 0.6, lamp 0.7, uniform 0.5 and global
    failed; the stage's best is `winner` (a demonstration's name, or None for the agent's own episode)."""
    search = {"rewards": [0.3, 0.4, 0.6, 0.7, -0.1, 0.5, 0.65],
              "stage_of_episode": [1, 1, 2, 2, 2, 2, 2],
              "demonstration": ["lamp", None, "erk", "lamp", "global", "uniform", None],
              "succeeded": [True, True, True, True, False, True, True]}
    best = {"target": 0.8, "reward": 0.7 if winner == "lamp" else 0.65, "sparsities": [0.8, 0.8],
            "demonstration": winner}
    return Policy(method="qlp", target=0.8, layers=["a", "b"], numels=[10, 10], sparsities=[0.8, 0.8],
                  model_sha256="0" * 64, stages=[{"target": 0.5, "reward": 0.4, "sparsities": [0.5, 0.5]}, best],
                  search=search)


def by_name(name: str, target: float) -> list[float]:
    return [target, {"lamp": 0.1, "erk": 0.2, "uniform": 0.3, "global": 0.4}[name]]


def test_candidates_are_the_answer_then_the_stage_demonstrations_by_reward():
    found = selection.candidates(searched_policy(None), by_name, 3)
    assert [(c.name, c.reward) for c in found] == [("search", 0.65), ("lamp", 0.7), ("erk", 0.6)]
    assert found[1].sparsities == [0.8, 0.1]  # a demonstration competes at its allocator's exact allocation
    # a demonstration that won the stage is the answer itself, not a second candidate; failed ones never compete
    found = selection.candidates(searched_policy("lamp"), by_name, 5)
    assert [c.name for c in found] == ["lamp", "erk", "uniform"]
    # an earlier stage's demonstrations compete for that stage only, at that stage's target
    first = selection.candidates(searched_policy(None), by_name, 5, stage=0)
    assert [(c.name, c.reward, c.sparsities[0]) for c in first] == [("search", 0.4, 0.5), ("lamp", 0.3, 0.5)]


def test_held_out_images_are_the_reward_split_after_the_measured_ones():
    x = torch.randint(0, 255, (1234, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(1234) % 7
    ws = SimpleNamespace(splits=SimpleNamespace(reward=TensorImages(x, y)))
    all_x, all_y = materialize(ws.splits.reward)
    for measured, first in ((1000, 1000), (0, 0), (1234, 0), (5000, 0)):  # no others left: all of them
        xs, ys = zip(*selection.held_out_batches(ws, measured, batch_size=100), strict=True)
        assert torch.equal(torch.cat(ys), all_y[first:]) and torch.equal(torch.cat(xs), all_x[first:])


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    make_tiny_task(root, n=1200, n_train=1000, steps=60, faint=True)  # candidates that differ
    return open_workspace(root / "lenet.onnx", ModelSettings(), DataSettings(str(root / "data.npz"), reward_size=400),
                          "cpu")


def test_the_most_accurate_candidate_wins_and_a_resumed_choice_reuses_the_finished_ones(tiny_ws, tmp_path,
                                                                                         monkeypatch):
    lamp = find_policy(tiny_ws, "lamp", 0.6)
    baseline = allocator(tiny_ws)
    found = [Candidate("search", baseline("uniform", 0.6), 0.5), Candidate("lamp", lamp.sparsities, 0.4),
             Candidate("erk", baseline("erk", 0.6), 0.3)]
    tune = TrainSettings(epochs=2.0, lr=0.01, warmup_epochs=0.0, seed=3)
    settings = SelectionSettings(candidates=3, epochs=0.2)
    chosen, record = selection.select(tiny_ws, lamp, found, settings, tune, reward_images=100, work=tmp_path)
    # the reference: each candidate pruned and fine-tuned on its own with the selection's own settings (the run's
    # fine-tuning for --select-epochs), measured on the images the reward skips
    x, y = materialize(tiny_ws.splits.reward)
    reference = replace(tune, epochs=settings.epochs)
    per_epoch = math.ceil(len(tiny_ws.splits.finetune) / tune.batch_size)
    steps = [max(1, round(e * per_epoch)) for e in (settings.epochs, 0.5)]
    assert steps[0] != steps[1]  # a reference fine-tuned for another budget (0.5 epoch) would not match below
    expected = []
    for c in found:
        _, tuned = prune_weights_and_finetune(tiny_ws, replace(lamp, sparsities=c.sparsities), reference)
        expected.append(accuracy(tuned, [(x[100:], y[100:])]))
    assert [r["held_out_accuracy"] for r in record["candidates"]] == pytest.approx(expected)
    best = max(expected)
    assert chosen == found[expected.index(best)] and record["chosen"] == chosen.name
    assert record["held_out_images"] == 300 and record["epochs"] == 0.2
    assert len(set(expected)) > 1  # the candidates really differ, so the choice above means something

    def no_more_training(*args, **kwargs):
        raise AssertionError("a finished candidate was fine-tuned again")

    monkeypatch.setattr(selection, "prune_weights_and_finetune", no_more_training)
    again, record_again = selection.select(tiny_ws, lamp, found, settings, tune, 100, work=tmp_path, resume=True)
    assert again == chosen and record_again == record
    assert json.loads((tmp_path / "selection.json").read_text())["candidates"][0]["name"] == "search"
    # a damaged record is not trusted: the candidates are fine-tuned again
    monkeypatch.undo()
    for damaged in ("{not json", "[1, 2]", '{"candidates": [{"name": "search", "held_out_accuracy": "high"}]}'):
        (tmp_path / "selection.json").write_text(damaged)
        assert selection.select(tiny_ws, lamp, found, settings, tune, 100, work=tmp_path, resume=True)[0] == chosen


def test_a_tie_keeps_the_search_answer_and_without_fine_tuning_nothing_is_chosen(tiny_ws, monkeypatch):
    policy = searched_policy(None)
    monkeypatch.setattr(selection, "prune_weights_and_finetune", lambda *a, **k: (None, torch.nn.Identity()))
    monkeypatch.setattr(selection, "accuracy", lambda model, batches: 0.5)
    found = selection.candidates(policy, by_name, 3)
    chosen, _ = selection.select(tiny_ws, policy, found, SelectionSettings(), TrainSettings(epochs=1.0), 100)
    assert chosen.name == "search"
    tune = TrainSettings(epochs=1.0)
    assert selection.choose_answer(tiny_ws, policy, by_name, SelectionSettings(), None, 100) is policy
    assert selection.choose_answer(tiny_ws, policy, by_name, SelectionSettings(candidates=1), tune, 100) is policy
    chosen_policy = selection.choose_answer(tiny_ws, policy, by_name, SelectionSettings(), tune, 100)
    assert chosen_policy.sparsities == policy.stages[-1]["sparsities"]
    assert chosen_policy.search["selection"]["chosen"] == "search"


def test_selection_options_are_checked_before_the_model_is_read(tmp_path: Path, qlp):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read")
    for option, value in (("--candidates", "0"), ("--select-epochs", "0"), ("--select-epochs", "-1")):
        result = qlp("search", model, option, value, cwd=tmp_path)
        assert result.code == 2 and option in result.line, result.line
