"""Every reader in qlp_compress.data, fed files in the real formats written by the tests themselves."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.data import (
    ImageData,
    TensorImages,
    fashion_mnist,
    iterate_batches,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    make_splits,
    materialize,
)
from qlp_compress.data.fashion_mnist import FASHION_MNIST_FILES, read_idx

# ---------------------------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format (as on yann.lecun.com): 0, 0, type 0x08 (ubyte), ndim, big-endian dims, raw data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fashion_arrays(seed: int = 0, n_train: int = 7, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_fashion(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in FASHION_MNIST_FILES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)


@pytest.fixture
def no_system_data(tmp_path, monkeypatch) -> None:
    """No Debian package, an empty user cache and no $QLP_DATA_DIR: only what a test puts in place is found."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", empty / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty / "cache"))
    monkeypatch.delenv("QLP_DATA_DIR", raising=False)


def check_split(dataset: TensorImages, images_u8: np.ndarray, labels: np.ndarray) -> None:
    """The split holds exactly these images (as float in [0, 1]) and labels, NCHW, float32 / int64."""
    x, y = materialize(dataset)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape) == images_u8.shape
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x, torch.from_numpy(images_u8).float() / 255)
    assert y.tolist() == labels.astype(np.int64).tolist()


# --------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_from_data_dir(tmp_path, no_system_data, gz: bool, layout: str) -> None:
    arrays = fashion_arrays()
    root = tmp_path / "data"
    write_fashion(root / layout if layout else root, arrays, gz)
    ds = load_fashion_mnist(root, download=False)
    assert ds.name == "fashion-mnist"
    assert ds.num_classes == 10
    assert ds.input_shape == (1, 28, 28)
    assert len(ds.train) == 7 and len(ds.test) == 5
    check_split(ds.train, arrays["train_x"][:, None], arrays["train_y"])
    check_split(ds.test, arrays["test_x"][:, None], arrays["test_y"])
    x, y = ds.train[3]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32 and y == int(arrays["train_y"][3])


def test_fashion_mnist_from_env_var(tmp_path, no_system_data, monkeypatch) -> None:
    arrays = fashion_arrays(seed=1)
    write_fashion(tmp_path / "env" / "fashion-mnist", arrays, gz=True)
    monkeypatch.setenv("QLP_DATA_DIR", str(tmp_path / "env"))
    ds = load_fashion_mnist(None, download=False)
    check_split(ds.train, arrays["train_x"][:, None], arrays["train_y"])
    check_split(ds.test, arrays["test_x"][:, None], arrays["test_y"])


def test_fashion_mnist_data_dir_wins_over_env_var(tmp_path, no_system_data, monkeypatch) -> None:
    first, second = fashion_arrays(seed=2), fashion_arrays(seed=3)
    write_fashion(tmp_path / "given", first, gz=False)
    write_fashion(tmp_path / "env", second, gz=False)
    monkeypatch.setenv("QLP_DATA_DIR", str(tmp_path / "env"))
    ds = load_fashion_mnist(tmp_path / "given", download=False)
    check_split(ds.train, first["train_x"][:, None], first["train_y"])


def test_fashion_mnist_from_the_user_cache_then_the_system_folder(tmp_path, no_system_data, monkeypatch) -> None:
    """Without --data-dir and $QLP_DATA_DIR: ~/.cache/qlp-compress (XDG_CACHE_HOME), then Debian's
    /usr/share/datasets/fashion-mnist; the cache wins when both hold the files, $QLP_DATA_DIR wins over both."""
    cached, system, env = fashion_arrays(seed=5), fashion_arrays(seed=6), fashion_arrays(seed=7)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "usr-share" / "fashion-mnist")
    write_fashion(tmp_path / "usr-share" / "fashion-mnist", system, gz=True)  # as the Debian package installs it
    check_split(load_fashion_mnist(None, download=False).test, system["test_x"][:, None], system["test_y"])
    write_fashion(tmp_path / "xdg" / "qlp-compress" / "fashion-mnist", cached, gz=False)
    check_split(load_fashion_mnist(None, download=False).test, cached["test_x"][:, None], cached["test_y"])
    write_fashion(tmp_path / "env", env, gz=False)
    monkeypatch.setenv("QLP_DATA_DIR", str(tmp_path / "env"))
    check_split(load_fashion_mnist(None, download=False).test, env["test_x"][:, None], env["test_y"])


def test_fashion_mnist_through_load_dataset(tmp_path, no_system_data) -> None:
    arrays = fashion_arrays(seed=4)
    write_fashion(tmp_path / "d", arrays, gz=True)
    ds = load_dataset("fashion-mnist", tmp_path / "d")
    check_split(ds.test, arrays["test_x"][:, None], arrays["test_y"])


