"""Issue 24, rows 11–13, 16, 17 and 20: a damaged latency cache is measured again (with a note naming it), never
trusted and never read when it is not a regular file; a prediction that is not finite stops the run; a weight
policy that misses its own target is refused and one that empties a layer is warned about; a channel policy is
checked field by field; and the advice names the real cause (--keep-float already given, --round-to too coarse).
Tiny models and hand-edited table files only: no timing here depends on the machine being quiet."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_task
from torch import nn

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import sha256_file
from qlp_compress.deploy import export, quantize
from qlp_compress.importer import load_model
from qlp_compress.pruning.allocate import AllocationSettings, allocate
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.latency import LatencySettings, LatencyTable, allowed_widths
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import Policy, check_policy, read_policy
from qlp_compress.train.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
X = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
SETTINGS = LatencySettings(batch=2, threads=1, round_to=8, repeats=1)  # LeNet-5: about 200 entries, under a second
CHANNEL = ("--latency-batch", "2", "--threads", "1", "--round-to", "8", "--finetune-epochs", "0", "--device", "cpu")


_EXPORTS: dict[tuple, bytes] = {}


def _to_onnx(m: nn.Module) -> bytes:
    """The ONNX export, once per architecture (the table's calibration networks are the same at every build, and
    their timings do not matter here)."""
    key = tuple((k, tuple(v.shape)) for k, v in m.state_dict().items())
    if key not in _EXPORTS:
        _EXPORTS[key] = export.to_onnx_bytes(m, (1, 28, 28))
    return _EXPORTS[key]


@pytest.fixture(scope="module")
def lenet():
    model = build_model("lenet5", 1, 10, (0.3,), (0.4,)).eval()
    return model, ChannelSpace(model, X)


def _build(lenet, cache: Path) -> LatencyTable:
    model, space = lenet
    return LatencyTable.build(space, _to_onnx(model), _to_onnx(space.model), (1, 28, 28), SETTINGS, "sha", _to_onnx,
                              cache=cache)


@pytest.fixture(scope="module")
def whole(lenet, tmp_path_factory) -> tuple[Path, str]:
    """A cache holding one whole table: (its file, its text)."""
    table = _build(lenet, tmp_path_factory.mktemp("latency"))
    path = Path(table.data["file"])
    return path, path.read_text()


@pytest.fixture
def cache(whole, tmp_path) -> Path:
    """A fresh copy of the whole cache, to damage: the folder (the table file is whole_file.name in it)."""
    path, text = whole
    (tmp_path / path.name).write_text(text)
    return tmp_path


def _damage(data: dict, how: str) -> dict:
    entries = data["entries"]
    keys = sorted(entries)
    if how == "nan-entries":  # row 11
        data["entries"] = {k: float("nan") for k in keys}
    elif how == "empty-entries":
        data["entries"] = {}
    elif how == "extra-entry":
        data["entries"] = {**entries, '["conv", 1, 1]': 0.1}
    elif how == "extra-setting":
        data["settings"] = {**data["settings"], "extra": 1}
    elif how == "half-entries":
        data["entries"] = {k: entries[k] for k in keys[: len(keys) // 2]}
    elif how == "zero-calibration":
        data["calibration"][0]["speedup"] = 0
    elif how == "string-load":
        data["load"] = {**data["load"], "after": "busy"}
    elif how == "string-entry":
        data["entries"][keys[0]] = "fast"
    elif how == "huge-entries":  # finite, but their sum is not
        data["entries"] = {k: 1e308 for k in keys}
    elif how == "no-rewrite":
        del data["rewrite"]
    elif how == "a-list":
        return [data]
    return data


@pytest.mark.parametrize("how", ["nan-entries", "empty-entries", "extra-entry", "extra-setting", "half-entries",
                                 "zero-calibration", "string-load", "string-entry", "huge-entries", "no-rewrite",
                                 "a-list"])
def test_a_damaged_latency_cache_is_measured_again_with_a_note(lenet, whole, cache, how, capsys):
    """Rows 11 and 12: the damaged table is not used (no NaN prediction, no AttributeError/TypeError/KeyError/
    ZeroDivisionError), a one-line note names the file, and the table written over it is whole again."""
    path = cache / whole[0].name
    path.write_text(json.dumps(_damage(json.loads(whole[1]), how), allow_nan=True))
    capsys.readouterr()
    table = _build(lenet, cache)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert table.data["cached"] is None  # measured again
    assert len(notes) == 1 and notes[0].startswith("note: ") and str(path) in notes[0], notes
    assert math.isfinite(table.max_speedup()) and all(math.isfinite(v) and v > 0 for v in table.entries.values())
    again = _build(lenet, cache)  # the cache now holds the new table
    assert again.data["cached"] == str(path) and capsys.readouterr().err == ""


def test_a_table_that_predicts_no_finite_speedup_stops_the_run(lenet, whole):
    """Row 11: a prediction that is not finite is one error line naming the file, never a NaN speedup."""
    _, space = lenet
    data = json.loads(whole[1])
    table = LatencyTable(space, {**data, "entries": {k: 1e308 for k in data["entries"]}, "file": "/x/table.json"})
    with pytest.raises(QLPError, match=r"not a finite positive number.*delete /x/table\.json") as raised:
        table.speedup(space.sizes)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", ["fifo", "folder", "link-to-dev-null"])
def test_a_cache_that_is_not_a_regular_file_is_not_read(lenet, whole, cache, kind, capsys):
    """Row 13: a FIFO (reading it hangs), a folder or a link to a device where the table should be is named in a
    note and the table measured again at once (a FIFO and a link are written over with a whole table)."""
    path = cache / whole[0].name
    path.unlink()
    {"fifo": lambda: os.mkfifo(path), "folder": path.mkdir, "link-to-dev-null": lambda: path.symlink_to(os.devnull)
     }[kind]()
    capsys.readouterr()
    built: list[LatencyTable] = []
    worker = threading.Thread(target=lambda: built.append(_build(lenet, cache)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # blocked on the FIFO: give it a writer that closes at once, so the reader ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=60)
        pytest.fail(f"the latency cache {kind} was read (and blocked)")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert built and built[0].data["cached"] is None
    assert len(notes) == 1 and f"{path} is not a regular file" in notes[0], notes
    assert path.is_dir() if kind == "folder" else (path.is_file() and not path.is_symlink())


DEV_ZERO = """
import json, os, resource, sys, time
from pathlib import Path
import torch
from qlp_compress.deploy import export
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.latency import LatencySettings, LatencyTable
from qlp_compress.train.zoo import build_model

