"""Fine-tuning on several processes (train.distributed): 2 gloo ranks on CPU against one process as the reference,
masks on both ranks and in the exported file, a rank with another model or one that dies ends the job in one line,
and pruning refuses a DDP-wrapped model."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import onnx
import pytest
import torch
import torch.distributed as dist
from conftest import wait_for
from ddp_ranks import frozen_bn_model, other_width_on_rank_1, rank_1_dies, stop_in_the_second_epoch, tiny_data
from torch import nn

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.data import iterate_shares
from qlp_compress.deploy import export
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.masks import MagnitudePruner, apply_masks, find_prunable_layers
from qlp_compress.train import distributed
from qlp_compress.train.finetune import TrainSettings, augment, train

# 320 images at a global batch of 16: one epoch is 20 steps, augmented, at a fixed learning rate; the single process
# is the reference the 2 ranks must meet
SETTINGS = TrainSettings(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, warmup_epochs=0.0,
                         augment=True, seed=3)


def pruned(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    masks = MagnitudePruner(model).masks({"0": 0.5, "4": 0.7, "7": 0.6})
    apply_masks(model, masks)
    return model, masks


@pytest.mark.slow  # several processes (Ray workers / gloo ranks / a spawned scorer)
def test_two_gloo_ranks_train_what_one_process_trains_and_keep_the_masks_into_the_onnx_file():
    """20 steps with masks and a distillation teacher (each rank runs it on its own images): the same weights as one
    process within 1e-5, the same model on both ranks, and the masks' zeros in the exported file."""
    model, masks = pruned(frozen_bn_model())
    data, teacher = tiny_data(), frozen_bn_model(width=5).eval()
    reference = copy.deepcopy(model)
    train(reference, data, SETTINGS, masks=masks, teacher=teacher)

    results = distributed.launch(2, distributed._rank_main,
                                 (model, data, replace(SETTINGS, nproc=2), None, {"masks": masks, "teacher": teacher}))
    assert results[0]["digest"] == results[1]["digest"]  # both ranks hold the same model, bit for bit
    assert results[0]["masks"] == results[1]["masks"]
    assert len(results[0]["history"]) == 1
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(results[0]["state"])
    moved = 0.0
    for (name, p), ref, start in zip(tuned.state_dict().items(), reference.state_dict().values(),
                                     model.state_dict().values(), strict=True):
        assert torch.allclose(p, ref, rtol=0, atol=1e-5), name
        moved = max(moved, float((ref - start).abs().max()))
    assert moved > 1e-2  # the 20 steps did train

    proto = onnx.load_from_string(export.to_onnx_bytes(tuned.eval(), (1, 8, 8)))
    matched = export.match_layers(export.weight_initializers(proto), {k: v.numpy() for k, v in masks.items()})
    assert set(matched) == set(masks)  # every layer's zeros are exactly the mask's, read back from the file


@pytest.mark.slow
def test_a_resumed_two_rank_run_ends_where_one_uninterrupted_process_ends(tmp_path):
    """Rank 0 writes the checkpoint; on --resume it reads it and every rank starts from it (the ranks' models are
    the same bit for bit, and the single process's, run without a break, within 1e-5)."""
    model, masks = pruned(frozen_bn_model())
    data, settings, checkpoint = tiny_data(160), replace(SETTINGS, epochs=2), tmp_path / "run.ckpt"
    reference = copy.deepcopy(model)
    train(reference, data, settings, masks=masks)

    def job(resume: bool, progress) -> tuple:
        kwargs = {"masks": masks, "checkpoint": checkpoint, "resume": resume}
        return model, data, replace(settings, nproc=2), progress, kwargs

    with pytest.raises(RuntimeError, match="rank 0: RuntimeError: stopped in the second epoch"):
        distributed.launch(2, distributed._rank_main, job(False, stop_in_the_second_epoch))
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 0
    results = distributed.launch(2, distributed._rank_main, job(True, None))
    assert results[0]["digest"] == results[1]["digest"]
    assert [h["epoch"] for h in results[0]["history"]] == [1, 2]
    for name, p in reference.state_dict().items():
        assert torch.allclose(results[0]["state"][name], p, rtol=0, atol=1e-5), name


@pytest.mark.slow  # two gloo ranks each
@pytest.mark.parametrize(("fn", "expected"), [
    (other_width_on_rank_1, "rank 1 holds a model of other shapes"),
    pytest.param(rank_1_dies, "rank 1 died (SIGKILL)", marks=pytest.mark.slow)])
def test_a_rank_with_another_model_or_a_dead_rank_ends_the_job_fast_in_one_line(fn, expected):
    started = time.monotonic()
    with pytest.raises(QLPError) as caught:
        distributed.launch(2, fn, (frozen_bn_model(), tiny_data(64), replace(SETTINGS, nproc=2), None, {}))
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message


