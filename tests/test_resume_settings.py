"""A resume continues the same run or refuses (issue 24, rows 7-10 and must-have 2): every setting that shapes a
result is recorded with the partial results, and --resume with another is refused in one line that names it: in
search (search.ckpt, selection.json, finetune.ckpt), prune, compare (compare.json), finetune and train. Runs are
interrupted in this process by a KeyboardInterrupt at a chosen point, as Ctrl-C would."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_task

from qlp_compress.deploy import export

COMMON = ("--data", "data.npz", "--device", "cpu")
SEARCH = ("--episodes", "6", "--stages", "1", "--reward-images", "100", "--bn-recalibrate", "0",
          "--no-sparse-storage")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_task(root, n=1200, n_train=1000, steps=60)
    with torch.no_grad():  # another model of the same architecture: only its digest tells them apart
        next(model.parameters()).mul_(0.5)
    (root / "other.onnx").write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    shutil.copy(root / "data.npz", root / "data2.npz")  # the same images under another name: other --data
    return root


@pytest.fixture
def work(tiny, tmp_path) -> Path:
    for name in ("lenet.onnx", "other.onnx", "data.npz", "data2.npz"):
        shutil.copy(tiny / name, tmp_path / name)
    return tmp_path


@pytest.fixture(autouse=True)
def fine_tuning_may_lose_accuracy(monkeypatch):
    """These tests are about what a resume records and refuses. The tiny task's fine-tuning loses accuracy (its
    augmentation flips the squares that tell its classes apart), which the fine-tuning guard would stop as a failure."""
    from qlp_compress.train import distributed
    from qlp_compress.train.guard import GuardSettings

    real = distributed.train  # what the workflows' fine-tuning calls (through train.distributed.fit)

    def lenient(*args, **kwargs):
        kwargs.setdefault("guard", GuardSettings(fail_below_start=False))
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "train", lenient)


def refused(run, *named: str) -> None:
    """Exit 2, one line that names the setting (its recorded and its new value) and the way out."""
    assert run.code == 2, run.stderr[-2000:]
    assert all(n in run.line for n in named), run.line
    assert "--force instead of --resume" in run.line, run.line


def stop_training_in_epoch(monkeypatch, epoch: int):
    """Fine-tuning and training stop with Ctrl-C as epoch `epoch` starts (earlier epochs are kept) until the
    function returned is called."""
    from qlp_compress.train import distributed

    real = distributed.train  # what the workflows' fine-tuning calls (through train.distributed.fit)

    def interrupted(*args, on_step, **kwargs):
        def step(info):
            if info["epoch"] == epoch:
                raise KeyboardInterrupt
            on_step(info)
        return real(*args, on_step=step, **kwargs)

    monkeypatch.setattr(distributed, "train", interrupted)
    return lambda: monkeypatch.setattr(distributed, "train", real)


# ------------------------------------------------------------------------------------------------ row 7: compare


@pytest.mark.slow
def test_row7_compare_resumed_with_other_finetune_epochs_is_refused_and_compare_md_lists_its_settings(work, qlp,
                                                                                                   monkeypatch):
    compare = importlib.import_module("qlp_compress.workflows.compare")
    real = compare.find_policy

    def stop_at_global(ws, method, *args, **kwargs):
        if method == "global":
            raise KeyboardInterrupt
        return real(ws, method, *args, **kwargs)

    monkeypatch.setattr(compare, "find_policy", stop_at_global)
    args = ("compare", "lenet.onnx", "--sparsity", "0.5", "--method", "lamp,global", *COMMON, "--out", "c")
    assert qlp(*args, "--finetune-epochs", "0.01", cwd=work).code == 130
    monkeypatch.setattr(compare, "find_policy", real)
    refused(qlp(*args, "--finetune-epochs", "0", "--resume", cwd=work), "--finetune-epochs 0.01", "says 0;")
    run = qlp(*args, "--finetune-epochs", "0.01", "--resume", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    document = json.loads((work / "c" / "compare.json").read_text())
    assert [r["method"] for r in document["rows"]] == ["lamp", "global"]
    assert all(r["finetuned_accuracy"] is not None for r in document["rows"])  # both fine-tuned, as asked
    assert document["record"]["--finetune-epochs"] == 0.01 and len(document["commands"]) == 2
    markdown = (work / "c" / "compare.md").read_text()
    assert "| --finetune-epochs | 0.01 |" in markdown and "| --seed | 0 |" in markdown
    assert "Resumed by:" in markdown and markdown.count("--finetune-epochs 0.01") == 2  # both commands shown


# ------------------------------------------------------------------------------------------------ row 8: selection


@pytest.mark.slow
def test_row8_search_resumed_in_the_choice_with_other_select_epochs_is_refused(work, qlp, monkeypatch):
    from qlp_compress.workflows import selection

    real, calls = selection.accuracy, []

    def stop_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "accuracy", stop_at_second)
    args = ("search", "lenet.onnx", "--sparsity", "0.6", *SEARCH, *COMMON, "--reward-size", "200", "--candidates",
            "3", "--finetune-epochs", "0.1", "--out", "s")
    assert qlp(*args, "--select-epochs", "0.01", cwd=work).code == 130
    kept = json.loads((work / "s" / ".work" / "selection.json").read_text())
    assert len(kept["candidates"]) == 1 and kept["record"]["--select-epochs"] == 0.01
    monkeypatch.setattr(selection, "accuracy", real)
    refused(qlp(*args, "--select-epochs", "0.05", "--resume", cwd=work), "--select-epochs 0.01", "says 0.05")
    (work / "s" / ".work" / "search.ckpt").unlink()  # the record of the finished candidates refuses it too
    refused(qlp(*args, "--select-epochs", "0.05", "--resume", cwd=work), "--select-epochs 0.01", "says 0.05")


# ------------------------------------------------------------------------------------------------ row 9: held out


@pytest.mark.slow
def test_row9_a_choice_without_held_out_images_says_so_and_records_it(work, qlp):
    run = qlp("search", "lenet.onnx", "--sparsity", "0.6", *SEARCH, *COMMON, "--reward-size", "100",
              "--candidates", "2", "--select-epochs", "0.01", "--finetune-epochs", "0.01", "--out", "r", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    warned = [line for line in run.stderr.splitlines() if "leaves no reward-split image" in line]
    assert len(warned) == 1 and warned[0].startswith("warning:") and "--reward-size above" in warned[0]
    chosen = json.loads((work / "r" / "policy.json").read_text())["search"]["selection"]
    assert chosen["held_out_images"] == 0 and "none held out" in chosen["scored_on"]


# ------------------------------------------------------------------------------------------------ row 10: the budget


@pytest.mark.slow
def test_row10_compare_has_the_selection_options_and_never_fine_tunes_past_the_budget(work, qlp, monkeypatch):
    from qlp_compress.train import distributed

    real, epochs = distributed.train, []

    def spy(model, dataset, settings, *args, **kwargs):
        epochs.append(settings.epochs)
        return real(model, dataset, settings, *args, **kwargs)

    monkeypatch.setattr(distributed, "train", spy)
    run = qlp("compare", "lenet.onnx", "--sparsity", "0.6", "--method", "qlp", *SEARCH[:4], *COMMON,
              "--reward-images", "50", "--finetune-epochs", "0.01", "--candidates", "2", "--select-epochs", "0.3",
              "--out", "c", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert len(epochs) == 3 and max(epochs) == 0.01  # two candidates and the answer, none past the budget
    document = json.loads((work / "c" / "compare.json").read_text())
    assert document["record"]["--candidates"] == 2 and document["record"]["--select-epochs"] == 0.3
    assert "capped at --finetune-epochs 0.01" in (work / "c" / "compare.md").read_text()


# ------------------------------------------------------------------------------------------------ every command


@pytest.mark.slow
def test_search_resumed_with_other_reward_images_data_seed_or_model_is_refused(work, qlp, monkeypatch):
    from qlp_compress.search import curriculum

    real, calls = curriculum._play_episode, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(curriculum, "_play_episode", stop_at_third)
    args = ("--sparsity", "0.6", "--episodes", "6", "--stages", "1", "--bn-recalibrate", "0", "--device", "cpu",
            "--finetune-epochs", "0", "--out", "s", "--resume")
    same = ("--data", "data.npz", "--reward-size", "200", "--reward-images", "100")
    assert qlp("search", "lenet.onnx", *args[:-1], *same, cwd=work).code == 130
    monkeypatch.setattr(curriculum, "_play_episode", real)
    refused(qlp("search", "lenet.onnx", *args, "--data", "data.npz", "--reward-size", "200", "--reward-images", "50",
                cwd=work), "--reward-images 100", "says 50")
    refused(qlp("search", "lenet.onnx", *args, "--data", "data.npz", "--reward-size", "300", "--reward-images", "100",
                cwd=work), "--reward-size 200", "says 300")
    refused(qlp("search", "lenet.onnx", *args, "--data", "data2.npz", "--reward-size", "200", "--reward-images",
                "100", cwd=work), "--data", "data.npz", "data2.npz")
    refused(qlp("search", "lenet.onnx", *args, *same, "--seed", "1", cwd=work), "--seed 0", "says 1")
    refused(qlp("search", "other.onnx", *args, *same, cwd=work), "another model", "SHA-256")
    run = qlp("search", "lenet.onnx", *args, *same, cwd=work)  # the same settings continue it
    assert run.code == 0, run.stderr[-2000:]
    assert len(json.loads((work / "s" / "policy.json").read_text())["search"]["rewards"]) == 6


@pytest.mark.slow
def test_prune_resumed_with_another_sparsity_or_finetune_epochs_is_refused(work, qlp, monkeypatch):
    train_normally = stop_training_in_epoch(monkeypatch, 2)
    args = ("prune", "lenet.onnx", "--method", "lamp", *COMMON, "--no-sparse-storage", "--out", "p")
    assert qlp(*args, "--sparsity", "0.6", "--finetune-epochs", "2", cwd=work).code == 130
    train_normally()
    refused(qlp(*args, "--sparsity", "0.7", "--finetune-epochs", "2", "--resume", cwd=work), "--sparsity 0.6",
            "says 0.7")
    refused(qlp(*args, "--sparsity", "0.6", "--finetune-epochs", "3", "--resume", cwd=work),
            "--finetune-epochs 2", "says 3")
    assert qlp(*args, "--sparsity", "0.6", "--finetune-epochs", "2", "--resume", cwd=work).code == 0


def test_finetune_resumed_with_another_model_or_data_is_refused(work, qlp, monkeypatch):
    train_normally = stop_training_in_epoch(monkeypatch, 2)
    args = ("--out", "t.onnx", *COMMON[2:], "--finetune-epochs", "2")
    assert qlp("finetune", "lenet.onnx", "--data", "data.npz", *args, cwd=work).code == 130
    train_normally()
    refused(qlp("finetune", "other.onnx", "--data", "data.npz", *args, "--resume", cwd=work), "another model")
    refused(qlp("finetune", "lenet.onnx", "--data", "data2.npz", *args, "--resume", cwd=work), "--data")
    refused(qlp("finetune", "lenet.onnx", "--data", "data.npz", *args, "--seed", "2", "--resume", cwd=work),
            "--seed 0", "says 2")


def test_train_resumed_with_other_epochs_or_data_is_refused_by_name(work, qlp, monkeypatch):
    train_normally = stop_training_in_epoch(monkeypatch, 2)
    args = ("train", "lenet5", "--out", "m.onnx", "--device", "cpu", "--batch-size", "256")
    assert qlp(*args, "--data", "data.npz", "--epochs", "2", cwd=work).code == 130
    train_normally()
    refused(qlp(*args, "--data", "data.npz", "--epochs", "3", "--resume", cwd=work), "--epochs 2", "says 3")
    refused(qlp(*args, "--data", "data2.npz", "--epochs", "2", "--resume", cwd=work), "--data")


@pytest.mark.slow
def test_channel_compare_resumed_with_other_settings_is_refused(work, qlp, monkeypatch, mac_timing):
    from qlp_compress.workflows import channel_compare

    real = channel_compare.find_widths

    def stop_at_l1(ws, ctx, cell, *args, **kwargs):
        if cell.method == "l1":
            raise KeyboardInterrupt
        return real(ws, ctx, cell, *args, **kwargs)

    monkeypatch.setenv("XDG_CACHE_HOME", str(work / "cache"))
    monkeypatch.setattr(channel_compare, "find_widths", stop_at_l1)
    args = ("compare", "lenet.onnx", "--structure", "channel", "--method", "uniform,l1", "--speedup", "1.1", *COMMON,
            "--latency-batch", "8", "--round-to", "4", "--out", "c")
    assert qlp(*args, "--finetune-epochs", "0.01", cwd=work).code == 130
    monkeypatch.setattr(channel_compare, "find_widths", real)
    refused(qlp(*args, "--finetune-epochs", "0", "--resume", cwd=work), "--finetune-epochs 0.01", "says 0;")
    refused(qlp(*args, "--finetune-epochs", "0.01", "--no-distill", "--resume", cwd=work), "--distill on", "says off")
