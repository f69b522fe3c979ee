"""Data sets and their three splits.

Every reader gives float32 images in [0, 1], NCHW, and int64 labels. Small data sets (Fashion-MNIST,
CIFAR-10, .npz) are held in memory as uint8 and batched by slicing, which is far faster than a
DataLoader over single items; image folders go through a DataLoader with torchvision transforms.

Splits: the training split is cut, by a fixed seed, into a *reward* part (the search's reward, default
5,000 images) and a *fine-tune* part (the rest). The test split only reports; it never steers a choice.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qlp_compress.errors import QLPError, UsageError
from qlp_compress.io import check_size

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
HOW_TO_GET_FASHION_MNIST = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
    "idx files (train-images-idx3-ubyte.gz, ...) in a folder and pass --data-dir FOLDER or set QLP_DATA_DIR"
)


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


# ---------------------------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic number")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise QLPError(f"{path} is not a valid idx file ({e}); replace it with an intact copy") from e


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in ("", "fashion-mnist", "FashionMNIST/raw"):
        for suffix in ("", ".gz"):
            p = folder / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def fashion_mnist_candidates(data_dir: Path | None) -> list[Path]:
    """Folders searched for Fashion-MNIST, in order: --data-dir, $QLP_DATA_DIR, user cache, Debian."""
    folders = [data_dir] if data_dir else []
    if os.environ.get("QLP_DATA_DIR"):
        folders.append(Path(os.environ["QLP_DATA_DIR"]))
    folders += [cache_dir(), DEBIAN_FASHION_MNIST]
    return folders


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlp-compress"


def load_fashion_mnist(data_dir: Path | None = None, download: bool = True) -> ImageData:
    """Fashion-MNIST from the first folder that has all four idx files, else torchvision's download.

    A folder the user gave (`data_dir`) must hold the files: falling back to another copy would hide the mistake."""
    if data_dir is not None and data_dir.is_dir():
        missing = [stem for stem in FASHION_MNIST_FILES.values() if _find_idx(data_dir, stem) is None]
        if missing:
            raise QLPError(f"Fashion-MNIST not found in --data-dir {data_dir} (missing {', '.join(missing)}, raw "
                           f"or .gz): {HOW_TO_GET_FASHION_MNIST}")
    for folder in fashion_mnist_candidates(data_dir):
        paths = {k: _find_idx(folder, stem) for k, stem in FASHION_MNIST_FILES.items()}
        if all(paths.values()):
            arrays = {k: read_idx(p) for k, p in paths.items()}
            return _fashion_mnist_from_arrays(arrays)
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            root = cache_dir()
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
            return load_fashion_mnist(root, download=False)
        except Exception:  # no internet, or a broken mirror: fall through to the one-line advice
            pass
    searched = ", ".join(str(f) for f in fashion_mnist_candidates(data_dir))
    tried = "; download failed" if download else ""
    raise QLPError(f"Fashion-MNIST not found (looked in {searched}{tried}): {HOW_TO_GET_FASHION_MNIST}")


def _fashion_mnist_from_arrays(a: dict[str, np.ndarray]) -> ImageData:
    def images(x):
        return torch.from_numpy(x.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8

    def labels(y):
        return torch.from_numpy(y.astype(np.int64))

    train = TensorImages(images(a["train_x"]), labels(a["train_y"]))
    test = TensorImages(images(a["test_x"]), labels(a["test_y"]))
    return ImageData("fashion-mnist", train, test, 10, tuple(train.x.shape[1:]))


def load_cifar10(data_dir: Path | None = None, download: bool = True) -> ImageData:
    """CIFAR-10 from the standard python pickles (`cifar-10-batches-py`), else torchvision's download."""
    roots = [p for p in (data_dir, Path(os.environ["QLP_DATA_DIR"]) if os.environ.get("QLP_DATA_DIR") else None,
                         cache_dir()) if p]
    for root in roots:
        folder = root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"
        if (folder / "test_batch").is_file():
            return _read_cifar10_folder(folder)
        if root == data_dir and data_dir.is_dir():  # a folder the user gave must hold the data
            raise QLPError(f"CIFAR-10 not found in --data-dir {data_dir}: unpack cifar-10-python.tar.gz there, so "
                           "that it holds cifar-10-batches-py/ (data_batch_1..5, test_batch)")
    if download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(cache_dir()), train=True, download=True)
            return _read_cifar10_folder(cache_dir() / "cifar-10-batches-py")
        except Exception:
            pass
    raise QLPError(
        "CIFAR-10 not found: download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
        "unpack it and pass --data-dir to the folder holding cifar-10-batches-py"
    )


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
        return x, y
    except Exception as e:
        raise QLPError(f"{path} is not a CIFAR-10 batch ({e}); re-extract cifar-10-python.tar.gz") from e


