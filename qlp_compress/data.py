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
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qlp_compress.cifar import read_cifar10_folder
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


CIFAR10_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin")
HOW_TO_GET_CIFAR10 = ("download cifar-10-python.tar.gz (or cifar-10-binary.tar.gz) from "
                      "https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and pass --data-dir to the folder "
                      "holding cifar-10-batches-py (or cifar-10-batches-bin)")


def load_cifar10(data_dir: Path | None = None, download: bool = True) -> ImageData:
    """CIFAR-10 from the python version (`cifar-10-batches-py`: pickles, read without running any code) or the
    binary version (`cifar-10-batches-bin`), else torchvision's download."""
    roots = [p for p in (data_dir, Path(os.environ["QLP_DATA_DIR"]) if os.environ.get("QLP_DATA_DIR") else None,
                         cache_dir()) if p]
    for root in roots:
        for folder in (root, *(root / name for name in CIFAR10_FOLDERS)):
            if (folder / "test_batch").is_file():
                return _read_cifar10_folder(folder, binary=False)
            if (folder / "test_batch.bin").is_file():
                return _read_cifar10_folder(folder, binary=True)
        if root == data_dir and data_dir.is_dir():  # a folder the user gave must hold the data
            raise QLPError(f"CIFAR-10 not found in --data-dir {data_dir} (no test_batch or test_batch.bin in it, "
                           f"its cifar-10-batches-py/ or its cifar-10-batches-bin/): {HOW_TO_GET_CIFAR10}")
    if download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(cache_dir()), train=True, download=True)
            return _read_cifar10_folder(cache_dir() / "cifar-10-batches-py", binary=False)
        except Exception:
            pass
    raise QLPError(f"CIFAR-10 not found: {HOW_TO_GET_CIFAR10}")


def _read_cifar10_folder(folder: Path, binary: bool) -> ImageData:
    x, y, x_test, y_test = read_cifar10_folder(folder, binary)
    train = TensorImages(torch.from_numpy(x), torch.from_numpy(y))
    return ImageData("cifar10", train, TensorImages(torch.from_numpy(x_test), torch.from_numpy(y_test)), 10,
                     (3, 32, 32))


MAX_LABEL = 2**31 - 1  # class numbers beyond this are not class numbers