def test_fashion_mnist_not_found_says_how_to_get_it(tmp_path, no_system_data) -> None:
    incomplete = tmp_path / "incomplete"
    write_fashion(incomplete, fashion_arrays(), gz=False)
    (incomplete / FASHION_MNIST_FILES["test_y"]).unlink()  # three of four files are not enough
    with pytest.raises(QLPError) as err:
        load_fashion_mnist(incomplete, download=False)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and "QLP_DATA_DIR" in message
    assert str(incomplete) in message
    assert "download failed" not in message  # download=False: none was tried


def test_fashion_mnist_failed_download_is_reported(tmp_path, no_system_data, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(QLPError, match="download failed") as err:
        load_fashion_mnist(tmp_path / "nothing-here")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def corrupt_variants() -> dict[str, bytes]:
    good = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    return {
        "bad-magic": b"\x01\x02" + good[2:],
        "int32-type": good[:2] + b"\x0c" + good[3:],
        "truncated-data": good[:-10],
        "truncated-header": good[:6],
        "empty": b"",
    }


@pytest.mark.parametrize("kind", sorted(corrupt_variants()))
def test_corrupted_idx_raises_qlp_error(tmp_path, kind: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corrupt_variants()[kind])
    with pytest.raises(QLPError, match="not a valid idx file"):
        read_idx(path)


def test_corrupted_gzip_idx_raises_qlp_error(tmp_path) -> None:
    good = gzip.compress(idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8)))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "not-gzip.gz").write_bytes(idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8)))
    for name in ("cut.gz", "not-gzip.gz"):
        with pytest.raises(QLPError, match="not a valid idx file"):
            read_idx(tmp_path / name)


def test_corrupted_fashion_mnist_file_raises_through_loader(tmp_path, no_system_data) -> None:
    write_fashion(tmp_path / "d", fashion_arrays(), gz=False)
    path = tmp_path / "d" / FASHION_MNIST_FILES["train_x"]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(QLPError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path / "d", download=False)


# -------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder: Path, per_batch: int = 3, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The python version of CIFAR-10: pickled dicts whose b"data" rows are the red, green, blue planes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    hwc = {}
    labels = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)  # as an RGB picture, HWC
        rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # 1024 R, then 1024 G, then 1024 B
        y = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": rows,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}, f)
        hwc[name], labels[name] = images, np.array(y)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    return (np.concatenate([hwc[n] for n in train_names]), np.concatenate([labels[n] for n in train_names]),
            hwc["test_batch"], labels["test_batch"])


@pytest.mark.parametrize("give", ["parent", "folder"])
def test_cifar10_batches_py(tmp_path, no_system_data, give: str) -> None:
    train_hwc, train_y, test_hwc, test_y = write_cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path if give == "parent" else tmp_path / "cifar-10-batches-py"
    ds = load_cifar10(root, download=False)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert len(ds.train) == 15 and len(ds.test) == 3
    check_split(ds.train, train_hwc.transpose(0, 3, 1, 2), train_y)
    check_split(ds.test, test_hwc.transpose(0, 3, 1, 2), test_y)
    # channel order, pixel by pixel: channel 0 is red, 2 is blue, rows before columns
    x, _ = ds.train[4]
    assert tuple(x.shape) == (3, 32, 32)
    for c in range(3):
        assert torch.equal(x[c], torch.from_numpy(train_hwc[4, :, :, c]).float() / 255)
    assert float(x[2, 5, 7]) == pytest.approx(train_hwc[4, 5, 7, 2] / 255)


def test_cifar10_from_env_var(tmp_path, no_system_data, monkeypatch) -> None:
    _, _, test_hwc, test_y = write_cifar(tmp_path / "env" / "cifar-10-batches-py", seed=5)
    monkeypatch.setenv("QLP_DATA_DIR", str(tmp_path / "env"))
    ds = load_dataset("cifar10")
    check_split(ds.test, test_hwc.transpose(0, 3, 1, 2), test_y)


