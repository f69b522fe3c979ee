"""The model zoo: shapes, the fixed normalisation, the published parameter counts, and ONNX export checked
against PyTorch through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qlp_compress.base.errors import UsageError
from qlp_compress.deploy.engine import open_session
from qlp_compress.deploy.export import INPUT_NAME, OUTPUT_NAME, to_onnx_bytes
from qlp_compress.train.zoo import ARCHS, CifarResNet, Normalize, build_model, stats_for

# Smallest convenient image side per architecture (the torchvision ones downsample 32×)
SIDE = {"lenet5": 28, "resnet20": 16, "resnet32": 16, "resnet56": 16, "resnet18": 32, "resnet50": 32,
        "mobilenet_v2": 32}


def test_every_arch_has_a_test_size() -> None:
    assert set(SIDE) == set(ARCHS)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_arch_builds_and_gives_logits(arch: str, channels: int) -> None:
    torch.manual_seed(0)
    mean, std = (0.3,) * channels, (0.2,) * channels
    model = build_model(arch, channels, 7, mean, std).eval()
    assert isinstance(model[0], Normalize)
    assert first_conv(model).in_channels == channels
    x = torch.rand(2, channels, SIDE[arch], SIDE[arch])
    with torch.no_grad():
        logits = model(x)
    assert tuple(logits.shape) == (2, 7)
    assert torch.isfinite(logits).all()


def test_normalize_is_x_minus_mean_over_std() -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    model = build_model("resnet20", 3, 10, mean, std)
    x = torch.rand(4, 3, 5, 6)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    assert torch.allclose(model[0](x), expected, atol=1e-6)
    # fixed constants: buffers, never parameters that training or pruning could touch
    assert not list(model[0].parameters())
    assert {name for name, _ in model[0].named_buffers()} == {"mean", "std"}
    # the rest of the model sees the normalised image
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model[1](model[0](x)))


def test_stats_for_known_and_unknown_data() -> None:
    assert stats_for("cifar10", 3) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert stats_for("fashion-mnist", 1) == ((0.2860,), (0.3530,))
    assert stats_for("/some/file.npz", 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert stats_for("/some/file.npz", 2) == ((0.5, 0.5), (0.5, 0.5))


def test_build_model_refuses_bad_arguments() -> None:
    with pytest.raises(UsageError, match="unknown architecture"):
        build_model("vgg99", 3, 10, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UsageError, match="one per input channel"):
        build_model("lenet5", 3, 10, (0.5,), (0.5,))
    with pytest.raises(UsageError, match="6n\\+2"):
        CifarResNet(21)


# He et al. 2016 ("Deep Residual Learning for Image Recognition"), Table 6: CIFAR-10 ResNets with option-A
# (parameter-free) shortcuts.
HE_ET_AL_PARAMS = {20: 0.27e6, 32: 0.46e6, 56: 0.85e6}


@pytest.mark.parametrize("depth", sorted(HE_ET_AL_PARAMS))
def test_cifar_resnet_parameter_count_matches_paper(depth: int) -> None:
    model = build_model(f"resnet{depth}", 3, 10, (0.5,) * 3, (0.5,) * 3)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / HE_ET_AL_PARAMS[depth] - 1) < 0.03
    # 6n+2 weighted layers: 6n+1 convolutions and one fully connected layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == depth - 1 and len(linears) == 1


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so that BN folding in the export is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize(("arch", "shape"), [("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def test_onnx_export_matches_pytorch(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(1)
    mean, std = stats_for("fashion-mnist" if shape[0] == 1 else "cifar10", shape[0])
    model = build_model(arch, shape[0], 10, mean, std)
    randomise_batchnorm(model)
    model.eval()
    session = open_session(to_onnx_bytes(model, shape))
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME] == ["input"]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME] == ["logits"]
    declared = session.get_inputs()[0].shape
    assert not isinstance(declared[0], int)  # a symbolic (dynamic) batch axis
    assert declared[1:] == list(shape)
    for batch in (1, 5):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-4
        assert np.array_equal(got.argmax(1), expected.argmax(1))
