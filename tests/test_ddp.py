"""Fine-tuning on several processes (train.distributed): 2 gloo ranks on CPU against one process as the reference,
masks on both ranks and in the exported file, a rank with another model or one that dies ends the job in one line,
and pruning refuses a DDP-wrapped model."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import onnx
import pytest
import torch
import torch.distributed as dist
from ddp_ranks import frozen_bn_model, other_width_on_rank_1, rank_1_dies, tiny_data
from torch import nn

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.deploy import export
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.masks import MagnitudePruner, apply_masks, find_prunable_layers
from qlp_compress.train import distributed
from qlp_compress.train.finetune import TrainSettings, train

# 320 images at a global batch of 16: one epoch is 20 steps; no augmentation and a fixed learning rate, so that the
# single process is a reference the 2 ranks must meet
SETTINGS = TrainSettings(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, warmup_epochs=0.0,
                         augment=False, seed=3)


def pruned(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    masks = MagnitudePruner(model).masks({"0": 0.5, "4": 0.7, "7": 0.6})
    apply_masks(model, masks)
    return model, masks


def test_two_gloo_ranks_train_what_one_process_trains_and_keep_the_masks_into_the_onnx_file():
    model, masks = pruned(frozen_bn_model())
    data = tiny_data()
    reference = copy.deepcopy(model)
    train(reference, data, SETTINGS, masks=masks)

    results = distributed.launch(2, distributed._rank_main,
                                 (model, data, replace(SETTINGS, nproc=2), None, {"masks": masks}))
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


@pytest.mark.parametrize(("fn", "expected"), [(other_width_on_rank_1, "rank 1 holds a model of other shapes"),
                                              (rank_1_dies, "rank 1 died (SIGKILL)")])
def test_a_rank_with_another_model_or_a_dead_rank_ends_the_job_fast_in_one_line(fn, expected):
    started = time.monotonic()
    with pytest.raises(QLPError) as caught:
        distributed.launch(2, fn, (frozen_bn_model(), tiny_data(64), replace(SETTINGS, nproc=2), None, {}))
    assert time.monotonic() - started < 60
    message = str(caught.value)
    assert expected in message and "\n" not in message


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
