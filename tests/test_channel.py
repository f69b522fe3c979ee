"""Channel mode: the option-A rewrite against the original model, pruned shapes against a forward pass, the
exported ONNX against PyTorch, the channel game's budget rule, and the CLI end to end on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_app
from torch import nn

from qlp_compress.deploy import export
from qlp_compress.deploy.engine import open_session
from qlp_compress.importer import load_model
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.latency import LatencySettings, LatencyTable, allowed_widths
from qlp_compress.pruning.shortcuts import FixedChannelMap, rewrite_channel_maps
from qlp_compress.pruning.widths import allocate_widths
from qlp_compress.search.channel_env import ChannelEnv
from qlp_compress.search.env import EnvSettings
from qlp_compress.train.zoo import build_model
from qlp_compress.workflows.advice import busy_table_warning, speedup_warning

X = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrong channel shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_option_a_rewrite_is_exact_and_frozen():
    model = _random_bn(build_model("resnet20", 1, 10, (0.3,), (0.4,)))
    rewritten, maps = rewrite_channel_maps(model, X[:1])
    assert len(maps) == 2  # the two downsampling shortcuts
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rewritten(x), model(x))
    for name in maps:
        m = rewritten.get_submodule(name)
        assert isinstance(m, FixedChannelMap) and not m.weight.requires_grad
        assert set(m.weight.unique().tolist()) <= {0.0, 1.0}


def test_rewrite_leaves_models_without_channel_maps_alone():
    model = build_model("lenet5", 1, 10, (0.3,), (0.4,)).eval()
    same, maps = rewrite_channel_maps(model, X[:1])
    assert same is model and maps == []


def _check_widths(space: ChannelSpace, pruned: nn.Module, widths: list[int]) -> None:
    """Every layer writing a group has the group's width; the network runs and keeps its output shape."""
    for group, width in zip(space.groups, widths, strict=True):
        for name in group.layers:
            m = pruned.get_submodule(name)
            count = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features if isinstance(m, nn.Linear) \
                else m.num_features
            assert count == width, (group.name, name)
    with torch.no_grad():
        assert pruned(X).shape == (3, space.output_shape[1])


