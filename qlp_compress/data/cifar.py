"""CIFAR-10 batches, read without running code: the python version's pickles through an unpickler that admits
only the numpy array reconstruction real batches need, and the binary version's fixed-size records. Every
failure is a QLPError naming the file. Used by qlp_compress.data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import cache_dir, check_size
from qlp_compress.data.images import ImageData, TensorImages

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]  # the five training batches, then test


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


def read_cifar10_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
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


def read_cifar10_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the binary version: records of a label byte and 3072 pixel bytes."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise _NotACifarBatch(f"{raw.size} bytes, not a whole number of {CIFAR10_RECORD}-byte records")
    records = raw.reshape(-1, CIFAR10_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _read_cifar10_batch(path: Path, read=read_cifar10_pickle) -> tuple[np.ndarray, np.ndarray]:
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


def read_cifar10_folder(folder: Path, binary: bool) -> tuple[np.ndarray, ...]:
    """(train images, train labels, test images, test labels) of a cifar-10-batches-py or -bin folder."""
    read, suffix = (read_cifar10_binary, ".bin") if binary else (read_cifar10_pickle, "")
    parts = [_read_cifar10_batch(folder / f"{name}{suffix}", read) for name in CIFAR10_FILES]
    return (np.concatenate([p[0] for p in parts[:-1]]), np.concatenate([p[1] for p in parts[:-1]]),
            parts[-1][0].copy(), parts[-1][1])


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