torch.set_num_threads(1)
model = build_model("lenet5", 1, 10, (0.3,), (0.4,)).eval()
space = ChannelSpace(model, torch.rand(2, 1, 28, 28))
settings = LatencySettings(batch=2, threads=1, round_to=8, repeats=1)
to_onnx = lambda m: export.to_onnx_bytes(m, (1, 28, 28))
build = lambda: LatencyTable.build(space, to_onnx(model), to_onnx(space.model), (1, 28, 28), settings, "sha",
                                   to_onnx, cache=Path(sys.argv[1]))
path = Path(build().data["file"])
path.unlink()
path.symlink_to("/dev/zero")
size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
started = time.perf_counter()
table = build()
print(json.dumps({"seconds": time.perf_counter() - started, "cached": table.data["cached"],
                  "regular": path.is_file() and not path.is_symlink()}))
"""


@pytest.mark.slow
def test_a_cache_linked_to_dev_zero_is_not_read(tmp_path):
    """Row 13: a link to /dev/zero (read until memory ran out) is named in a note and measured again at once. In a
    child process with a memory and a time limit, so that a regression fails instead of taking the machine."""
    script = tmp_path / "dev_zero.py"
    script.write_text(DEV_ZERO)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout)
    assert run["cached"] is None and run["regular"] and run["seconds"] < 30, run
    assert "is not a regular file; measuring the table again" in result.stderr, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ policies


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """lenet.onnx (4 classes) and data.npz, a uniform 0.5 weight policy of it, and a channel policy of it."""
    root = tmp_path_factory.mktemp("policies")
    make_tiny_task(root, n=600, n_train=500, steps=20)
    loaded = load_model(root / "lenet.onnx", verify_input_shape=(1, 28, 28))
    layers = find_prunable_layers(loaded.module)
    names = [x.name for x in layers]
    sparsities = allocate("uniform", {x.name: x.weight.detach() for x in layers}, 0.5, AllocationSettings())
    sha = sha256_file(root / "lenet.onnx")
    Policy(method="uniform", target=0.5, layers=names, numels=[x.numel for x in layers],
           sparsities=[sparsities[n] for n in names], model_sha256=sha).save(root / "policy.json")
    space = ChannelSpace(loaded.module, X)
    groups = [{"name": g.name, "module": g.name, "channels": g.size,
               "width": next(w for w in allowed_widths(g.size, 8) if w >= g.size // 2)} for g in space.groups]
    (root / "channel.json").write_text(json.dumps({
        "format": "qlp-compress/channel-policy/v1", "structure": "channel", "method": "l1", "target_speedup": 1.5,
        "model_sha256": sha, "criterion": "l1", "groups": groups, "predicted_speedup": 1.5}))
    return root


def _edited(tiny: Path, name: str, edit) -> Path:
    doc = json.loads((tiny / name).read_text())
    edit(doc)
    path = tiny / f"edited-{name}"
    path.write_text(json.dumps(doc, allow_nan=True))
    return path


def test_a_weight_policy_that_misses_its_own_target_is_refused(tiny, qlp, tmp_path, monkeypatch):
    """Row 16: two layers edited to 100 %, the target left at 0.5: the model would not be what the policy says."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def two_emptied(doc):
        for entry in doc["layers"][:2]:
            entry["sparsity"] = 1.0

    policy = _edited(tiny, "policy.json", two_emptied)
    run = qlp("prune", tiny / "lenet.onnx", "--policy", policy, "--data", tiny / "data.npz", "--out", tmp_path / "o",
              "--finetune-epochs", "0", "--device", "cpu", cwd=tmp_path)
    assert run.code == 1
    assert "does not reach its own target" in run.line and "target_sparsity" in run.line and str(policy) in run.line
    assert not (tmp_path / "o").exists()


