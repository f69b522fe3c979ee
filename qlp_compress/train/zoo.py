"""Model definitions. Every model starts with its input normalisation as a fixed op, so that an exported
ONNX graph takes raw pixels in [0, 1] and is self-contained for deployment."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qlp_compress.base.errors import UsageError

# Per-channel mean and std of the training images, used for a model's fixed normalisation.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Normalize(nn.Module):
    """(x − mean) / std with fixed per-channel constants (buffers, never trained or pruned)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; any input of at least 28×28."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """CIFAR ResNet block with the parameter-free option-A shortcut (He et al. 2016, section 4.2)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = (planes - in_planes) // 2

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.downsample else x
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3 stages of n blocks with 16, 32, 64 channels."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise UsageError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainVGG(nn.Module):
    """VGG-style without BatchNorm: two stages of two 3×3 convolutions with ReLU and max pooling, then one Linear
    on the 4×4 feature map (for 28×28 and 32×32 images). Its logits are not normalised by anything (issue 25's
    first unseen model)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # 28×28 or 32×32 images: 7×7 or 8×8 → 4×4 (an exportable stand-in for adaptive pooling)
        self.classifier = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                                        nn.Linear(2 * w * 16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class SeparableNet(nn.Module):
    """MobileNet-style: depthwise-separable convolutions with BatchNorm and ReLU6, a residual around one block and
    a concat of two branches (issue 25's second unseen model)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width

        def separable(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                                 nn.ReLU6(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.block = separable(w, w)  # residual
        self.left = nn.Sequential(nn.Conv2d(w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.right = nn.Sequential(separable(w, w), nn.ReLU6())
        self.down = nn.Sequential(separable(2 * w, 3 * w, 2), nn.ReLU6())
        self.fc = nn.Linear(3 * w, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu6(x + self.block(x))
        x = self.down(torch.cat([self.left(x), self.right(x)], 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LinearHead(nn.Module):
    """Two convolutions with BatchNorm, then several Linear layers with dropout (issue 25's third kind of model)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.MaxPool2d(2, ceil_mode=True),  # 28×28 or 32×32 images → 4×4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * 16, 96), nn.ReLU(), nn.Dropout(0.2), nn.Linear(96, 48), nn.ReLU(),
            nn.Linear(48, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


# Models unlike ResNet-20, for the tests and the benchmark of channel mode and fine-tuning (issue 25); not choices of
# `train`.
UNLIKE_RESNET: dict[str, Callable[[int, int], nn.Module]] = {
    "plain_vgg": PlainVGG,
    "separable": SeparableNet,
    "linear_head": LinearHead,
}


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(in_channels: int, num_classes: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:  # replace the stem so grey or multispectral images fit
            first = model.conv1 if hasattr(model, "conv1") else model.features[0][0]
            new = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                            bias=False)
            if hasattr(model, "conv1"):
                model.conv1 = new
            else:
                model.features[0][0] = new
        return model

    return build


ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "lenet5": LeNet5,
    "resnet20": lambda c, k: CifarResNet(20, c, k),
    "resnet32": lambda c, k: CifarResNet(32, c, k),
    "resnet56": lambda c, k: CifarResNet(56, c, k),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v2": _torchvision("mobilenet_v2"),
}


def build_model(arch: str, in_channels: int, num_classes: int, mean: Sequence[float],
                std: Sequence[float]) -> nn.Sequential:
    """`arch` from ARCHS (or UNLIKE_RESNET), preceded by a fixed Normalize(mean, std)."""
    if arch in UNLIKE_RESNET:
        return nn.Sequential(Normalize(mean, std), UNLIKE_RESNET[arch](in_channels, num_classes))
    if arch not in ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise UsageError(f"--mean/--std need {in_channels} values (one per input channel)")
    return nn.Sequential(Normalize(mean, std), ARCHS[arch](in_channels, num_classes))


def stats_for(data_name: str, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation constants of a known data set, else ImageNet's (or 0.5/0.5 for other channel counts)."""
    if data_name in DATASET_STATS:
        return DATASET_STATS[data_name]
    if in_channels == 3:
        return DATASET_STATS["imagenet"]
    return (0.5,) * in_channels, (0.5,) * in_channels
