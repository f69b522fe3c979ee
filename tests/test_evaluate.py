"""`train` and `evaluate` workflows end to end on tiny .npz data, checked against PyTorch and values the tests
wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qlp_compress.base.errors import UsageError
from qlp_compress.deploy import engine, export
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.train.measure import accuracy
from qlp_compress.train.zoo import build_model, stats_for
from qlp_compress.workflows import DataSettings, evaluate_model, train_model

FAST = TrainSettings(epochs=0.2, batch_size=32, lr=0.05, warmup_epochs=0.1, seed=0)


def write_npz(path: Path, n: int = 200, n_test: int = 40, shape=(1, 28, 28), classes: int = 10,
              seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.integers(0, 256, (n, *shape), dtype=np.uint8), "y": rng.integers(0, classes, n),
              "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
              "y_test": rng.integers(0, classes, n_test)}
    arrays["y"][:classes] = np.arange(classes)  # every class present, so the class count is known
    np.savez(path, **arrays)
    return arrays


def onnx_accuracy_by_hand(path: Path, x_u8: np.ndarray, y: np.ndarray) -> float:
    """The reference: one onnxruntime run over the test images as written, top-1 against the labels."""
    session = engine.open_session(path)
    logits = session.run(None, {"input": x_u8.astype(np.float32) / 255})[0]
    return float((logits.argmax(1) == y).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, dict, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("train")
    arrays = write_npz(folder / "tiny.npz")
    out = folder / "lenet5.onnx"
    result = train_model("lenet5", DataSettings(data=str(folder / "tiny.npz"), reward_size=40), FAST, out,
                         command="qlp-compress train lenet5 --data tiny.npz")
    return folder, out, result, arrays


def test_train_model_writes_onnx_with_its_measured_test_accuracy(trained) -> None:
    folder, out, result, arrays = trained
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    metadata = export.read_metadata(proto)
    measured = onnx_accuracy_by_hand(out, arrays["x_test"], arrays["y_test"])
    assert result["test_accuracy"] == pytest.approx(measured, abs=1e-12)
    assert metadata["qlp.test_accuracy"] == f"{measured:.4f}"
    assert metadata["qlp.arch"] == "lenet5"
    assert metadata["qlp.num_classes"] == "10"
    assert metadata["qlp.input_shape"] == "1x28x28"
    assert metadata["qlp.dataset"] == str(folder / "tiny.npz")
    assert metadata["qlp.command"] == "qlp-compress train lenet5 --data tiny.npz"
    assert result["history"] and result["epochs"] == 0.2
    # through the library's own measurement too
    from qlp_compress.data import load_npz

    test = load_npz(folder / "tiny.npz").test
    assert engine.session_accuracy(engine.open_session(out), test, batch_size=7) == pytest.approx(measured)


def test_train_model_refuses_to_overwrite(trained) -> None:
    folder, out, _, _ = trained
    before = out.read_bytes()
    stat = out.stat()
    with pytest.raises(UsageError, match="--force"):
        train_model("lenet5", DataSettings(data=str(folder / "tiny.npz"), reward_size=40), FAST, out,
                    command="again")
    assert out.read_bytes() == before
    assert out.stat().st_mtime_ns == stat.st_mtime_ns


def test_train_model_overwrites_with_force(tmp_path) -> None:
    arrays = write_npz(tmp_path / "tiny.npz", n=64, n_test=16, seed=3)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's old file")
    train_model("lenet5", DataSettings(data=str(tmp_path / "tiny.npz"), reward_size=16), FAST, out,
                command="forced", force=True)
    metadata = export.read_metadata(onnx.load(str(out)))
    assert metadata["qlp.command"] == "forced"
    assert metadata["qlp.test_accuracy"] == f"{onnx_accuracy_by_hand(out, arrays['x_test'], arrays['y_test']):.4f}"


def sparse_lenet(seed: int = 0) -> tuple[torch.nn.Module, dict[str, tuple[int, int]]]:
    """A LeNet-5 with a different random fraction of each layer's weights set to exactly zero."""
    torch.manual_seed(seed)
    model = build_model("lenet5", 1, 10, *stats_for("fashion-mnist", 1)).eval()
    g = torch.Generator().manual_seed(seed)
    counts = {}
    with torch.no_grad():
        for layer, fraction in zip(find_prunable_layers(model), (0.1, 0.5, 0.8, 0.9, 0.3), strict=True):
            flat = layer.weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=g)[: int(fraction * flat.numel())]] = 0
            counts[layer.name] = (flat.numel(), int((flat == 0).sum()))
    return model, counts