def load_npz(path: Path, seed: int = 0) -> ImageData:
    """A .npz with `x` (N, C, H, W; uint8 0..255 or float in [0, 1]) and `y` (N,) integer class numbers 0..C-1;
    optional `x_test`, `y_test` (both or neither).

    Without test arrays, a fixed-seed sixth of the images becomes the test split. Whatever does not fit is
    refused with a message that names it: labels as a column or one-hot, pixels of another type, NaN, splits
    of different image sizes, too few images.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            check_size(sum(info.file_size for info in f.zip.infolist()), f"{path} (its arrays, uncompressed)", "data")
            arrays = {k: f[k] for k in f.files}
    except QLPError:
        raise
    except Exception as e:
        raise QLPError(f"{path} is not a readable .npz file ({_short(e)}); save it with numpy.savez(x=..., "
                       "y=...)") from e
    if "x" not in arrays or "y" not in arrays:
        raise QLPError(f"{path} has arrays {sorted(arrays)}; it needs `x` (N, C, H, W) and `y` (N,)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise QLPError(f"{path} has `{have}` but no `{lack}`; give both test arrays or neither")

    full = TensorImages(_npz_images(path, arrays["x"], "x"), _npz_labels(path, arrays["y"], len(arrays["x"]), "y"))
    if "x_test" in arrays:
        test = TensorImages(_npz_images(path, arrays["x_test"], "x_test"),
                            _npz_labels(path, arrays["y_test"], len(arrays["x_test"]), "y_test"))
        if test.x.shape[1:] != full.x.shape[1:]:
            raise QLPError(f"{path}: the test images `x_test` have shape {list(test.x.shape[1:])} but the training "
                           f"images `x` have {list(full.x.shape[1:])}; give both splits images of one shape")
        train = full
    else:
        if len(full) < 3:
            raise QLPError(f"{path} holds {len(full)} image(s); without `x_test` it needs at least 3 (for the "
                           "reward, fine-tune and test splits): add images")
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, len(full) // 6)
        train, test = full.subset(order[n_test:]), full.subset(order[:n_test])
    if len(train) < 2:
        raise QLPError(f"{path} holds {len(train)} training image(s) in `x`; at least 2 are needed (for the reward "
                       "and fine-tune splits): add images")
    labels = torch.cat([train.y, test.y])
    return ImageData(str(path), train, test, int(labels.max()) + 1, tuple(train.x.shape[1:]))


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:150]}" if text else type(e).__name__


def _npz_images(path: Path, x: np.ndarray, what: str) -> torch.Tensor:
    """uint8 pixels 0..255, or float pixels in [0, 1] (as float32), shape (N, C, H, W) with N ≥ 1."""
    if x.ndim != 4 or 0 in x.shape[1:]:
        raise QLPError(f"{path}: `{what}` has shape {list(x.shape)}; give images as (N, C, H, W), e.g. "
                       f"x[:, None] for grey (N, H, W) images")
    if len(x) == 0:
        raise QLPError(f"{path}: `{what}` holds no images; give at least one")
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise QLPError(f"{path}: `{what}` holds NaN or inf pixel values; give pixels as uint8 0..255 or float in "
                           "[0, 1]")
        if x.min() < 0 or x.max() > 1:
            raise QLPError(f"{path}: float `{what}` must lie in [0, 1], found {x.min():g}..{x.max():g}; divide "
                           "uint8 pixels by 255")
    elif x.dtype != np.uint8:
        raise QLPError(f"{path}: `{what}` has dtype {x.dtype}; give pixels as uint8 0..255 or float in [0, 1] (e.g. "
                       "x.astype(np.float32) / 65535 for 16-bit images)")
    return torch.from_numpy(np.ascontiguousarray(x))


def _npz_labels(path: Path, y: np.ndarray, n: int, what: str) -> torch.Tensor:
    """(N,) whole class numbers 0..C-1: integers, or floats that are whole numbers (a conversion that is
    certain). A column (N, 1) or one-hot labels (N, C) are refused: reading them could only be a guess."""
    if y.ndim == 2 and y.shape[1] == 1:
        raise QLPError(f"{path}: labels `{what}` have shape {list(y.shape)} (a column); give one class number per "
                       f"image, shape ({y.shape[0]},): {what}.reshape(-1)")
    if y.ndim == 2:
        raise QLPError(f"{path}: labels `{what}` have shape {list(y.shape)}, which looks one-hot (one column per "
                       f"class); give class numbers, shape ({y.shape[0]},): {what}.argmax(1)")
    if y.ndim != 1:
        raise QLPError(f"{path}: labels `{what}` have shape {list(y.shape)}; give one class number per image, "
                       "shape (N,)")
    if len(y) != n:
        raise QLPError(f"{path}: {n} images but {len(y)} labels in `{what}`; give one label per image")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise QLPError(f"{path}: labels `{what}` hold NaN or inf; give whole class numbers 0..C-1")
        if not np.array_equal(y, np.round(y)):
            raise QLPError(f"{path}: labels `{what}` must be whole class numbers 0..C-1, found fractions")
    elif y.dtype.kind not in "iu":
        raise QLPError(f"{path}: labels `{what}` have dtype {y.dtype}; give integer class numbers 0..C-1")
    if y.min() < 0 or y.max() > MAX_LABEL:
        bad = y.min() if y.min() < 0 else y.max()
        raise QLPError(f"{path}: labels `{what}` must be class numbers 0..C-1, found {bad:g}")
    return torch.from_numpy(y.astype(np.int64))


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


def materialize(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split (or its first `limit` images) as two tensors; used for the reward split."""
    xs, ys = zip(*iterate_batches(dataset, 512, limit=limit), strict=True)
    return torch.cat(xs), torch.cat(ys)