def test_a_weight_policy_that_empties_a_layer_is_warned_about(tiny, capsys):
    """Row 16: a consistent policy (target = what its layers give) that prunes a layer to 100 % is applied (inside
    a residual branch that can be meant) with a one-line warning naming the layer."""
    def emptied(doc):
        doc["layers"][0]["sparsity"] = 1.0
        weights = [e["weights"] for e in doc["layers"]]
        doc["target_sparsity"] = sum(w * e["sparsity"] for w, e in zip(weights, doc["layers"], strict=True)) / \
            sum(weights)

    path = _edited(tiny, "policy.json", emptied)
    loaded = load_model(tiny / "lenet.onnx", verify_input_shape=(1, 28, 28))
    layers = find_prunable_layers(loaded.module)
    paths = [x.name for x in layers]
    capsys.readouterr()
    policy = check_policy(read_policy(path), path, loaded.sha256, paths, [x.numel for x in layers],
                          loaded.names_of(paths))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "100 %" in lines[0], lines
    assert policy.labels[0] in lines[0] and str(path) in lines[0]
    plain = read_policy(tiny / "policy.json")  # the untouched policy: no warning
    check_policy(plain, tiny / "policy.json", loaded.sha256, paths, [x.numel for x in layers], loaded.names_of(paths))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("edit, says", [
    (lambda d: d.update(target_speedup="nan"), "target_speedup"),
    (lambda d: d.update(target_speedup=float("nan")), "target_speedup"),
    (lambda d: d["groups"][0].update(width="abc"), "group"),
    (lambda d: d.pop("groups"), "groups"),
    (lambda d: d["groups"][1].update(width=0), "group"),
    (lambda d: d.update(criterion=None), "criterion"),
    (lambda d: d.update(criterion=[]), "criterion"),
], ids=["speedup-text-nan", "speedup-nan", "width-text", "no-groups", "width-0", "no-criterion", "criterion-list"])
def test_a_channel_policy_is_checked_field_by_field(tiny, qlp, tmp_path, monkeypatch, edit, says):
    """Row 17: one `not a valid policy.json (...)` line naming the field; never "unexpected ValueError/KeyError",
    and never a run that ends advising "--speedup nan"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    policy = _edited(tiny, "channel.json", edit)
    run = qlp("prune", tiny / "lenet.onnx", "--structure", "channel", "--policy", policy, "--data", tiny / "data.npz",
              "--out", tmp_path / "o", *CHANNEL, cwd=tmp_path)
    assert run.code == 1, run.stderr[-2000:]
    assert "not a valid policy.json" in run.line and says in run.line and "--speedup nan" not in run.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ advice


def test_int8_loss_advice_does_not_repeat_keep_float_already_given(capsys):
    """Row 20: with --keep-float first,last given, a loss over --int8-max-loss 0 does not advise it again."""
    quantize.compare_accuracy(0.90, 0.89, max_loss=0.0, keep_float=("first", "last"))
    given = capsys.readouterr().err
    assert "warning:" in given and "--keep-float first,last" not in given
    quantize.compare_accuracy(0.90, 0.89, max_loss=0.0)
    assert "--keep-float first,last" in capsys.readouterr().err


@pytest.fixture(scope="module")
def convgemm(tiny) -> Path:
    """Conv(1→8)→ReLU→Flatten→Gemm: its only channel group has 8 channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 4)).eval()
    path = tiny / "convgemm.onnx"
    path.write_bytes(_to_onnx(model))
    return path


