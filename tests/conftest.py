"""Shared test settings."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from qlp_compress import cli
from qlp_compress.deploy import export
from qlp_compress.train.finetune import augment
from qlp_compress.train.zoo import build_model


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny models: one intra-op thread is faster than several, and on a busy machine several
    threads spin against each other (observed: 6× slower on 2 cores shared with a training job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def default_sigint() -> None:
    """preexec_fn for a CLI subprocess that is sent SIGINT: a shell starts background jobs (`make test &`, nohup)
    with SIGINT ignored, the child inherits that, and Python then never raises KeyboardInterrupt; restore the
    default, as an interactive shell would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_tiny_task(root: Path, n: int, n_train: int, steps: int, faint: bool = False) -> torch.nn.Module:
    """A learnable 4-class 28×28 task in root/data.npz (the first n_train images train, the rest test) and a
    LeNet-5 trained `steps` SGD steps on it, exported to root/lenet.onnx; returns the model (eval mode).

    A class keeps its label under the fine-tuning's augmentation (a horizontal flip, a shift of up to 3 pixels), as
    a real data set's do: class k is a shape drawn in the top (k < 2) or bottom half, a centred square (even k) or
    two bars that are each other's mirror image (odd k). (A square in quadrant k, the task before, became another
    class when flipped, so fine-tuning learnt from wrong labels half the time.) `faint`: shapes 50 levels above a
    noise of 0..199 instead of bright ones on a dark noise, so that pruning costs accuracy (about 94 % dense after 60
    steps, 76 % at 80 % uniform sparsity) and fine-tuned allocations differ."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 200 if faint else 60, (n, 1, 28, 28)).astype(np.uint8)
    for k in range(4):
        rows = slice(3, 11) if k < 2 else slice(17, 25)
        for cols in ((slice(10, 18),) if k % 2 == 0 else (slice(4, 8), slice(20, 24))):  # symmetric about the middle
            x[y == k, :, rows, cols] = (x[y == k, :, rows, cols] + 50) if faint else 220
    np.savez(root / "data.npz", x=x[:n_train], y=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    torch.manual_seed(0)
    model = build_model("lenet5", 1, 4, (0.2,), (0.3,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    xt, yt = torch.from_numpy(x[:n_train]).float() / 255, torch.from_numpy(y[:n_train])  # the training images only
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        batch = torch.arange(i * 50, i * 50 + 50) % n_train
        loss = torch.nn.functional.cross_entropy(model(augment(xt[batch], g)), yt[batch])  # as fine-tuning sees them
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    (root / "lenet.onnx").write_bytes(export.to_onnx_bytes(model, (1, 28, 28)))
    return model


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms: freshly built models have near-zero logits and identity
    BatchNorms, in which a wrong graph edit could hide."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """One folder with the tiny task's lenet.onnx and data.npz (1,000 training and 200 test images, 60 steps), shared
    by every module that only reads them: write elsewhere."""
    root = tmp_path_factory.mktemp("tiny_task")
    make_tiny_task(root, n=1200, n_train=1000, steps=60)
    return root


SEARCHED = ("--sparsity", "0.8", "--reward-size", "300", "--episodes", "12", "--stages", "2", "--reward-images", "200",
            "--finetune-epochs", "0.5", "--device", "cpu")


@pytest.fixture(scope="session")
def searched(tiny_task, tmp_path_factory) -> tuple[Path, str]:
    """One QLP search end to end through the command line (search → choice among 3 candidates → prune → fine-tune →
    export → verify → report) on the tiny task, at SEARCHED's budget: (its output folder, the command it records).
    Shared by the tests of the pipeline and of the report, which only read it."""
    out = tmp_path_factory.mktemp("searched") / "run"
    args = ("search", str(tiny_task / "lenet.onnx"), "--data", str(tiny_task / "data.npz"), *SEARCHED, "--out",
            str(out))
    argv = sys.argv
    sys.argv = ["qlp-compress", *args]  # what the report records as the command
    try:
        run_app(*args)
    finally:
        sys.argv = argv
    return out, "qlp-compress " + shlex.join(args)


# ------------------------------------------------------------------------------------------------ the CLI in-process


@dataclass
class Run:
    """One run of the CLI: its exit code and what it printed."""

    code: int
    stdout: str
    stderr: str

    @property
    def line(self) -> str:
        """The one `error:` line of a failed run: the last line on stderr, and no traceback."""
        assert "Traceback" not in self.stdout + self.stderr, self.stderr[-3000:]
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], self.stderr[-3000:]
        assert "unexpected" not in errors[0], errors[0]
        return errors[0]


@pytest.fixture
def qlp(monkeypatch, capfd):
    """qlp(*args, cwd=folder): the real entry point (`qlp_compress.cli.commands.main`, which turns failures into
    one `error:` line and an exit code) in this process, capturing file descriptors 1 and 2 (onnxruntime's C++
    logs count too). For runs that need signals, kill -9 or a fresh interpreter, use a subprocess."""

    def run(*args, cwd: Path) -> Run:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["qlp-compress", *map(str, args)])
        capfd.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capfd.readouterr()
        return Run(code, out, err)

    return run


def onnx_macs(model: bytes) -> int:
    """Multiply-accumulates of one image through an ONNX model's Conv and Gemm/MatMul layers (shapes inferred)."""
    graph = onnx.shape_inference.infer_shapes(onnx.load_from_string(model)).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info, *graph.output]}
    weights = {w.name: list(w.dims) for w in graph.initializer}
    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            total += math.prod(shapes[node.output[0]][1:]) * math.prod(weights[node.input[1]][1:])
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in weights:
            total += math.prod(weights[node.input[1]])
    return total


