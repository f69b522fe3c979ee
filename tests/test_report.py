"""What a run shows and keeps: readable layer names (the same in policy.json, report.json, the plot and
`evaluate`), plots that show every episode, complete reports, warnings for settings that defeat the search, and
progress for long phases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qlp_compress.base import names as layer_names
from qlp_compress.deploy import export
from qlp_compress.importer import load_model
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import Policy, check_policy, read_policy
from qlp_compress.report import plots, progress
from qlp_compress.search.curriculum import SearchSettings, stage_episodes
from qlp_compress.workflows import advice


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Net(nn.Module):
    """Nested containers (a Sequential inside a module inside a Sequential), as real models have."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layers = nn.Sequential(Block(4), Block(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x):
        return self.head(self.layers(torch.relu(self.stem(x))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Identity(), Net()).eval()


def _original_paths(model: nn.Module) -> list[str]:
    return [layer.name for layer in find_prunable_layers(model)]


def _write_onnx(model: nn.Module, path: Path, opaque_weights: bool = False) -> None:
    data = export.to_onnx_bytes(model, (1, 8, 8))
    if opaque_weights:  # names such as an exporter gives folded weights: only the node names tell the layer
        proto = onnx.load_from_string(data)
        weights = list(export.weight_initializers(proto))
        data = export.name_weights(data, {w: f"onnx::W_{i}" for i, w in enumerate(weights)})
        assert not set(weights) & set(export.weight_initializers(onnx.load_from_string(data)))
    path.write_bytes(data)


@pytest.mark.parametrize("opaque_weights", [False, True])
def test_imported_onnx_layers_get_the_original_module_paths(tmp_path, opaque_weights):
    model = _net()
    path = tmp_path / "net.onnx"
    _write_onnx(model, path, opaque_weights)
    loaded = load_model(path)
    paths = _original_paths(loaded.module)
    assert paths != _original_paths(model)  # onnx2torch's own module names differ from the user's
    assert loaded.names_of(paths) == _original_paths(model)


def test_layer_name_rules():
    # a PyTorch export names the weight after the module; the node scope gives the same path when it is not
    assert layer_names.layer_name("1.layers.0.conv1.weight", "/1/layers/layers.0/conv1/Conv") == "1.layers.0.conv1"
    assert layer_names.layer_name("onnx::Conv_193", "/1/layers/layers.0/conv1/Conv") == "1.layers.0.conv1"
    # onnx2torch module paths (dots turned into slashes), also as written by older exports of this tool
    assert layer_names.layer_name("1/layers/layers/0/conv1/Conv.weight", "x") == "1.layers.0.conv1"
    assert layer_names.layer_name("1.fc.weight_quantized", None) == "1.fc"  # an int8 file's stored weight
    assert layer_names.layer_name("W3", "") == "W3"  # a graph with its own names keeps them
    assert layer_names.unique(["a", "a", "b"], ["p", "q", "r"]) == ["p", "q", "b"]


def test_policy_files_old_and_new_match_the_model(tmp_path):
    model = _net()
    path = tmp_path / "net.onnx"
    _write_onnx(model, path)
    loaded = load_model(path)
    layers = find_prunable_layers(loaded.module)
    paths, numels = [x.name for x in layers], [x.numel for x in layers]
    readable = loaded.names_of(paths)
    policy = Policy(method="uniform", target=0.5, layers=paths, numels=numels, sparsities=[0.5] * len(paths),
                    model_sha256=loaded.sha256, names=readable)
    new = tmp_path / "new.json"
    policy.save(new)
    doc = json.loads(new.read_text())
    assert [e["name"] for e in doc["layers"]] == readable and [e["module"] for e in doc["layers"]] == paths
    old = tmp_path / "old.json"  # before readable names: `name` held the module path, no `module`
    old.write_text(json.dumps({**doc, "layers": [{k: v for k, v in e.items() if k != "module"} | {"name": p}
                                                 for e, p in zip(doc["layers"], paths, strict=True)]}))
    short = tmp_path / "names-only.json"  # readable names alone (e.g. written by hand)
    short.write_text(json.dumps({**doc, "layers": [{k: v for k, v in e.items() if k != "module"}
                                                   for e in doc["layers"]]}))
    for f in (new, old, short):
        checked = check_policy(read_policy(f), f, loaded.sha256, paths, numels, readable)
        assert checked.layers == paths and checked.labels == readable, f.name
        assert checked.by_layer() == dict(zip(paths, [0.5] * len(paths), strict=True))
    for f in (new, old):  # callers that pass no readable names still match every file that has module paths
        assert check_policy(read_policy(f), f, loaded.sha256, paths, numels).layers == paths
    with pytest.raises(Exception, match="other layers"):
        check_policy(read_policy(new), new, loaded.sha256, paths[::-1], numels[::-1], readable[::-1])


def test_reward_figure_shows_every_episode():
    rewards = [0.6, -0.4, 0.7, 0.65, 0.5, -0.9, 0.55, 0.62]
    stages = [1, 1, 1, 2, 2, 2, 2, 2]
    succeeded = [r >= 0 for r in rewards]
    demos = ["lamp", None, None, "lamp", None, None, None, None]
    fig = plots.reward_figure(rewards, stages, succeeded, demos, stage_targets=[0.5, 0.8], chance=0.25)
    ax = fig.axes[0]
    points = {}
    for line in ax.lines:
        if line.get_linestyle() in ("None", "none", "") and line.get_marker() not in (None, "None", ""):
            for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
                points[int(x)] = (float(y), line.get_marker())
    assert sorted(points) == list(range(1, len(rewards) + 1))  # every episode, once
    assert [points[i + 1][0] for i in range(len(rewards))] == pytest.approx(rewards)  # at its true value
    failed_markers = {points[i + 1][1] for i in range(len(rewards)) if not succeeded[i]}
    ok_markers = {points[i + 1][1] for i in range(len(rewards)) if succeeded[i]}
    assert len(failed_markers) == 1 and not failed_markers & ok_markers
    low, high = ax.get_ylim()
    assert low < min(rewards) and high >= max(rewards)
    assert 3.5 in [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"]  # stage 2 starts at 4
    assert "negative = missed the target" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("failed" in t for t in labels) and any("demonstration" in t for t in labels)
    fig.clf()


def test_sparsity_figure_bars_target_and_zero_layers():
    names = ["stem", "layers.0.conv1", "layers.0.conv2", "head.1"]
    values = [0.0, 0.9, 0.95, 0.0]
    fig = plots.layer_sparsity_figure({"qlp": values}, names, target=0.9, title="t")
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx(values)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    zeros = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(zeros) == 1 and list(zeros[0].get_xdata()) == pytest.approx([ax.patches[0].get_x() + ax.patches[0]
                                                                             .get_width() / 2,
                                                                             ax.patches[3].get_x() + ax.patches[3]
                                                                             .get_width() / 2])
    assert any(list(line.get_ydata()) == [0.9, 0.9] for line in ax.lines)  # the target line
    assert ax.get_title() == "t"
    fig.clf()


def test_budget_warning_names_a_budget_that_is_enough(capsys):
    settings = SearchSettings(target_removed=0.9, episodes=20, stages=4)  # 5/5/5/... with 4 demonstrations per stage
    message = advice.budget_warning(settings)
    err = capsys.readouterr().err
    assert message and err.count("\n") == 1 and err.startswith("warning:")
    suggested = int(message.split("--episodes ")[-1].split()[0])
    lengths = stage_episodes(suggested, 4, settings.final_share)
    assert min(lengths) - len(settings.demonstrations) >= advice.MIN_AGENT_EPISODES
    assert min(stage_episodes(suggested - 1, 4, settings.final_share)) - len(settings.demonstrations) \
        < advice.MIN_AGENT_EPISODES  # the smallest such budget
    assert advice.budget_warning(SearchSettings(target_removed=0.9, episodes=suggested, stages=4)) is None
    assert advice.budget_warning(SearchSettings(target_removed=0.9)) is None  # the defaults leave the agent room


def test_signal_warning_when_every_allocation_scores_chance(capsys):
    def history(rewards):
        return [{"stage": 2, "reward": r, "succeeded": r >= 0} for r in rewards]

    assert advice.signal_warning(history([0.11, 0.09, -0.3, 0.12]), 10, 0.95) is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reward-finetune-steps" in err and "chance" in err
    assert advice.signal_warning(history([0.11, 0.40, 0.12]), 10, 0.95) is None  # one allocation stands out
    assert advice.signal_warning([{"stage": 1, "reward": 0.1, "succeeded": True}, *history([0.6])], 10, 0.9) is None
    assert capsys.readouterr().err == ""


def test_phase_lines_outside_a_terminal_and_quiet(capsys, monkeypatch):
    with progress.phase("quick"):  # a phase shorter than SHOW_AFTER_S adds nothing
        pass
    with pytest.raises(RuntimeError), progress.phase("failing"):
        raise RuntimeError
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)  # announced at once
    with progress.phase("export model.onnx"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "export model.onnx …" and lines[1].startswith("export model.onnx: ") and lines[1].endswith(" s")
    with progress.phase("outer"), progress.phase("inner"):  # only the outermost phase shows
        pass
    assert "inner" not in capsys.readouterr().err
    progress.set_quiet(True)
    try:
        with progress.phase("silent"), progress.search_progress("search", 2) as on_episode:
            on_episode({"episode": 1, "stage": 1, "stages": 1, "target": 0.5, "epsilon": 1.0, "reward": 0.5,
                        "best": 0.5})
        assert capsys.readouterr().err == ""
    finally:
        progress.set_quiet(False)


@pytest.fixture(scope="module")
def run(searched):
    """conftest's shared qlp search (12 episodes over 2 stages, 0.5 epoch of fine-tuning) through the command line:
    its folder, its report, and the command it records."""
    out, command = searched
    return out, json.loads((out / "report.json").read_text()), command


@pytest.mark.slow
def test_report_names_match_evaluate_and_policy(run):
    from qlp_compress.workflows import evaluate_model

    out, report, _ = run
    policy = json.loads((out / "policy.json").read_text())
    shown = evaluate_model(out / "model.onnx", None, "cpu", latency_batches=(1,), repeats=1)["layers"]
    names = [e["name"] for e in policy["layers"]]
    assert names == [e["name"] for e in report["layers"]]
    assert sorted(shown) == sorted(names)
    for e in policy["layers"]:  # the same layer under the same name: its sparsity read back from the file
        assert shown[e["name"]]["weights"] == e["weights"]
        assert shown[e["name"]]["sparsity"] == pytest.approx(e["sparsity"], abs=1.5 / e["weights"])
    source = Path(report["model"])  # the user's file
    original = load_model(source)
    original_names = export.weight_layer_names(onnx.load(str(source)))
    assert sorted(original_names.values()) == sorted(names)  # the names of the user's own file
    assert original.names_of([x.name for x in find_prunable_layers(original.module)]) == names


@pytest.mark.slow
def test_report_is_complete(run):
    import onnxruntime

    out, _, command = run
    saved = json.loads((out / "report.json").read_text())
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["versions"]["onnx"] == onnx.__version__
    assert saved["versions"]["onnxruntime"] == onnxruntime.__version__
    assert saved["seed"]["search"] == 0 and saved["settings"]["search"]["episodes"] == 12
    assert saved["settings"]["finetune"]["epochs"] == 0.5 and saved["command"] == command
    s = saved["search"]
    assert s["episodes"] == 12 == s["agent_episodes"] + s["demonstration_episodes"]
    assert s["episodes"] == s["reward_evaluations"] + s["failed_episodes"]
    policy = json.loads((out / "policy.json").read_text())
    assert s["failed_episodes"] == sum(not x for x in policy["search"]["succeeded"])
    assert sum(r < 0 for r in policy["search"]["rewards"]) == s["failed_episodes"]
    assert any("no speedup" in n and "--structure channel" in n for n in saved["notes"])
    identical = (out / "model.sparse.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert identical == any("byte for byte" in n for n in saved["notes"])
    assert saved["measured"]["sparse_storage"]["identical_to_model_onnx"] == identical
    md = (out / "report.md").read_text()
    assert f"torch {torch.__version__}" in md and "no speedup" in md and "reached the target" in md
    assert np.isclose(saved["chance_accuracy"], 0.25)