@pytest.mark.parametrize("arch", ["lenet5", "resnet20"])
def test_zoo_models_prune_to_widths(arch):
    model = _random_bn(build_model(arch, 1, 10, (0.3,), (0.4,)))
    space = ChannelSpace(model, X)
    assert space.unsafe == []
    assert all(g.size > 1 for g in space.groups)
    widths = [max(1, g.size // 2) for g in space.groups]
    pruned = space.prune(widths)
    _check_widths(space, pruned, widths)
    if arch == "resnet20":  # the residual stream is pruned too (three stages), and the shortcuts stay frozen
        assert sorted(g.size for g in space.groups if len(g.layers) > 2) == [16, 32, 64]
        maps = [m for m in pruned.modules() if isinstance(m, FixedChannelMap)]
        assert maps and all(not m.weight.requires_grad for m in maps)


def test_pruning_keeps_the_most_important_channels():
    """A group cut to width w keeps the w channels with the largest L1 importance: compare against the dense
    network whose other channels are zeroed (the reference)."""
    model = build_model("lenet5", 1, 10, (0.3,), (0.4,)).eval()
    space = ChannelSpace(model, X)
    index = next(i for i, g in enumerate(space.groups) if g.name.endswith("classifier.1"))  # Linear 400 → 120
    widths = space.sizes.copy()
    widths[index] = 50
    pruned = space.prune(widths)
    reference = space.model
    import copy

    reference = copy.deepcopy(space.model)
    drop = space.groups[index].order("l1")[:70]
    with torch.no_grad():
        reference.get_submodule("1.classifier.3").weight[:, drop] = 0.0
        assert torch.allclose(pruned(X), reference(X), atol=1e-5)


def test_onnx2torch_import_prunes(tmp_path):
    model = _random_bn(build_model("resnet20", 1, 10, (0.3,), (0.4,)))
    path = tmp_path / "r20.onnx"
    path.write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    loaded = load_model(path, verify_input_shape=(1, 28, 28)).module
    space = ChannelSpace(loaded, X)
    assert len(space.channel_maps) == 2 and space.unsafe == []
    widths = [max(1, g.size // 2) for g in space.groups]
    pruned = space.prune(widths)
    _check_widths(space, pruned, widths)
    # the smaller network exports, passes onnx.checker and matches PyTorch in onnxruntime
    data = export.to_onnx_bytes(pruned, (1, 28, 28))
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    session = open_session(data)
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        expected = pruned(X).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_allowed_widths():
    assert allowed_widths(64, 16) == [16, 32, 48, 64]
    assert allowed_widths(20, 8) == [8, 16, 20]
    assert allowed_widths(6, 8) == [6]
    assert allowed_widths(3, 1) == [1, 2, 3]


@pytest.fixture(scope="module")
def lenet_table(tmp_path_factory):
    cache = tmp_path_factory.mktemp("latency")
    model = build_model("lenet5", 1, 10, (0.3,), (0.4,)).eval()
    space = ChannelSpace(model, X)
    settings = LatencySettings(batch=4, threads=1, round_to=4, repeats=1)

    def to_onnx(m):
        return export.to_onnx_bytes(m, (1, 28, 28))

    table = LatencyTable.build(space, to_onnx(model), to_onnx(space.model), (1, 28, 28), settings, "sha", to_onnx,
                               cache=cache)
    return space, table, cache, to_onnx


def _layer_channels(table: LatencyTable, layer, widths) -> tuple[int, int]:
    """(in, out) channels of one layer at these group widths, worked out here from the layer's shape alone."""
    def channels(full, group):
        return full if group is None else max(1, round(full * widths[group] / table.sizes[group]))

    cout = channels(layer.out_channels, layer.out_group)
    return (cout if layer.depthwise else channels(layer.in_channels, layer.in_group)), cout


def test_latency_table_is_cached_and_covers_every_width(lenet_table):
    """Every allowed width set is in the table (a measured entry per layer), and the prediction is the layers' sum
    plus the untimed rest scaled by activation volume; at full width it is the directly timed network."""
    space, table, cache, to_onnx = lenet_table
    again = LatencyTable.build(space, b"unused", b"unused", (1, 28, 28), table.settings, "sha", to_onnx, cache=cache)
    assert again.data["cached"] is not None and again.entries == table.entries
    for widths in ([a[0] for a in table.allowed], space.sizes, [a[len(a) // 2] for a in table.allowed]):
        layers_ms = 0.0
        for layer in space.layers:
            cin, cout = _layer_channels(table, layer, widths)
            entry = table.entries[LatencyTable._key(layer, cin, cout)]  # measured: no interpolation needed
            assert entry > 0 and table._layer_ms(layer, widths) == entry
            layers_ms += entry
        assert table.predict_ms(widths) == pytest.approx(
            layers_ms + table.rest_ms * table._volume(widths) / table._volume(space.sizes), rel=1e-12)
    timed = float(table.rewrite["pruned_min_ms"])  # the rewritten full network, timed directly
    assert table.predict_ms(space.sizes) == pytest.approx(max(timed, table._layers_ms(space.sizes)), rel=1e-12)


def test_latency_prediction_is_monotone_in_width_and_sums_a_known_table(lenet_table):
    """A table whose entries are a known cost (in × out channels × kernel area): the prediction is that cost summed
    over the layers, and widening any group never predicts a faster network."""
    space, table, _, _ = lenet_table

    def cost(key: str) -> float:
        _, cin, cout, kernel, *_ = json.loads(key)
        return 1e-3 * cin * cout * (int(np.prod(kernel)) if kernel else 1)

    known = LatencyTable(space, {**table.data, "entries": {k: cost(k) for k in table.entries},
                                 "rewrite": {**table.rewrite, "pruned_min_ms": 0.0}})  # no untimed rest
    assert known.rest_ms == 0.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        widths = [int(rng.choice(a)) for a in known.allowed]
        by_hand = sum(cost(LatencyTable._key(layer, *_layer_channels(known, layer, widths))) for layer in space.layers)
        assert known.predict_ms(widths) == pytest.approx(by_hand, rel=1e-12)
        for g, allowed in enumerate(known.allowed):
            wider = [w for w in allowed if w > widths[g]]
            if wider:
                more = [*widths[:g], wider[0], *widths[g + 1:]]
                assert known.predict_ms(more) > known.predict_ms(widths), (g, widths)


def test_latency_table_goes_through_its_calibration_measurements(lenet_table):
    """The prediction at each directly measured width set is that measurement (a curved relation, which an
    affine fit could not follow), the narrowest widths are predicted at their measurement, and noise that inverts two
    measured points still leaves the prediction monotone in the table's own latency."""
    space, table, _, _ = lenet_table
    calibration = table.data["calibration"]
    assert len(calibration) >= 4 and [a[0] for a in table.allowed] in [c["widths"] for c in calibration]

    def with_speedups(f):
        data = {**table.data, "calibration": [{**c, "speedup": f(table.predict_ms(c["widths"]) / table.full_ms)}
                                              for c in calibration]}
        return LatencyTable(space, data)

    curved = with_speedups(lambda x: 1.0 / (0.9 * x ** 2))
    for c in calibration:
        x = table.predict_ms(c["widths"]) / table.full_ms
        assert curved.speedup(c["widths"]) == pytest.approx(1.0 / (0.9 * x ** 2), rel=1e-6)
    narrowest = table.predict_ms([a[0] for a in table.allowed]) / table.full_ms
    assert curved.max_speedup() == pytest.approx(1.0 / (0.9 * narrowest ** 2), rel=1e-6)  # measured, not inferred

    noisy = with_speedups(lambda x: 1.0 / (0.9 * x ** 2) * (1.3 if x == 1.0 else 1.0))  # the full widths too fast
    rng = np.random.default_rng(0)
    samples = [[int(rng.choice(a)) for a in table.allowed] for _ in range(30)] + [c["widths"] for c in calibration]
    by_table = sorted(samples, key=lambda w: table.predict_ms(w))
    predicted = [noisy.speedup(w) for w in by_table]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(predicted))


def test_latency_table_records_the_load_and_warns_when_built_on_a_busy_machine(lenet_table, capsys):
    space, table, _, _ = lenet_table
    assert table.data["load"]["cpus"] == os.cpu_count()
    cpus = os.cpu_count()
    busy = LatencyTable(space, {**table.data, "load": {"before": 0.2, "after": cpus + 3.0, "cpus": cpus}})
    quiet = LatencyTable(space, {**table.data, "load": {"before": 0.2, "after": max(cpus - 1, 0.4), "cpus": cpus}})
    legacy = LatencyTable(space, {k: v for k, v in table.data.items() if k != "load"})  # a table from before
    assert busy.busy_load() == cpus + 3.0 and quiet.busy_load() is None and legacy.busy_load() is None
    assert busy_table_warning(quiet) is None and busy_table_warning(legacy) is None
    message = busy_table_warning(busy)
    assert f"load average of {cpus + 3.0:.1f}" in message and table.data["file"] in message
    assert "load average" in capsys.readouterr().err


def test_speedup_warning_when_the_measurement_falls_short_of_the_target(capsys):
    assert speedup_warning(1.5, 1.52, 1.40, 64) is None  # within 10 % of the target
    message = speedup_warning(1.5, 1.52, 1.30, 64)
    assert "1.30× at batch 64" in message and "--speedup 1.75" in message  # 1.5 × 1.52 / 1.30
    assert "short of --speedup 1.5" in capsys.readouterr().err


def test_channel_env_episodes_meet_the_budget(lenet_table):
    space, table, _, _ = lenet_table
    target = min(0.9 * table.reduction([a[0] for a in table.allowed]), 0.2)
    assert target > 0
    env = ChannelEnv(table, lambda s: 1.0, EnvSettings(passes=3))
    rng = np.random.default_rng(0)
    for _ in range(10):
        env.reset(target)
        done = False
        while not done:
            _, reward, done = env.step(int(rng.integers(env.n_actions)))
        widths = env.widths()
        assert all(w in a for w, a in zip(widths, table.allowed, strict=True))
        assert env.met_target() == (reward == 1.0)
        if env.met_target():
            assert table.reduction(widths) >= target - 1e-9
    for method in ("uniform", "l1"):
        widths = allocate_widths(method, space, table, target)
        assert table.reduction(widths) >= target - 1e-9


@pytest.fixture(scope="module")
def tiny(tiny_task) -> tuple[Path, Path]:
    return tiny_task / "lenet.onnx", tiny_task / "data.npz"  # conftest's shared tiny task (read only)


@pytest.mark.slow
def test_channel_search_cli_end_to_end(tiny, tmp_path, qlp, monkeypatch, mac_timing):
    model, data = tiny
    out = tmp_path / "run"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_app("search", model, "--structure", "channel", "--speedup", "1.05", "--latency-batch", "8", "--threads", "1",
            "--round-to", "2", "--data", data, "--reward-size", "300", "--episodes", "6", "--stages", "2",
            "--reward-images", "200", "--finetune-epochs", "0.2", "--out", out, "--device", "cpu")
    report = json.loads((out / "report.json").read_text())
    policy = json.loads((out / "policy.json").read_text())
    assert policy["structure"] == "channel" and [g["width"] for g in policy["groups"]] == \
        [g["width"] for g in report["groups"]]
    assert report["predicted_speedup"] >= 1.05 - 1e-6
    # measured at batch 1, 64 and the asked --latency-batch, each a finite ratio of two finite timings
    timings = report["measured"]["finetuned"]["speedup"]
    assert sorted(report["measured_speedup"], key=int) == sorted(timings, key=int) == ["1", "8", "64"]
    for batch, measured in timings.items():
        assert measured["batch"] == int(batch) and measured["threads"] == 1
        assert all(math.isfinite(measured[k]) and measured[k] > 0 for k in ("dense_ms", "pruned_ms", "speedup"))
        assert report["measured_speedup"][batch] == measured["speedup"]
    assert report["macs"]["pruned"] <= report["macs"]["dense"]
    proto = onnx.load(str(out / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["qlp.structure"] == "channel" and json.loads(meta["qlp.widths"]) == \
        {g["name"]: g["width"] for g in report["groups"]}
    assert report["verification"]["max_abs_diff"] <= 1e-4 and report["verification"]["same_top1"]
    assert not (out / ".work").exists()
    # the policy applies again through prune --policy, and a bad --speedup is a one-line usage error
    run_app("prune", model, "--structure", "channel", "--policy", out / "policy.json", "--data", data,
            "--latency-batch", "8", "--threads", "1", "--round-to", "2", "--out", tmp_path / "again", "--device", "cpu",
            "--finetune-epochs", "0", "--quantize", "int8", "--calibration-images", "100")
    again_report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again_report["groups"] == report["groups"]
    # int8 composes with channel mode: the smaller network, quantized, timed against the dense fp32 model
    int8 = onnx.load(str(tmp_path / "again" / "model.int8.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in int8.graph.node)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in int8.graph.initializer)
    int8_speedups = again_report["int8"]["measured_speedup"]
    assert sorted(int8_speedups, key=int) == ["1", "8", "64"]
    assert all(math.isfinite(v) and v > 0 for v in int8_speedups.values())
    assert again_report["int8"]["calibration_images"] == 100
    bad = qlp("search", model, "--structure", "channel", "--speedup", "0.5", "--data", data, cwd=tmp_path)
    assert bad.code == 2 and "--speedup" in bad.line
