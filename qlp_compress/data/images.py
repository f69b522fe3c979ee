"""Images in memory, the data set record, and the three splits every command uses.

Every reader gives float32 images in [0, 1], NCHW, and int64 labels. Small data sets (Fashion-MNIST,
CIFAR-10, .npz) are held in memory as uint8 and batched by slicing, which is far faster than a
DataLoader over single items; image folders go through a DataLoader with torchvision transforms.

Splits: the training split is cut, by a fixed seed, into a *reward* part (the search's reward, default
5,000 images) and a *fine-tune* part (the rest). The test split only reports; it never steers a choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qlp_compress.base.errors import QLPError, UsageError


@dataclass(frozen=True)
class ImageData:
    """A classification data set: a training and a test split and what a model needs to fit it."""

    name: str  # "fashion-mnist", "cifar10", or the path it was read from
    train: Dataset  # items are (float32 CHW tensor in [0, 1], int label)
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one image


@dataclass(frozen=True)
class Splits:
    """The three disjoint splits every command uses."""

    reward: Dataset  # held-out part of train: the search's reward
    finetune: Dataset  # the rest of train: fine-tuning and training
    test: Dataset  # reporting only


class TensorImages(Dataset):
    """Images in memory, uint8 (0..255) or float32 in [0, 1], shape (N, C, H, W), with int labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.ndim != 4:
            raise QLPError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}; reshape them to NCHW")
        if len(x) != len(y):
            raise QLPError(f"{len(x)} images but {len(y)} labels; give one label per image")
        self.x = x
        self.y = y.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return to_float(self.x[i]), int(self.y[i])

    def subset(self, indices: torch.Tensor) -> TensorImages:
        return TensorImages(self.x[indices], self.y[indices])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 → float32 0..1; float input is passed through as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()




DEFAULT_REWARD_SIZE = 5000


def make_splits(data: ImageData, reward_size: int | None = None, seed: int = 0) -> Splits:
    """Cut train into reward (`reward_size` images, fixed by `seed`) and fine-tune (the rest).

    The default reward size is 5,000 images, or a tenth of the training split when that is smaller."""
    n = len(data.train)
    if n < 2:
        raise QLPError(f"{data.name} has {n} training image(s); at least 2 are needed (for the reward and fine-tune "
                       "splits): give a larger data set")
    if reward_size is None:
        reward_size = min(DEFAULT_REWARD_SIZE, max(1, n // 10))
    if not 0 < reward_size < n:
        raise UsageError(f"--reward-size must be between 1 and {n - 1} for {data.name}, got {reward_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    reward_idx, finetune_idx = order[:reward_size], order[reward_size:]
    if isinstance(data.train, TensorImages):
        return Splits(data.train.subset(reward_idx), data.train.subset(finetune_idx), data.test)
    return Splits(Subset(data.train, reward_idx.tolist()), Subset(data.train, finetune_idx.tolist()), data.test)


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    limit: int | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float32 images in [0, 1], int64 labels), at most `limit` images."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if isinstance(dataset, TensorImages):
        order = torch.randperm(len(dataset), generator=generator)[:n] if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield to_float(dataset.x[idx]), dataset.y[idx]
        return
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, list(range(limit)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                        num_workers=num_workers)
    yield from loader


@dataclass(frozen=True)
class Share:
    """One part's share of a batch: its images and where they sit in the whole batch."""

    x: torch.Tensor  # float32 images in [0, 1]
    y: torch.Tensor  # int64 labels
    rows: slice  # these images' rows in the whole batch
    batch: int  # images in the whole batch
    weight: float  # len(x) / batch: the share's part of the batch's mean loss (0 for a stand-in image)


def iterate_shares(dataset: Dataset, order: torch.Tensor, batch_size: int, parts: int = 1,
                   part: int = 0) -> Iterator[Share]:
    """Batches of `batch_size` images taken in `order`, each cut into `parts` near-equal contiguous slices
    (torch.tensor_split): yield slice `part` of each, loading only its images. With parts=1, the whole batches.

    This is how the ranks of a distributed fine-tuning share one process's batches: together they see exactly the
    batches one process sees. A share that would be empty (a last batch smaller than `parts`) is the batch's first
    image with weight 0, so that every rank still takes the step."""
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        bounds = [len(s) for s in chunk.tensor_split(parts)]
        first = sum(bounds[:part])
        rows, weight = slice(first, first + bounds[part]), bounds[part] / len(chunk)
        if bounds[part] == 0:
            rows = slice(0, 1)
        idx = chunk[rows]
        if isinstance(dataset, TensorImages):
            x, y = to_float(dataset.x[idx]), dataset.y[idx]
        else:
            x, y = next(iter(DataLoader(Subset(dataset, idx.tolist()), batch_size=len(idx))))
        yield Share(x, y, rows, len(chunk), weight)


def materialize(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split (or its first `limit` images) as two tensors; used for the reward split."""
    xs, ys = zip(*iterate_batches(dataset, 512, limit=limit), strict=True)
    return torch.cat(xs), torch.cat(ys)
