"""The channel and depth search's reward: accuracy of the network with its groups narrowed and its dropped blocks
removed (BatchNorm re-estimated) on the reward images. A network that fails its forward pass scores 0 and is never
exported."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from qlp_compress.base.errors import QLPError
from qlp_compress.data import materialize
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.train.measure import accuracy, recalibrate_batchnorm


@dataclass(frozen=True)
class ChannelRewardSettings:
    """How a pruned network is scored during the search."""

    images: int = 1000  # reward-split images per evaluation (always the same ones)
    bn_recalibrate: int = 256  # reward images used to re-estimate BatchNorm after pruning (0 = off)
    batch_size: int = 500  # images per forward pass
    criterion: str = "l1"  # which channels a group loses: "l1" (filter norm) or "bn" (BatchNorm scale)
    device: str = "cpu"


class ChannelReward:
    """Callable: per-unit sparsities (groups, then blocks) → accuracy of the pruned network on the reward images."""

    def __init__(self, space: ChannelSpace, reward_split: Dataset, settings: ChannelRewardSettings):
        self.space = space
        self.settings = settings
        x, y = materialize(reward_split, limit=settings.images)
        self.x, self.y = x.to(settings.device), y.to(settings.device)
        self.calibration = self.x[: settings.bn_recalibrate]
        self.cache: dict[tuple[int, ...], float] = {}  # the same widths always score the same
        self.evaluations = 0
        self.failures: list[str] = []

    def __call__(self, sparsities: Sequence[float]) -> float:
        self.evaluations += 1
        widths = tuple(self.space.units_from(sparsities))
        if widths not in self.cache:
            self.cache[widths] = self.score(widths)
        return self.cache[widths]

    def score(self, widths: Sequence[int]) -> float:
        try:
            model = self.space.prune(widths, self.settings.criterion).to(self.settings.device)
        except QLPError as e:  # never score a network that does not run: it scores 0
            self.failures.append(str(e))
            return 0.0
        if self.settings.bn_recalibrate:
            recalibrate_batchnorm(model, self.calibration.split(self.settings.batch_size))
        with torch.inference_mode():
            batches = zip(self.x.split(self.settings.batch_size), self.y.split(self.settings.batch_size), strict=True)
            return accuracy(model, batches, self.settings.device)
