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


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]  # the five training batches, then test
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
                return _read_cifar10_folder(folder, _read_cifar10_pickle, "")
            if (folder / "test_batch.bin").is_file():
                return _read_cifar10_folder(folder, _read_cifar10_binary, ".bin")
        if root == data_dir and data_dir.is_dir():  # a folder the user gave must hold the data
            raise QLPError(f"CIFAR-10 not found in --data-dir {data_dir} (no test_batch or test_batch.bin in it, "
                           f"its cifar-10-batches-py/ or its cifar-10-batches-bin/): {HOW_TO_GET_CIFAR10}")
    if download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(cache_dir()), train=True, download=True)
            return _read_cifar10_folder(cache_dir() / "cifar-10-batches-py", _read_cifar10_pickle, "")
        except Exception:
            pass
    raise QLPError(f"CIFAR-10 not found: {HOW_TO_GET_CIFAR10}")


CIFAR10_RECORD = 1 + 3 * 32 * 32  # the binary version: a label byte, then the red, green and blue planes


class _NotACifarBatch(Exception):
    """What is wrong with a file that should be a CIFAR-10 batch."""


def _cifar_reconstruct(subtype, shape, dtype):
    """numpy's array reconstruction, for plain arrays only."""
    if subtype is not _NDARRAY:
        raise _NotACifarBatch("it rebuilds an array of another type")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _cifar_dtype(spec, align=False, copy=False):
    """A numpy dtype of plain numbers (never of Python objects)."""
    if not isinstance(spec, str | bytes):
        raise _NotACifarBatch("it declares an unusual array type")
    dtype = np.dtype(spec.decode("latin1") if isinstance(spec, bytes) else spec, bool(align), bool(copy))
    if dtype.kind not in "biuf":
        raise _NotACifarBatch(f"it declares arrays of {dtype}")
    return dtype


def _cifar_latin1(text, encoding="utf-8"):
    """`_codecs.encode(text, "latin1")`: how Python 3 pickles bytes at protocol 2."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise _NotACifarBatch("it encodes text in an unusual way")
    return text.encode("latin1")


def _cifar_frombuffer(buffer, dtype, shape, order):
    """How numpy pickles arrays at protocol 5: the bytes, their dtype, the shape."""
    if not (isinstance(buffer, bytes | bytearray) and isinstance(dtype, np.dtype) and isinstance(shape, tuple)
            and order in ("C", "F")):
        raise _NotACifarBatch("it rebuilds an array in an unusual way")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order)


_NDARRAY = object()  # stands for numpy.ndarray in a pickle: only ever an argument of _cifar_reconstruct
_NUMPY_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy.core.multiarray._reconstruct, in any numpy version
# Every global a CIFAR-10 batch refers to (pickled by Python 2 or 3 at any protocol, with numpy 1 or 2); nothing else
# is looked up.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _cifar_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _cifar_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _cifar_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _cifar_frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _cifar_dtype,
    ("_codecs", "encode"): _cifar_latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads the dicts, lists, numbers, bytes and numpy arrays a CIFAR-10 batch is made of; any other global
    (a function or a class, which unpickling would call) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise _NotACifarBatch(f"it refers to {module}.{name}, which a CIFAR-10 batch never does; it was not run")
        return allowed

    def persistent_load(self, pid):
        raise _NotACifarBatch("it refers to outside objects")


def _read_cifar10_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the python version: a dict with b"data" (N × 3072 uint8) and b"labels" (N class numbers)."""
    with open(path, "rb") as f:
        try:
            d = _CifarUnpickler(f, encoding="bytes").load()
        except _NotACifarBatch:
            raise
        except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError, MemoryError, ...
            raise _NotACifarBatch(f"not a readable pickle: {type(e).__name__}") from e
    if not isinstance(d, dict):
        raise _NotACifarBatch(f"it holds a {type(d).__name__}, not a dict")
    x = d.get(b"data", d.get("data"))
    y = d.get(b"labels", d.get("labels"))
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise _NotACifarBatch("no uint8 array 'data' of shape (N, 3072)")
    if isinstance(y, np.ndarray) and y.ndim == 1 and y.dtype.kind in "iu":
        y = y.astype(np.int64)
    elif isinstance(y, list) and all(type(v) is int for v in y):  # checked first: a list of lists is refused
        y = np.asarray(y, dtype=np.int64) if y else np.zeros(0, np.int64)
    else:
        raise _NotACifarBatch("no list of integer 'labels'")
    return x.reshape(-1, 3, 32, 32), y


def _read_cifar10_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the binary version: records of a label byte and 3072 pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise _NotACifarBatch(f"{raw.size} bytes, not a whole number of {CIFAR10_RECORD}-byte records")
    records = raw.reshape(-1, CIFAR10_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_cifar10_batch(path: Path, read=_read_cifar10_pickle) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise QLPError(f"CIFAR-10 batch {path} is missing; re-extract the whole CIFAR-10 archive there")
    try:
        check_size(path.stat().st_size, str(path), "data")
        x, y = read(path)
        if len(x) == 0 or len(x) != len(y):
            raise _NotACifarBatch(f"{len(x)} images but {len(y)} labels")
        if y.min() < 0 or y.max() > 9:
            raise _NotACifarBatch(f"labels outside 0..9 (found {int(y.min())}..{int(y.max())})")
        return x, y
    except _NotACifarBatch as e:
        raise QLPError(f"{path} is not a CIFAR-10 batch ({e}); replace it with an intact copy from the CIFAR-10 "
                       "archive") from None
    except OSError as e:
        raise QLPError(f"{path} cannot be read ({e.strerror}); check its permissions") from e


def _read_cifar10_folder(folder: Path, read, suffix: str) -> ImageData:
    parts = [_read_cifar10_batch(folder / f"{name}{suffix}", read) for name in CIFAR10_FILES]
    train = TensorImages(torch.from_numpy(np.concatenate([p[0] for p in parts[:-1]])),
                         torch.from_numpy(np.concatenate([p[1] for p in parts[:-1]])))
    test = TensorImages(torch.from_numpy(parts[-1][0].copy()), torch.from_numpy(parts[-1][1]))
    return ImageData("cifar10", train, test, 10, (3, 32, 32))


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