def test_the_ranks_shares_are_one_process_batches_and_augment_as_it_does():
    """iterate_shares cuts each batch into contiguous slices that together are the batch (a rank whose slice would
    be empty gets a stand-in image of weight 0); augmenting a slice with the batch's draws gives the batch's rows."""
    data, order = tiny_data(35), torch.randperm(35, generator=torch.Generator().manual_seed(0))
    whole = list(iterate_shares(data, order, 16))
    parts = [list(iterate_shares(data, order, 16, 3, p)) for p in range(3)]
    assert [len(s.x) for s in whole] == [16, 16, 3]
    for k, batch in enumerate(whole):
        shares = [parts[p][k] for p in range(3) if parts[p][k].weight > 0]
        assert torch.equal(torch.cat([s.x for s in shares]), batch.x) and sum(s.weight for s in shares) == 1
        for s in shares:
            a = augment(s.x, torch.Generator().manual_seed(k), s.rows, s.batch)
            assert torch.equal(a, augment(batch.x, torch.Generator().manual_seed(k))[s.rows])
    last = list(iterate_shares(data, order[:33], 16, 3, 2))[-1]  # a last batch of 1 image for 3 parts
    assert last.weight == 0 and len(last.x) == 1


def test_pruning_refuses_a_model_already_wrapped_in_ddp(tmp_path):
    """The order prune → wrap cannot be got wrong: every pruning entry refuses a DDP module (a 1-rank gloo group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(frozen_bn_model())
        for prune in (find_prunable_layers, MagnitudePruner, lambda m: apply_masks(m, {}),
                      lambda m: ChannelSpace(m, torch.rand(1, 1, 8, 8))):
            with pytest.raises(QLPError, match="prune it before wrapping"):
                prune(wrapped)
        find_prunable_layers(wrapped.module)  # the model itself, before it is wrapped, is accepted
    finally:
        dist.destroy_process_group()


def test_bad_process_counts_are_refused_in_one_line(monkeypatch):
    for bad in (0, -2):
        with pytest.raises(UsageError, match="--nproc must be a whole number"):
            distributed.check_nproc(bad, "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="inside a torchrun job"):
        distributed.check_nproc(2, "cpu")


def test_a_bad_nproc_is_one_line_before_anything_is_loaded(qlp, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not read: --nproc is checked first")
    run = qlp("finetune", tmp_path / "m.onnx", "--out", tmp_path / "f.onnx", "--nproc", "0", cwd=tmp_path)
    assert run.code == 2 and "error: --nproc must be a whole number" in run.line


@pytest.mark.slow
def test_finetune_and_train_on_two_processes_end_to_end(qlp, tiny_task, tmp_path):
    """The commands on 2 local processes: fine-tuning guarded (the range test's learning rate and the held-out checks
    taken on every rank alike), the zeros verified in the written file, one result printed; train the same."""
    data = ("--data", tiny_task / "data.npz", "--device", "cpu")
    assert qlp("prune", tiny_task / "lenet.onnx", "--sparsity", "0.7", "--finetune-epochs", "0", "--out",
               tmp_path / "p", *data, cwd=tmp_path).code == 0
    run = qlp("finetune", tmp_path / "p" / "model.onnx", "--out", tmp_path / "f.onnx", "--finetune-epochs", "0.3",
              "--nproc", "2", *data, "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["global_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert not list(tmp_path.glob(".f.onnx*"))  # the checkpoint is gone once the file is written
    run = qlp("train", "lenet5", "--out", tmp_path / "t.onnx", "--epochs", "0.2", "--nproc", "2", *data, "--json",
              cwd=tmp_path)
    assert run.code == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["test_accuracy"] > 0.25  # above chance on 4 classes


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_keeps_the_checkpoint(tiny_task, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once rank 0 has written its first
    checkpoint: exit 130 with one line, every process of the run gone, the checkpoint kept for --resume."""
    out, checkpoint = tmp_path / "t.onnx", tmp_path / ".t.onnx.qlp-ckpt"
    process = subprocess.Popen([sys.executable, "-m", "qlp_compress", "train", "lenet5", "--out", str(out), "--epochs",
                                "50", "--nproc", "2", "--data", str(tiny_task / "data.npz"), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(checkpoint, process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("train lenet5: step")]
    assert len(lines) == 1 and lines[0].startswith("error: train lenet5 interrupted; rerun the same command with "
                                                   "--resume"), stderr[-2000:]
    assert checkpoint.exists() and not out.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the ranks exit with the launcher (at most its shutdown wait)
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a process of the run is still alive")
