"""The training loop: masks held at exactly zero, exact resume from a checkpoint, augmentation, BN recalibration."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlp_compress.base.errors import UsageError
from qlp_compress.data import TensorImages
from qlp_compress.pruning.masks import MagnitudePruner, apply_masks
from qlp_compress.train.finetune import TrainSettings, augment, train
from qlp_compress.train.measure import accuracy, recalibrate_batchnorm

SETTINGS = TrainSettings(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-2, warmup_epochs=0.5,
                         augment=True, seed=7)


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 3))


def tiny_data(n: int = 64, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    x[:, :, :, : 3] += (90 * y).to(torch.uint8).view(n, 1, 1, 1)  # learnable: brightness of the left columns
    return TensorImages(x, y)


def pruned(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = tiny_model(seed)
    pruner = MagnitudePruner(model)
    masks = pruner.masks({"0": 0.5, "4": 0.7, "7": 0.6})
    apply_masks(model, masks)
    return model, masks


def test_masked_weights_stay_exactly_zero() -> None:
    model, masks = pruned()
    before = copy.deepcopy(model)
    history = train(model, tiny_data(), SETTINGS, masks=masks)
    assert [h["epoch"] for h in history] == [1, 2]
    modules, old = dict(model.named_modules()), dict(before.named_modules())
    for name, keep in masks.items():
        w, w0 = modules[name].weight.detach(), old[name].weight.detach()
        assert (w[~keep] == 0).all(), name  # exactly zero, despite momentum and weight decay
        assert (w[keep] != w0[keep]).all(), name  # every kept weight was trained
    assert not model.training  # train() leaves the model in eval mode


def test_without_masks_the_same_weights_regrow() -> None:
    """The reference for the test above: the same run without masks moves the pruned weights."""
    model, masks = pruned()
    train(model, tiny_data(), SETTINGS)
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        # some stay at zero where every input to them is zero (dead ReLU units), most move
        assert (modules[name].weight.detach()[~keep] != 0).float().mean() > 0.5, name


def test_training_learns_the_tiny_task() -> None:
    model = tiny_model()
    data = tiny_data(96)
    before = accuracy(model, [(data.x.float() / 255, data.y)])
    train(model, data, replace(SETTINGS, epochs=6, augment=False, lr=0.1))
    after = accuracy(model, [(data.x.float() / 255, data.y)])
    assert after > max(before, 0.6)


def interrupt_after_first_epoch(record: dict) -> None:
    if record["epoch"] == 2:
        raise KeyboardInterrupt


def test_resume_equals_uninterrupted_run(tmp_path) -> None:
    data = tiny_data()
    full, masks = pruned()
    full_history = train(full, data, SETTINGS, masks=masks, checkpoint=tmp_path / "full.ckpt")

    first, masks = pruned()
    with pytest.raises(KeyboardInterrupt):
        train(first, data, SETTINGS, masks=masks, checkpoint=tmp_path / "cut.ckpt",
              on_step=interrupt_after_first_epoch)
    assert (tmp_path / "cut.ckpt").exists()
    resumed, masks = pruned()  # a fresh process would start from the same pruned model
    steps: list[dict] = []
    resumed_history = train(resumed, data, SETTINGS, masks=masks, checkpoint=tmp_path / "cut.ckpt", resume=True,
                            on_step=steps.append)
    assert [s["epoch"] for s in steps] == [2] * 4  # only the second epoch ran again
    def without_time(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert without_time(resumed_history) == without_time(full_history)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise equal, BatchNorm statistics included


def test_resume_with_other_settings_is_refused(tmp_path) -> None:
    model, masks = pruned()
    data = tiny_data(32)
    settings = replace(SETTINGS, epochs=1)
    train(model, data, settings, masks=masks, checkpoint=tmp_path / "c.ckpt")
    with pytest.raises(UsageError, match="other settings"):
        train(model, data, replace(settings, lr=0.2), masks=masks, checkpoint=tmp_path / "c.ckpt", resume=True)


def brute_force_augmentations(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every image augment() may produce: flipped or not, then any crop of the zero-padded image."""
    _, h, w = image.shape
    out = []
    for flipped in (image, image.flip(2)):
        padded = F.pad(flipped, (pad, pad, pad, pad))
        out += [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return out


def test_augment_shape_determinism_and_content() -> None:
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    for image, out in zip(x, a, strict=True):
        assert any(torch.equal(out, candidate) for candidate in brute_force_augmentations(image, 16 // 8))


def test_recalibrate_batchnorm_cumulative_average_and_momentum_restored() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3))
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 5, 5, generator=g) * 2 + torch.tensor([1.0, -3.0, 0.5]).view(1, 3, 1, 1)
               for _ in range(4)]
    bn = model[0]
    recalibrate_batchnorm(model, batches)
    # the reference: the plain average over the batches of each batch's mean and unbiased variance
    expected_mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    expected_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 4
    assert not torch.allclose(model[2].running_mean, torch.zeros(4))  # every BN layer is re-estimated
    assert bn.momentum == 0.1 and model[2].momentum == 0.3  # each layer's own momentum is back
    assert not model.training


def test_recalibrate_batchnorm_without_batchnorm_is_a_no_op() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    state = copy.deepcopy(model.state_dict())
    recalibrate_batchnorm(model, [torch.rand(2, 1, 5, 5)])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