def _read_cifar10_folder(folder: Path) -> ImageData:
    parts = [_read_cifar10_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_cifar10_batch(folder / "test_batch")
    train = TensorImages(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                         torch.from_numpy(np.concatenate([p[1] for p in parts])))
    test = TensorImages(torch.from_numpy(x_test), torch.from_numpy(y_test))
    return ImageData("cifar10", train, test, 10, (3, 32, 32))


def load_npz(path: Path, seed: int = 0) -> ImageData:
    """A .npz with `x` (N, C, H, W; uint8 0..255 or float in [0, 1]) and `y`; optional `x_test`, `y_test`.

    Without test arrays, a fixed-seed sixth of the images becomes the test split.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            check_size(sum(info.file_size for info in f.zip.infolist()), f"{path} (its arrays, uncompressed)", "data")
            arrays = {k: f[k] for k in f.files}
    except QLPError:
        raise
    except Exception as e:
        raise QLPError(f"{path} is not a readable .npz file ({e}); save it with numpy.savez(x=..., y=...)") from e
    if "x" not in arrays or "y" not in arrays:
        raise QLPError(f"{path} has arrays {sorted(arrays)}; it needs `x` (N, C, H, W) and `y` (N,)")

    def tensors(x, y, what):
        x = np.asarray(x)
        if x.dtype != np.uint8:
            x = x.astype(np.float32)
            if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
                raise QLPError(f"{path}: float {what} must lie in [0, 1]; divide uint8 pixels by 255")
        y = np.asarray(y)
        if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
            raise QLPError(f"{path}: labels must be whole class numbers 0..C-1, found fractions")
        return TensorImages(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))

    full = tensors(arrays["x"], arrays["y"], "x")
    if "x_test" in arrays and "y_test" in arrays:
        train, test = full, tensors(arrays["x_test"], arrays["y_test"], "x_test")
    else:
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, len(full) // 6)
        train, test = full.subset(order[n_test:]), full.subset(order[:n_test])
    labels = torch.cat([train.y, test.y])
    if labels.min() < 0:
        raise QLPError(f"{path}: labels must be 0..C-1, found {int(labels.min())}")
    return ImageData(str(path), train, test, int(labels.max()) + 1, tuple(train.x.shape[1:]))


def load_image_folder(path: Path, image_size: int = 224) -> ImageData:
    """An ImageNet-style folder: `train/CLASS/*.jpg` and `val/CLASS/*.jpg` (or `test/`)."""
    from torchvision import datasets, transforms

    test_dir = next((path / s for s in ("val", "test") if (path / s).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        raise QLPError(f"{path} needs `train/` and `val/` (or `test/`) subfolders with one folder per class")
    transform = transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),  # float32 in [0, 1]; normalisation belongs to the model
    ])
    try:
        train = datasets.ImageFolder(str(path / "train"), transform=transform, loader=_read_image)
        test = datasets.ImageFolder(str(test_dir), transform=transform, loader=_read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise QLPError(f"{path}: {str(e).strip().splitlines()[0]}; put images in train/CLASS/ and val/CLASS/") from e
    if train.classes != test.classes:
        raise QLPError(f"{path}: train/ and {test_dir.name}/ have different class folders; make them match")
    return ImageData(str(path), train, test, len(train.classes), (3, image_size, image_size))


def _read_image(path: str):
    """An image file as RGB; a file PIL cannot read is named, so the user can replace or remove it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # UnidentifiedImageError, a truncated file, a decompression bomb
        raise QLPError(f"{path} is not a readable image ({type(e).__name__}); replace or remove it") from e


DATASETS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load_dataset(data: str, data_dir: Path | None = None) -> ImageData:
    """`data` is a name from DATASETS, a .npz file, or an image folder."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a folder; check the path (it should hold the data set's "
                         "files)")
    if data in DATASETS:
        return DATASETS[data](data_dir)
    path = Path(data)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"unknown data set {data!r}: the file {path} does not exist; check the --data path")
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
    if path.exists():
        raise UsageError(f"--data {path} is neither a .npz file nor an image folder; give one of those, or "
                         f"{' or '.join(DATASETS)}")
    if len(path.parts) > 1:
        raise UsageError(f"unknown data set {data!r}: the folder {path} does not exist; check the --data path")
    raise UsageError(
        f"unknown data set {data!r}: use one of {', '.join(DATASETS)}, a .npz file, or an image folder"
    )


# ---------------------------------------------------------------------------------------------- splits


DEFAULT_REWARD_SIZE = 5000


def make_splits(data: ImageData, reward_size: int | None = None, seed: int = 0) -> Splits:
    """Cut train into reward (`reward_size` images, fixed by `seed`) and fine-tune (the rest).

    The default reward size is 5,000 images, or a tenth of the training split when that is smaller."""
    n = len(data.train)
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


def materialize(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split (or its first `limit` images) as two tensors; used for the reward split."""
    xs, ys = zip(*iterate_batches(dataset, 512, limit=limit), strict=True)
    return torch.cat(xs), torch.cat(ys)
