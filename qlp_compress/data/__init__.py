"""Data: named data sets (Fashion-MNIST, CIFAR-10), user files (.npz, image folders), and the reward / fine-tune /
test splits. The rest of the package reads data only through this part.

May import: base."""

from __future__ import annotations

from pathlib import Path

from qlp_compress.base.errors import UsageError
from qlp_compress.data.cifar import load_cifar10
from qlp_compress.data.fashion_mnist import load_fashion_mnist
from qlp_compress.data.files import load_image_folder, load_npz
from qlp_compress.data.images import (
    DEFAULT_REWARD_SIZE,
    ImageData,
    Splits,
    TensorImages,
    iterate_batches,
    iterate_shares,
    make_splits,
    materialize,
    to_float,
)

__all__ = ["DATASETS", "DEFAULT_REWARD_SIZE", "ImageData", "Splits", "TensorImages", "iterate_batches",
           "iterate_shares", "load_cifar10", "load_dataset", "load_fashion_mnist", "load_image_folder", "load_npz",
           "make_splits", "materialize", "to_float"]

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


