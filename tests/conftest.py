"""Shared test settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qlp_compress.deploy import export
from qlp_compress.train.zoo import build_model


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny models: one intra-op thread is faster than several, and on a busy machine several
    threads spin against each other (observed: 6× slower on 2 cores shared with a training job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_task(root: Path, n: int, n_train: int, steps: int) -> torch.nn.Module:
    """A learnable 4-class 28×28 task in root/data.npz (the first n_train images train, the rest test) and a
    LeNet-5 trained `steps` SGD steps on it, exported to root/lenet.onnx; returns the model (eval mode)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
    for k in range(4):  # class k: a bright 7×7 square in quadrant k
        rows, cols = (k // 2) * 14 + 3, (k % 2) * 14 + 3
        x[y == k, :, rows : rows + 7, cols : cols + 7] = 220
    np.savez(root / "data.npz", x=x[:n_train], y=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    torch.manual_seed(0)
    model = build_model("lenet5", 1, 4, (0.2,), (0.3,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x[:1000]).float() / 255, torch.from_numpy(y[:1000])
    for i in range(steps):
        batch = slice((i * 50) % 1000, (i * 50) % 1000 + 50)
        loss = torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    (root / "lenet.onnx").write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    return model