def test_cifar10_missing_and_corrupt(tmp_path, no_system_data) -> None:
    with pytest.raises(QLPError, match=r"cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path / "nowhere", download=False)
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(QLPError, match="data_batch_3"):
        load_cifar10(tmp_path, download=False)


# ------------------------------------------------------------------------------------------------ .npz


def indexed_images(n: int, shape=(3, 4, 4)) -> np.ndarray:
    """uint8 images whose first pixel is their index, so that a split can be traced back."""
    x = np.random.default_rng(n).integers(0, 256, (n, *shape), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def test_npz_uint8_without_test_arrays(tmp_path) -> None:
    x = indexed_images(30)
    y = np.arange(30) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_npz(tmp_path / "d.npz")
    assert ds.num_classes == 4 and ds.input_shape == (3, 4, 4) and ds.name == str(tmp_path / "d.npz")
    assert len(ds.test) == 30 // 6 and len(ds.train) == 30 - 30 // 6
    train_ids = ds.train.x[:, 0, 0, 0].tolist()
    test_ids = ds.test.x[:, 0, 0, 0].tolist()
    assert sorted(train_ids + test_ids) == list(range(30))  # disjoint and covering
    for split, ids in ((ds.train, train_ids), (ds.test, test_ids)):
        check_split(split, x[ids], y[ids])
    again = load_npz(tmp_path / "d.npz")
    assert again.test.x[:, 0, 0, 0].tolist() == test_ids  # fixed by the seed
    other = load_npz(tmp_path / "d.npz", seed=1)
    assert other.test.x[:, 0, 0, 0].tolist() != test_ids


def test_npz_float_with_test_arrays(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((10, 1, 5, 6)).astype(np.float64)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # the ends of the range are allowed
    x_test = rng.random((4, 1, 5, 6)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(10) % 3, x_test=x_test, y_test=np.array([0, 1, 2, 6]))
    ds = load_dataset(str(tmp_path / "f.npz"))
    assert ds.num_classes == 7  # the largest label in either split, plus one
    assert ds.input_shape == (1, 5, 6)
    xb, yb = materialize(ds.train)
    assert xb.dtype == torch.float32 and torch.equal(xb, torch.from_numpy(x.astype(np.float32)))
    assert yb.tolist() == (np.arange(10) % 3).tolist()
    xt, yt = materialize(ds.test)
    assert torch.equal(xt, torch.from_numpy(x_test)) and yt.tolist() == [0, 1, 2, 6]


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan, np.inf])
def test_npz_float_outside_unit_range_is_refused(tmp_path, bad: float) -> None:
    x = np.full((6, 1, 2, 2), 0.5, dtype=np.float32)
    x[2, 0, 1, 1] = bad
    np.savez(tmp_path / "bad.npz", x=x, y=np.zeros(6, dtype=np.int64))
    with pytest.raises(QLPError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "bad.npz")


def test_npz_float_test_split_outside_range_is_refused(tmp_path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((6, 1, 2, 2), np.float32), y=np.zeros(6, np.int64),
             x_test=np.full((2, 1, 2, 2), 255.0, np.float32), y_test=np.zeros(2, np.int64))
    with pytest.raises(QLPError, match="x_test"):
        load_npz(tmp_path / "bad.npz")


@pytest.mark.parametrize("arrays", [{"x": np.zeros((6, 1, 2, 2), np.uint8)}, {"y": np.zeros(6)},
                                    {"images": np.zeros((6, 1, 2, 2), np.uint8), "labels": np.zeros(6)}],
                         ids=["no-y", "no-x", "other-names"])
def test_npz_missing_keys(tmp_path, arrays) -> None:
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(QLPError, match="needs `x`"):
        load_npz(tmp_path / "m.npz")


def test_npz_unreadable_and_bad_shapes(tmp_path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(QLPError, match=r"not a readable \.npz"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "flat.npz", x=np.zeros((6, 4), np.uint8), y=np.zeros(6))
    with pytest.raises(QLPError, match="N, C, H, W"):
        load_npz(tmp_path / "flat.npz")
    np.savez(tmp_path / "count.npz", x=np.zeros((6, 1, 2, 2), np.uint8), y=np.zeros(5))
    with pytest.raises(QLPError, match="6 images but 5 labels"):
        load_npz(tmp_path / "count.npz")
    np.savez(tmp_path / "neg.npz", x=np.zeros((6, 1, 2, 2), np.uint8), y=np.array([0, 1, -1, 0, 1, 0]))
    with pytest.raises(QLPError, match="labels"):
        load_npz(tmp_path / "neg.npz")


# ---------------------------------------------------------------------------------------- image folder

COLOURS = {"apple": (200, 30, 40), "leaf": (20, 180, 60), "sky": (30, 60, 220)}


def write_image_folder(root: Path, test_name: str = "val", classes=COLOURS, per_class: int = 2) -> None:
    """train/CLASS/*.png and val/CLASS/*.png, each image one solid colour per class."""
    for split, n in (("train", per_class), (test_name, 1)):
        for cls, rgb in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + 3 * i, 18), rgb).save(folder / f"{i}.png")


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_image_folder(tmp_path, test_name: str) -> None:
    write_image_folder(tmp_path / "imgs", test_name)
    ds = load_image_folder(tmp_path / "imgs", image_size=16)
    assert ds.num_classes == 3 and ds.input_shape == (3, 16, 16)
    assert len(ds.train) == 6 and len(ds.test) == 3
    names = sorted(COLOURS)  # ImageFolder numbers the class folders in sorted order
    for split in (ds.train, ds.test):
        for x, y in iterate_batches(split, batch_size=4):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert tuple(x.shape[1:]) == (3, 16, 16)
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            for image, label in zip(x, y, strict=True):
                rgb = torch.tensor(COLOURS[names[int(label)]], dtype=torch.float32) / 255
                assert torch.allclose(image, rgb.view(3, 1, 1).expand(3, 16, 16), atol=1.5 / 255)


