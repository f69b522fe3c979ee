"""User data: a .npz file of arrays, or an ImageNet-style image folder. Anything that does not fit is refused with
a message that names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import check_size
from qlp_compress.data.images import ImageData, TensorImages

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


