"""Depth through the CLI, and `optimize`: on a small residual network of the tiny task, a depth policy applies again
through `prune --policy`, and optimize returns the fastest form within the budget among the candidates it measured
(its model.onnx is that candidate's file), reads the test split only for the answer, keeps every candidate, and a
resume reuses the finished ones."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_app

from qlp_compress.base.errors import UsageError
from qlp_compress.deploy import export
from qlp_compress.deploy.engine import open_session
from qlp_compress.report.optimize import pareto_front
from qlp_compress.train.finetune import augment
from qlp_compress.train.zoo import CifarResNet, Normalize
from qlp_compress.workflows import channels, optimize

FAST = ("--threads", "1", "--round-to", "8", "--device", "cpu")


@pytest.fixture(scope="module")
def resnet8(tiny_task, tmp_path_factory) -> tuple[Path, Path]:
    """A ResNet-8 (3 stages of one basic block) trained 40 steps on the tiny task, as ONNX."""
    root = tmp_path_factory.mktemp("resnet8")
    data = np.load(tiny_task / "data.npz")
    x, y = torch.from_numpy(data["x"]).float() / 255, torch.from_numpy(data["y"]).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(Normalize((0.2,), (0.3,)), CifarResNet(8, 1, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for i in range(40):
        batch = torch.arange(i * 50, i * 50 + 50) % len(y)
        loss = torch.nn.functional.cross_entropy(model(augment(x[batch], g)), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    (root / "resnet8.onnx").write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    return root / "resnet8.onnx", tiny_task / "data.npz"


def _convs(path: Path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


@pytest.mark.slow
def test_depth_policy_applies_again(resnet8, tmp_path, monkeypatch, mac_timing):
    model, data = resnet8
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "depth"
    run_app("prune", model, "--structure", "channel,depth", "--method", "depth", "--speedup", "1.15",
            "--latency-batch", "4", "--data", data, "--finetune-epochs", "0", "--out", out, *FAST)
    report, policy = (json.loads((out / n).read_text()) for n in ("report.json", "policy.json"))
    dropped = [b["name"] for b in policy["blocks"] if not b["kept"]]
    assert policy["structure"] == "channel,depth" and len(policy["blocks"]) == 3 and dropped
    assert [g["width"] for g in policy["groups"]] == [g["channels"] for g in policy["groups"]]  # depth: full widths
    assert report["blocks"] == policy["blocks"] and report["predicted_speedup"] >= 1.15 - 1e-9
    dense_convs = _convs(model)
    maps = len(report["channel_maps"])  # option-A shortcuts, exported as fixed 1×1 convolutions
    assert dense_convs - _convs(out / "model.onnx") == 2 * len(dropped) - maps  # two convolutions per basic block
    assert "residual blocks dropped" in (out / "report.md").read_text()
    again = tmp_path / "again"
    run_app("prune", model, "--structure", "channel", "--policy", out / "policy.json", "--latency-batch", "4",
            "--data", data, "--finetune-epochs", "0", "--out", again, *FAST)
    assert json.loads((again / "policy.json").read_text())["blocks"] == policy["blocks"]
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    first, second = (open_session((p / "model.onnx").read_bytes()) for p in (out, again))
    np.testing.assert_allclose(first.run(None, {first.get_inputs()[0].name: x})[0],
                               second.run(None, {second.get_inputs()[0].name: x})[0], atol=1e-5)


OPTIMIZE = ("--max-loss", "30", "--episodes", "6", "--stages", "1", "--finetune-epochs", "0", "--batch", "4",
            "--reward-size", "300", "--reward-images", "100", *FAST)


@pytest.mark.slow
def test_optimize_returns_the_fastest_form_within_the_budget_and_resumes(resnet8, tmp_path, monkeypatch):
    model, data = resnet8
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "opt"
    # the first run is interrupted after its first candidate
    made: list[str] = []
    real = channels.compress_channels

    def interrupted(model_path, ws, cell, folder, *args, **kwargs):
        if made:
            raise KeyboardInterrupt
        made.append(folder.name)
        return real(model_path, ws, cell, folder, *args, **kwargs)

    monkeypatch.setattr(optimize, "compress_channels", interrupted)
    result = run_app("optimize", model, "--data", data, "--out", out, *OPTIMIZE, "--time-budget", "100000", code=None)
    assert result.exit_code == 130, result.output[-2000:]  # stopped as Ctrl-C stops it
    assert (out / ".work" / "candidates" / made[0] / "report.json").is_file() and not (out / "model.onnx").exists()

    # the resumed run makes only the others, and reads the test split for the answer alone
    again: list[str] = []
    test_reads: list[int] = []
    real_accuracy = optimize.session_accuracy

    def counted(session, dataset, *args, **kwargs):
        if not isinstance(dataset, optimize.HeldOut):
            test_reads.append(len(dataset))
        return real_accuracy(session, dataset, *args, **kwargs)

    def recorded(model_path, ws, cell, folder, *args, **kwargs):
        again.append(folder.name)
        assert isinstance(ws.splits.test, optimize.HeldOut)  # candidates are judged on held-out images
        return real(model_path, ws, cell, folder, *args, **kwargs)

    monkeypatch.setattr(optimize, "compress_channels", recorded)
    monkeypatch.setattr(optimize, "session_accuracy", counted)
    run_app("optimize", model, "--data", data, "--out", out, *OPTIMIZE, "--time-budget", "100000", "--resume")
    assert made[0] not in again
    assert len(test_reads) == 2  # the answer and the dense model, after the choice

    result = json.loads((out / "optimize.json").read_text())
    rows = result["candidates"]
    made_here = {made[0], *again} - ({again[-1]} if "failed" in result["stopped"] else set())  # a failed one goes
    assert rows[0]["name"] == "dense" and {r["name"] for r in rows} >= made_here
    within = [r for r in rows if r["loss"] <= 30]
    best = max(r["speedup"]["4"] for r in within)
    chosen = next(r for r in rows if r["name"] == result["chosen"])
    assert chosen in within and chosen["speedup"]["4"] == best
    expected = (out / chosen["file"]).read_bytes() if chosen["file"] else None
    if expected is not None:
        assert (out / "model.onnx").read_bytes() == expected
    for r in rows[1:]:
        assert (out / r["file"]).is_file()  # every candidate kept
    assert (out / "pareto.png").stat().st_size > 10_000 and "Pareto" in (out / "report.md").read_text()
    assert result["stopped"] and result["int8_verdict"].startswith("int8 is")
    assert not (out / ".work").exists()


def _row(name, loss, speed, size=1000, form="float"):
    return {"name": name, "form": form, "loss": loss, "speedup": {"1": speed, "64": speed}, "bytes": size}


def test_the_answer_is_the_fastest_or_smallest_form_within_the_budget():
    rows = [_row("dense", 0.0, 1.0, 4000), _row("a", 0.4, 1.4, 3000), _row("a int8", 0.9, 2.1, 900, "int8"),
            _row("b", 1.5, 2.6, 2000), _row("b int8", 2.5, 3.5, 600, "int8")]
    speed = optimize.OptimizeSettings(max_loss=1.0, batch=64)
    assert optimize.choose(rows, speed)["name"] == "a int8"
    assert optimize.choose(rows, replace(speed, max_loss=0.1))["name"] == "dense"
    assert optimize.choose(rows, replace(speed, max_loss=2.0))["name"] == "b"
    assert optimize.choose(rows, replace(speed, max_loss=3.0, objective="size"))["name"] == "b int8"
    tie = [_row("dense", 0.0, 1.0), _row("c", 0.2, 1.0)]
    assert optimize.choose(tie, speed)["name"] == "dense"  # no faster: keep the dense model


def test_the_pareto_front_is_what_no_other_form_beats():
    rng = np.random.default_rng(0)
    rows = [_row(f"r{i}", float(rng.uniform(0, 5)), float(rng.uniform(1, 4))) for i in range(40)]
    front = pareto_front(rows, "speed", 64)
    for r in rows:
        beaten = any(o["loss"] <= r["loss"] and o["speedup"]["64"] >= r["speedup"]["64"] and o is not r
                     and (o["loss"], o["speedup"]["64"]) != (r["loss"], r["speedup"]["64"]) for o in rows)
        assert (r in front) == (not beaten)
    assert [r["loss"] for r in front] == sorted(r["loss"] for r in front)
    speeds = [r["speedup"]["64"] for r in front]
    assert speeds == sorted(speeds)  # along the front, more loss buys more speed


def test_optimize_refuses_bad_goals():
    for bad in (optimize.OptimizeSettings(max_loss=-1), optimize.OptimizeSettings(max_loss=1, objective="fast"),
                optimize.OptimizeSettings(max_loss=1, time_budget=0)):
        with pytest.raises(UsageError):
            optimize.check_settings(bad)
