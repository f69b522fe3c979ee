"""README promises that had no test of their own: --quiet keeps warnings, an interrupted run is neither overwritten
nor silently continued (--resume continues it, --force starts it over), damaged checkpoints are refused on resume,
`train --resume`, the defaults (2 fine-tuning epochs, sparse storage on), and channel mode's `--no-distill`,
`bn-slimming`, `compare --structure channel` and groups left whole. (--json equal to report.json:
test_cli_contract.py; Fashion-MNIST from the cache and the system folder: test_data.py.)

Runs call the entry point in this process (the `qlp` fixture); an interruption is a KeyboardInterrupt raised where
Ctrl-C would land, at a point the code reaches (a training step once a checkpoint exists, an episode)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_task
from torch import nn

from qlp_compress import cli
from qlp_compress.deploy import export
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.train.finetune import augment

DEVICE = ("--device", "cpu")
SEARCH = ("--data", "data.npz", "--sparsity", "0.6", "--episodes", "12", "--stages", "1", "--reward-images", "50",
          "--bn-recalibrate", "0", "--reward-size", "300", "--finetune-epochs", "0", "--no-sparse-storage", *DEVICE)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class ShuffleNet(nn.Module):
    """Three convolutions with BatchNorm; the second's 16 channels go through a channel shuffle written for exactly
    16 channels (reshape to 2 × 8), which Torch-Pruning cannot follow: its group must be left whole."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = h.reshape(-1, 2, 8, 14, 14).transpose(1, 2).reshape(-1, 16, 14, 14)
        h = F.relu(self.bn3(self.conv3(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """lenet.onnx and data.npz (conftest's tiny task), and shuffle.onnx: a ShuffleNet trained on the same task whose
    third BatchNorm has 8 channels of tiny scale (the first bn-slimming removes)."""
    root = tmp_path_factory.mktemp("promises")
    make_tiny_task(root, n=700, n_train=600, steps=40)
    arrays = np.load(root / "data.npz")
    x, y = torch.from_numpy(arrays["x"]).float() / 255, torch.from_numpy(arrays["y"])
    torch.manual_seed(0)
    model = ShuffleNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        batch = torch.arange(i * 50, i * 50 + 50) % len(y)
        loss = F.cross_entropy(model(augment(x[batch], g)), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.bn3.weight[::2] = 1e-3 * model.bn3.weight[::2].sign()  # the even channels: near-zero scale
    model.eval()
    (root / "shuffle.onnx").write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    torch.save(model.state_dict(), root / "shuffle.pt")
    return root


@pytest.fixture
def work(tiny, tmp_path, monkeypatch) -> Path:
    for name in ("lenet.onnx", "data.npz", "shuffle.onnx"):
        (tmp_path / name).write_bytes((tiny / name).read_bytes())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tiny / "cache"))  # one latency table per model for the module
    return tmp_path


def interrupt_training_once(monkeypatch, folder: Path, pattern: str) -> None:
    """Ctrl-C at the first training step after a file matching `pattern` exists under `folder` (a checkpoint: the
    run has saved an epoch), as a user's would land there."""
    real = torch.Tensor.backward
    fired = []

    def backward(self, *args, **kwargs):
        if not fired and any(folder.rglob(pattern)):
            fired.append(1)
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)


# ------------------------------------------------------------------------------------------------ output contract


def test_quiet_silences_progress_but_not_warnings(work, qlp):
    """--quiet: no progress, but a warning (here: a budget that leaves the agent no episode of its own) still shows,
    as its one line."""
    run = qlp("search", "lenet.onnx", *SEARCH, "--episodes", "4", "--out", "s", "--quiet", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning:") for line in lines), lines
    assert any("--episodes" in line for line in lines)  # (without --quiet progress shows too: test_cli_contract)


# ------------------------------------------------------------------------------------------------ interrupted runs


@pytest.mark.slow
def test_an_interrupted_run_is_refused_damaged_checkpoints_too_and_force_starts_over(work, qlp, monkeypatch):
    """A search stopped after 10 episodes: the same command without --resume or --force is refused (it would
    overwrite the interrupted run); --resume from a damaged or truncated checkpoint is refused, naming --force, and
    changes nothing; --force starts over (every episode played again) and finishes."""
    from qlp_compress.search import curriculum

    real, played = curriculum._play_episode, []

    def stopped_at_11(*args, **kwargs):
        played.append(1)
        if len(played) == 11:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(curriculum, "_play_episode", stopped_at_11)
    run = qlp("search", "lenet.onnx", *SEARCH, "--out", "s", cwd=work)
    assert run.code == 130 and "--resume" in run.line
    monkeypatch.setattr(curriculum, "_play_episode", real)
    checkpoint = work / "s" / ".work" / "search.ckpt"
    good = checkpoint.read_bytes()

    before = snapshot(work)
    refused = qlp("search", "lenet.onnx", *SEARCH, "--out", "s", cwd=work)
    assert refused.code == 2 and "interrupted run" in refused.line, refused.line
    assert "--resume" in refused.line and "--force" in refused.line
    assert snapshot(work) == before

    for damaged in (b"not a checkpoint at all", good[: len(good) // 2]):
        checkpoint.write_bytes(damaged)
        before = snapshot(work)
        run = qlp("search", "lenet.onnx", *SEARCH, "--out", "s", "--resume", cwd=work)
        assert run.code in (1, 2) and ("damaged" in run.line or "unreadable" in run.line), run.line
        assert "--force" in run.line and str(checkpoint.name) in run.line
        assert snapshot(work) == before

    checkpoint.write_bytes(good)
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(curriculum, "_play_episode", counting)
    run = qlp("search", "lenet.onnx", *SEARCH, "--out", "s", "--force", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    assert len(counted) == 12  # started over: --resume would have played the last 2 only
    assert len(json.loads((work / "s" / "policy.json").read_text())["search"]["rewards"]) == 12
    assert not (work / "s" / ".work").exists()


@pytest.mark.slow
def test_a_damaged_fine_tuning_checkpoint_is_refused_on_resume(work, qlp, monkeypatch):
    args = ("prune", "lenet.onnx", "--data", "data.npz", "--method", "uniform", "--sparsity", "0.5",
            "--finetune-epochs", "3", "--out", "p", "--no-sparse-storage", *DEVICE)
    interrupt_training_once(monkeypatch, work / "p", "finetune.ckpt")
    assert qlp(*args, cwd=work).code == 130
    monkeypatch.undo()
    checkpoint = work / "p" / ".work" / "finetune.ckpt"
    checkpoint.write_bytes(b"\x80\x04 not a checkpoint")
    before = snapshot(work)
    run = qlp(*args, "--resume", cwd=work)
    assert run.code in (1, 2) and ("damaged" in run.line or "unreadable" in run.line), run.line
    assert "--force" in run.line and snapshot(work) == before


@pytest.mark.slow
def test_train_resume_ends_where_an_uninterrupted_run_ends(work, qlp, monkeypatch):
    """train stopped in its second epoch: exit 130 naming --resume; `train --resume` finishes, and its weights are
    those of the same training run without a stop."""
    args = ("train", "lenet5", "--data", "data.npz", "--epochs", "2", *DEVICE)
    whole = qlp(*args, "--out", "whole.onnx", cwd=work)
    assert whole.code == 0, whole.stderr[-2000:]
    before = set(work.iterdir())
    interrupt_training_once(monkeypatch, work, "*stopped.onnx*ckpt")
    stopped = qlp(*args, "--out", "stopped.onnx", cwd=work)
    monkeypatch.undo()
    assert stopped.code == 130 and "--resume" in stopped.line, stopped.stderr[-2000:]
    assert not (work / "stopped.onnx").exists() and set(work.iterdir()) - before  # only the checkpoint
    resumed = qlp(*args, "--out", "stopped.onnx", "--resume", cwd=work)
    assert resumed.code == 0, resumed.stderr[-2000:]
    weights = [export.weight_initializers(onnx.load(str(work / name))) for name in ("whole.onnx", "stopped.onnx")]
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        np.testing.assert_array_equal(w, weights[1][name], err_msg=name)
    assert set(work.iterdir()) - before == {work / "stopped.onnx"}  # the checkpoint is gone


# ------------------------------------------------------------------------------------------------ defaults


def test_every_command_fine_tunes_2_epochs_and_writes_sparse_storage_by_default():
    """The defaults the README states, as each command's options declare them."""
    import typer.main

    group = typer.main.get_command(cli.app)
    for name in ("search", "prune", "compare", "finetune"):
        options = {p.name: p for p in group.commands[name].params}
        assert options["finetune_epochs"].default == 2.0, name
    for name in ("search", "prune", "export"):
        options = {p.name: p for p in group.commands[name].params}
        assert options["sparse_storage"].default is True, name


@pytest.mark.slow
def test_defaults_in_a_run_2_epochs_and_sparse_storage(work, qlp):
    run = qlp("prune", "lenet.onnx", "--data", "data.npz", "--method", "uniform", "--sparsity", "0.5", "--out", "p",
              *DEVICE, cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    report = json.loads((work / "p" / "report.json").read_text())
    assert report["finetune"]["epochs"] == 2 and (work / "p" / "model.sparse.onnx").is_file()
    exported = qlp("export", "lenet.onnx", "--data", "data.npz", "--out", "e.onnx", cwd=work)
    assert exported.code == 0, exported.stderr[-2000:]
    assert (work / "e.sparse.onnx").is_file()  # FILE.sparse.onnx beside FILE.onnx, unless --no-sparse-storage
    onnx.checker.check_model(onnx.load(str(work / "e.sparse.onnx")))


# ------------------------------------------------------------------------------------------------ channel mode

CHANNEL = ("--structure", "channel", "--speedup", "1.05", "--latency-batch", "8", "--threads", "1", "--round-to", "2",
           "--data", "data.npz", *DEVICE)


def test_a_group_the_library_cannot_prune_is_left_whole_and_listed():
    """The channel shuffle's group fails its trial prune: it is listed with the reason and keeps its width; the
    other groups prune and the network runs."""
    model = ShuffleNet().eval()
    x = torch.rand(2, 1, 28, 28)
    space = ChannelSpace(model, x)
    assert [name for name, _ in space.unsafe] == ["conv2"] and "breaks the model" in space.unsafe[0][1]
    assert [g.name for g in space.groups] == ["conv1", "conv3"]
    pruned = space.prune([4, 8])
    assert pruned.conv2.out_channels == 16 and pruned.conv1.out_channels == 4 and pruned.conv3.out_channels == 8
    with torch.no_grad():
        assert pruned(x).shape == (2, 4)


@pytest.mark.slow
def test_bn_slimming_keeps_the_largest_batchnorm_scales_and_lists_the_group_left_whole(tiny, work, qlp, mac_timing):
    """prune --method bn-slimming (no fine-tuning): the removed channels are those of smallest BatchNorm scale
    (conv3's near-zero ones first): the exported layers' rows are the dense rows of the largest scales; the shuffle's
    group is left whole, in the report and on the result line. The table counts MACs (`mac_timing`): timed on a busy
    machine, this tiny model's table once predicted at most 1.15× at the narrowest widths, and the run refused 1.3×."""
    target = list(CHANNEL)
    target[target.index("--speedup") + 1] = "1.3"
    run = qlp("prune", "shuffle.onnx", *target, "--method", "bn-slimming", "--finetune-epochs", "0", "--out", "b",
              cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    report = json.loads((work / "b" / "report.json").read_text())
    assert [g["group"] for g in report["left_whole"]] == ["conv2"] and "left whole: conv2" in run.stdout
    widths = {g["name"]: g["width"] for g in report["groups"]}
    assert widths["conv3"] < 16, widths  # conv3's near-zero scales are the first to go (which ones: below)
    original = torch.load(tiny / "shuffle.pt", weights_only=True)
    convs = {tuple(w.shape): w for w in export.weight_initializers(onnx.load(str(work / "b" / "model.onnx"))).values()
             if w.ndim == 4}
    for conv, bn, shape in (("conv1", "bn1", (widths["conv1"], 1, 3, 3)),
                            ("conv3", "bn3", (widths["conv3"], 16, 3, 3))):
        scales = original[f"{bn}.weight"].abs()
        largest = set(torch.argsort(scales, descending=True)[: shape[0]].tolist())
        assert kept_channels(convs[shape], original[f"{conv}.weight"].numpy()) == largest, conv


def kept_channels(pruned: np.ndarray, dense: np.ndarray) -> set[int]:
    """Which of the dense layer's output channels the pruned layer's rows are: each row is one dense row up to a
    scale (BatchNorm, re-estimated after pruning, may be folded into the convolution when exported)."""
    rows, reference = pruned.reshape(len(pruned), -1), dense.reshape(len(dense), -1)
    cosine = (rows @ reference.T) / np.outer(np.linalg.norm(rows, axis=1), np.linalg.norm(reference, axis=1))
    assert np.all(np.abs(cosine).max(axis=1) > 0.9999), np.abs(cosine).max(axis=1)
    found = np.abs(cosine).argmax(axis=1)
    assert len(set(found.tolist())) == len(rows)
    return set(found.tolist())


@pytest.mark.slow
def test_compare_structure_channel_rows_and_no_distill(work, qlp, mac_timing):
    """compare --structure channel measures one row per method (uniform and bn-slimming here); --no-distill turns
    the KL term off: the same fine-tuning gives other weights, and the report says which was used."""
    run = qlp("compare", "shuffle.onnx", *CHANNEL, "--method", "uniform,bn-slimming", "--finetune-epochs", "0",
              "--out", "c", "--json", cwd=work)
    assert run.code == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)["rows"]
    assert [r["method"] for r in rows] == ["uniform", "bn-slimming"]
    assert rows == json.loads((work / "c" / "compare.json").read_text())["rows"]
    for row in rows:
        assert all(np.isfinite(v) and v > 0 for v in row["measured_speedup"].values()), row
    reports = {}
    for flag in ((), ("--no-distill",)):
        out = "distilled" if not flag else "plain"
        run = qlp("prune", "shuffle.onnx", *CHANNEL, "--method", "uniform", "--finetune-epochs", "0.5", "--out", out,
                  *flag, cwd=work)
        assert run.code == 0, run.stderr[-2000:]
        reports[out] = json.loads((work / out / "report.json").read_text())
    assert reports["distilled"]["finetune"]["distill"] is True and reports["plain"]["finetune"]["distill"] is False
    assert reports["distilled"]["groups"] == reports["plain"]["groups"]  # the same network, trained otherwise
    # the same network and range-test batches, another objective: the KL term is in one loss and not the other (the
    # weights may both end as they started, when no fine-tuned state beats the start on the 60 held-out images)
    losses = [reports[out]["finetune"]["range_test"]["start_loss"] for out in ("distilled", "plain")]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3), losses
