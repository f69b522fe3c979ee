"""Fashion-MNIST from idx files: --data-dir, $QLP_DATA_DIR, the user cache, or Debian's dataset-fashion-mnist."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import cache_dir
from qlp_compress.data.images import ImageData, TensorImages

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