def test_evaluate_model_accuracy_and_sparsity(tmp_path) -> None:
    arrays = write_npz(tmp_path / "d.npz", n=30, n_test=50, seed=1)
    model, counts = sparse_lenet()
    path = tmp_path / "sparse.onnx"
    export.save_onnx(model, path, (1, 28, 28), metadata={"note": "written by the test"})
    result = evaluate_model(path, DataSettings(data=str(tmp_path / "d.npz")), device="cpu",
                            latency_batches=(1, 3), repeats=2)

    x = torch.from_numpy(arrays["x_test"]).float() / 255
    y = torch.from_numpy(arrays["y_test"])
    # PyTorch's answer; onnxruntime's kernels sum in another order, so an image whose two best logits lie
    # within float noise may flip: the two accuracies may differ by those images only
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-4).sum())
    assert abs(result["accuracy"] - accuracy(model, [(x, y)])) <= near_ties / len(y) + 1e-12
    assert result["accuracy"] == pytest.approx(onnx_accuracy_by_hand(path, arrays["x_test"], arrays["y_test"]))
    assert result["test_images"] == 50

    total = sum(n for n, _ in counts.values())
    zeros = sum(z for _, z in counts.values())
    assert result["weights"] == total
    assert result["global_sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    read_back = sorted((v["weights"], round(v["sparsity"] * v["weights"])) for v in result["layers"].values())
    assert read_back == sorted(counts.values())
    assert result["metadata"]["note"] == "written by the test"
    assert [lat["batch"] for lat in result["latency"]] == [1, 3]
    assert all(lat["median_ms"] > 0 for lat in result["latency"])
    assert result["file_bytes"] == path.stat().st_size


def test_evaluate_model_without_data(tmp_path) -> None:
    model, counts = sparse_lenet(seed=2)
    path = tmp_path / "m.onnx"
    export.save_onnx(model, path, (1, 28, 28))
    result = evaluate_model(path, None, device="cpu", latency_batches=(2,), repeats=1)
    assert result["accuracy"] is None
    assert result["global_sparsity"] == pytest.approx(sum(z for _, z in counts.values()) /
                                                      sum(n for n, _ in counts.values()), abs=1e-12)


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lenet") / "lenet.onnx"
    export.save_onnx(sparse_lenet()[0], path, (1, 28, 28))
    return path


@pytest.mark.parametrize("shape", [(3, 28, 28), (1, 32, 32)], ids=["channels", "size"])
def test_evaluate_model_input_shape_mismatch(tmp_path, lenet_file, shape) -> None:
    write_npz(tmp_path / "other.npz", n=12, n_test=4, shape=shape)
    with pytest.raises(UsageError, match="input of shape"):
        evaluate_model(lenet_file, DataSettings(data=str(tmp_path / "other.npz")), device="cpu",
                       latency_batches=(1,), repeats=1)


def test_evaluate_model_class_count_mismatch(tmp_path, lenet_file) -> None:
    write_npz(tmp_path / "three.npz", n=12, n_test=4, classes=3)
    with pytest.raises(UsageError, match="predicts 10 classes but the data has 3"):
        evaluate_model(lenet_file, DataSettings(data=str(tmp_path / "three.npz")), device="cpu",
                       latency_batches=(1,), repeats=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_evaluate_model_cuda_without_gpu(lenet_file) -> None:
    with pytest.raises(UsageError, match="no CUDA GPU"):
        evaluate_model(lenet_file, None, device="cuda", latency_batches=(1,), repeats=1)


def test_evaluate_model_unknown_device(lenet_file) -> None:
    with pytest.raises(UsageError, match="--device"):
        evaluate_model(lenet_file, None, device="tpu", latency_batches=(1,), repeats=1)