def test_image_folder_through_load_dataset_default_size(tmp_path) -> None:
    write_image_folder(tmp_path / "imgs", per_class=1)
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.input_shape == (3, 224, 224) and ds.num_classes == 3
    x, y = ds.test[0]
    assert tuple(x.shape) == (3, 224, 224) and isinstance(y, int)


def test_image_folder_errors(tmp_path) -> None:
    (tmp_path / "only-train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(QLPError, match="val/"):
        load_image_folder(tmp_path / "only-train")
    write_image_folder(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "val" / "sky" / "0.png").rename(tmp_path / "mismatch" / "val" / "0.png")
    (tmp_path / "mismatch" / "val" / "sky").rmdir()
    with pytest.raises(QLPError, match="different class folders"):
        load_image_folder(tmp_path / "mismatch")


# ------------------------------------------------------------------------------------- batches, splits


def labelled_data(n: int = 50) -> ImageData:
    """Labels equal to the image index, so that every split can be traced back to the training set."""
    x = torch.randint(0, 256, (n, 1, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    train = TensorImages(x, torch.arange(n))
    return ImageData("ids", train, TensorImages(x[:5], torch.arange(5)), n, (1, 3, 3))


def test_iterate_batches_shuffle_and_limit() -> None:
    ds = labelled_data(23).train
    batches = list(iterate_batches(ds, 5))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(23))
    shuffled = torch.cat([y for _, y in iterate_batches(ds, 5, shuffle=True,
                                                         generator=torch.Generator().manual_seed(1))])
    assert sorted(shuffled.tolist()) == list(range(23)) and shuffled.tolist() != list(range(23))
    limited = torch.cat([y for _, y in iterate_batches(ds, 4, limit=10)])
    assert limited.tolist() == list(range(10))
    x, y = materialize(ds, limit=7)
    assert torch.equal(x, ds.x[:7].float() / 255) and y.tolist() == list(range(7))


def test_make_splits_tensor_images() -> None:
    ds = labelled_data(50)
    splits = make_splits(ds, reward_size=12, seed=3)
    reward, finetune = splits.reward.y.tolist(), splits.finetune.y.tolist()
    assert len(reward) == 12 and len(finetune) == 38
    assert not set(reward) & set(finetune)
    assert sorted(reward + finetune) == list(range(50))
    assert torch.equal(splits.reward.x, ds.train.x[splits.reward.y])  # images stay with their labels
    assert splits.test is ds.test
    same = make_splits(ds, reward_size=12, seed=3)
    assert same.reward.y.tolist() == reward and same.finetune.y.tolist() == finetune
    other = make_splits(ds, reward_size=12, seed=4)
    assert other.reward.y.tolist() != reward


def test_make_splits_generic_dataset(tmp_path) -> None:
    write_image_folder(tmp_path / "imgs", per_class=4)
    ds = load_image_folder(tmp_path / "imgs", image_size=8)
    splits = make_splits(ds, reward_size=5, seed=0)
    reward, finetune = list(splits.reward.indices), list(splits.finetune.indices)
    assert len(reward) == 5 and len(finetune) == 7
    assert sorted(reward + finetune) == list(range(12))
    assert list(make_splits(ds, reward_size=5, seed=0).reward.indices) == reward
    assert list(make_splits(ds, reward_size=5, seed=1).reward.indices) != reward


@pytest.mark.parametrize("size", [0, -3, 50, 51])
def test_make_splits_bad_reward_size(size: int) -> None:
    with pytest.raises(UsageError, match="--reward-size"):
        make_splits(labelled_data(50), reward_size=size)


@pytest.mark.parametrize("name", ["mnist", "nonexistent.npz", "cifar-100"])
def test_load_dataset_unknown_name(tmp_path, name: str) -> None:
    with pytest.raises(UsageError, match="unknown data set"):
        load_dataset(str(tmp_path / name) if name.endswith(".npz") else name)