@pytest.fixture
def mac_timing(monkeypatch, tmp_path):
    """Latency tables built from a model's multiply-accumulates instead of the clock (1 ms per 10⁶ MACs an image,
    plus 0.01 ms a run), in a cache of their own: for tests of what a channel search does with a table, which must
    not hang on how loaded the machine running the suite is. What the run measures after pruning stays timed."""
    from qlp_compress.pruning import latency, layer_timing

    def fake_time(model: bytes, input_shape, threads: int, repeats: int, warmup: int = 2) -> float:
        return 0.01 + 1e-6 * input_shape[0] * onnx_macs(model)

    def fake_speedup(reference: bytes, candidate: bytes, input_shape, batch: int, threads: int, **_) -> dict:
        dense, pruned = (fake_time(m, (batch, *input_shape), threads, 1) for m in (reference, candidate))
        return {"batch": batch, "threads": threads, "dense_ms": dense, "pruned_ms": pruned, "pruned_min_ms": pruned,
                "speedup": dense / pruned, "runs": 1}

    monkeypatch.setattr(latency, "time_model", fake_time)
    monkeypatch.setattr(layer_timing, "time_model", fake_time)
    monkeypatch.setattr(latency, "measure_speedup", fake_speedup)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "mac-timed-cache"))


def run_app(*args, cwd: Path | None = None, code: int | None = 0):
    """Typer's `app` through `typer.testing.CliRunner`, in this process (from `cwd` when given); checks the exit code
    (None: any) and returns the Result. `app` is not `main()`: a library error is result.exception, not an `error:`
    line (test those with the `qlp` fixture). Usable in module-scoped fixtures too."""
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli.app, [str(a) for a in args])
    finally:
        os.chdir(previous)
    if code is not None and result.exit_code != code:
        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"exit {result.exit_code}, wanted {code}: {result.output[-2000:]}\n{trace[-3000:]}")
    return result


PAUSED_CLI = Path(__file__).with_name("paused_cli.py")


def start_paused(*args, cwd: Path, pause: str | None, marker: Path, env: dict[str, str] | None = None,
                 ) -> subprocess.Popen:
    """The CLI in a subprocess (one torch thread, SIGINT at its default) that stops at `pause` (tests/paused_cli.py:
    "WHERE:N[:AFTER]") and waits there for a signal; `wait_for(marker, process)` returns once it is there. Tests
    signal or kill a run at a point the code reaches, never after a guessed time."""
    marker.unlink(missing_ok=True)
    extra = {"OMP_NUM_THREADS": "1", "QLP_TEST_PAUSED": str(marker), **(env or {})}
    if pause:
        extra["QLP_TEST_PAUSE"] = pause
    return subprocess.Popen([sys.executable, str(PAUSED_CLI), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **extra},
                            preexec_fn=default_sigint)


def near_tie_share(logits: torch.Tensor, tolerance: float = 1e-4) -> float:
    """The share of images whose two best logits lie within float noise of each other (`tolerance` per unit of the
    largest |logit|, at least 1): another kernel's summation order (onnxruntime, another CPU) may flip their top-1,
    so two correct implementations' accuracies may differ by this much, and no more."""
    top2 = logits.float().topk(2, dim=1).values
    scale = logits.abs().amax(dim=1).clamp(min=1.0)
    return float(((top2[:, 0] - top2[:, 1]) <= tolerance * scale).float().mean())


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    """Poll until `path` exists; fail at once when the process ends first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {path} appeared: "
                                 f"{process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def pytest_collection_modifyitems(config, items):
    """The end-to-end (slow) tests first, in their files' order: on several processes (`make test` runs
    pytest-xdist, work-stealing) the minute-long runs then start early, and the short tests fill the end instead of
    one long test running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