def test_a_speedup_out_of_reach_because_of_round_to_says_so(tiny, convgemm, qlp, tmp_path, monkeypatch):
    """Row 20: --round-to 8 leaves an 8-channel group nothing to remove; the advice is a smaller --round-to, not
    "ask for less" (--speedup must stay above 1)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = qlp("prune", convgemm, "--structure", "channel", "--method", "l1", "--speedup", "1.5", "--data",
              tiny / "data.npz", "--out", tmp_path / "o", *CHANNEL, cwd=tmp_path)
    assert run.code == 2
    assert "--round-to 8" in run.line and "--round-to 4" in run.line and "ask for less" not in run.line


@pytest.mark.slow
def test_a_nan_cache_no_longer_builds_a_chance_level_model(tiny, qlp, tmp_path, monkeypatch):
    """Row 11 end to end: the cache of a first run, every entry set to NaN; the second run notes the file,
    measures the table again and predicts a finite speedup (not every group cut to its narrowest width)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ("prune", tiny / "lenet.onnx", "--structure", "channel", "--policy", tiny / "channel.json", "--data",
            tiny / "data.npz", *CHANNEL)
    first = qlp(*args, "--out", tmp_path / "a", cwd=tmp_path)
    assert first.code == 0, first.stderr[-2000:]
    [path] = (tmp_path / "cache" / "qlp-compress" / "latency").glob("*.json")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "entries": {k: float("nan") for k in data["entries"]}}))
    second = qlp(*args, "--out", tmp_path / "b", cwd=tmp_path)
    assert second.code == 0, second.stderr[-2000:]
    assert f"note: the cached latency table {path}" in second.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert math.isfinite(report["predicted_speedup"]) and report["latency_table"]["cached"] is None
    assert all(math.isfinite(v) for v in json.loads(path.read_text())["entries"].values())
