"""The reward as a description plus a function: a frozen, picklable `RewardSpec` from which any process (this one, a
spawned child, a Ray worker on another machine) builds the same scorer, and the scorer, which maps an allocation
(per-unit sparsities, network order) to a score.

The spec carries everything the scorer needs, so a worker needs no file and no data set on its disk:
- the network as `torch.save` bytes of the loaded module (normalisation folded in), with their SHA-256, checked
  before the bytes are unpickled, and the SHA-256 of the user's model file it came from;
- the reward images themselves (the first ones of the reward split, in their stored dtype), with the data set's
  name and the seed that cut the split, for the record;
- the reward settings and the structure ("weight": per-layer sparsities of the prunable weights; "channel",
  "depth" or "channel,depth": per-unit sparsities of the channel groups and then the removable blocks).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from qlp_compress.base.errors import QLPError
from qlp_compress.base.names import STRUCTURES, structure_parts
from qlp_compress.data import materialize
from qlp_compress.data.images import TensorImages
from qlp_compress.deploy import engine
from qlp_compress.reward.channels import ChannelReward, ChannelRewardSettings
from qlp_compress.reward.weights import BRIEF_FINETUNE, Reward, RewardSettings


class Scorer(Protocol):
    """An allocation (per-unit sparsities, network order) → its score (accuracy on the reward images)."""

    def __call__(self, sparsities: np.ndarray) -> float: ...


@dataclass(frozen=True)
class RewardSpec:
    """Everything a process needs to build the search's scorer."""

    structure: str  # one of base.names.STRUCTURES
    model: bytes  # torch.save of the loaded network (normalisation folded in)
    model_digest: str  # SHA-256 of `model`, checked before it is unpickled
    source_sha256: str  # SHA-256 of the user's model file (what policy.json records)
    images: torch.Tensor  # the reward images the scorer uses, first ones of the reward split, stored dtype
    labels: torch.Tensor  # their labels (int64)
    settings: RewardSettings | ChannelRewardSettings  # how the scorer measures (its device included)
    data: str = ""  # the data set's name (for the record)
    split_seed: int = 0  # the seed that cut the reward split (for the record)

    @property
    def digest(self) -> str:
        """One SHA-256 over the network, the images, the labels, the settings and the structure."""
        h = hashlib.sha256()
        for part in (self.structure, self.model_digest, repr(self.settings)):
            h.update(part.encode())
        for t in (self.images, self.labels):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def reward_images_needed(structure: str, settings: RewardSettings | ChannelRewardSettings) -> int:
    """How many reward-split images the scorer reads: the measured ones, and for weight mode the brief
    fine-tuning's after them."""
    if structure == "weight":
        return settings.images + settings.finetune_steps * BRIEF_FINETUNE.batch_size
    return settings.images


def make_spec(structure: str, module: nn.Module, reward_split: Dataset,
              settings: RewardSettings | ChannelRewardSettings, source_sha256: str, data: str = "",
              split_seed: int = 0) -> RewardSpec:
    """The spec of the scorer that `structure`'s reward builds from `module` and `reward_split` in this process."""
    if structure not in STRUCTURES:
        raise QLPError(f"unknown structure {structure!r}; use one of {', '.join(STRUCTURES)}")
    n = min(len(reward_split), reward_images_needed(structure, settings))
    if isinstance(reward_split, TensorImages):  # the stored dtype (uint8 images travel at a quarter of the size)
        x, y = reward_split.x[:n].clone(), reward_split.y[:n].clone()
    else:
        x, y = materialize(reward_split, limit=n)
    model, model_digest = to_bytes(module)
    return RewardSpec(structure, model, model_digest, source_sha256, x, y.long(), settings, data, split_seed)


def to_bytes(module: nn.Module) -> tuple[bytes, str]:
    """A network as torch.save bytes, with their SHA-256: how it travels to another process."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    model = buffer.getvalue()
    return model, hashlib.sha256(model).hexdigest()


def from_bytes(model: bytes, model_digest: str, what: str = "the reward description's network") -> nn.Module:
    """The network `to_bytes` gave, after its bytes are checked against their digest."""
    if hashlib.sha256(model).hexdigest() != model_digest:
        raise QLPError(f"{what} does not match its SHA-256; it was damaged in transit")
    return torch.load(io.BytesIO(model), weights_only=False, map_location="cpu")  # bytes this run wrote


def load_network(spec: RewardSpec) -> nn.Module:
    """The spec's network, after its bytes are checked against their digest."""
    return from_bytes(spec.model, spec.model_digest)


def build_scorer(spec: RewardSpec, device: str | None = None) -> Reward | ChannelReward:
    """The scorer the spec describes (on `device` when given, else the spec's own)."""
    settings = spec.settings if device is None else replace(spec.settings, device=device)
    module = load_network(spec)
    split = TensorImages(spec.images, spec.labels)
    if spec.structure == "weight":
        return Reward(module, split, settings)
    from qlp_compress.pruning.channel_groups import ChannelSpace

    x, _ = materialize(split, limit=2)
    narrows, drops = structure_parts(spec.structure)
    return ChannelReward(ChannelSpace(module, x, depth=drops, width=narrows), split, settings)


def score_all(spec: RewardSpec, allocations: list[np.ndarray], threads: int = 1) -> list[float]:
    """Build the spec's scorer in this process, with `threads` torch and onnxruntime threads, and score each
    allocation (what a spawned process runs to show that any process scores alike)."""
    engine.use_threads(threads)
    scorer = build_scorer(spec)
    return [float(scorer(np.asarray(a, dtype=np.float64))) for a in allocations]
