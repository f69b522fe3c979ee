"""Timing pieces of the latency table: the widths a group may take, the networks timed to calibrate it, one layer as
its own ONNX model, the alternate timing of two models, and what the machine was (CPU, vector extensions, load)
while it was timed."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.deploy.engine import ORT_VERSION, time_model
from qlp_compress.pruning.channel_groups import ChannelSpace, LayerShape

if TYPE_CHECKING:
    from qlp_compress.pruning.latency import LatencySettings

CALIBRATION_ROUNDS = 8  # dense and calibration model timed alternately this often (the minimum of each is kept)
CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)  # uniform widths timed directly to calibrate the table


def allowed_widths(size: int, round_to: int) -> list[int]:
    """Widths a group of `size` channels may take, ascending: multiples of round_to below size, and size."""
    if round_to <= 1:
        return list(range(1, size + 1))
    return [w for w in range(round_to, size, round_to)] + [size]


def calibration_units(space: ChannelSpace, round_to: int) -> list[list[int]]:
    """The networks timed directly to calibrate the table: uniform widths (every block kept), and with depth every
    other block dropped, every block dropped, and every block dropped at the narrowest widths."""
    def uniform(fraction: float) -> list[int]:
        return [min(allowed_widths(n, round_to), key=lambda w, n=n: (abs(w - n * fraction), -w)) for n in space.sizes]

    blocks = len(space.blocks)
    points = [uniform(f) + [1] * blocks for f in CALIBRATION_FRACTIONS]
    if blocks:
        points += [uniform(1.0) + [i % 2 for i in range(blocks)], uniform(1.0) + [0] * blocks,
                   uniform(0.0) + [0] * blocks]
    return points


def layer_model(kind: str, cin: int, cout: int, layer: LayerShape, batch: int) -> bytes:
    """One Conv + bias + ReLU (or Gemm) at these channels, as onnxruntime runs the layer after fusing BatchNorm."""
    rng = np.random.default_rng(0)
    if kind == "conv":
        groups = cin if layer.depthwise else 1
        w = rng.random((cout, cin // groups, *layer.kernel), dtype=np.float32)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=list(layer.stride),
                                  pads=list(layer.padding) * 2, dilations=list(layer.dilation), group=groups),
                 helper.make_node("Relu", ["c"], ["y"])]
        shape = [batch, cin, *layer.in_hw]
    else:
        w = rng.random((cout, cin), dtype=np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        shape = [batch, cin]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.random(cout, dtype=np.float32), "b")]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def min_ratio(dense: bytes, candidate: bytes, input_shape: Sequence[int], settings: LatencySettings) -> dict:
    """Dense ÷ candidate minimum latency, the two timed alternately: on the table's own footing (its entries are
    minimums too), so that load on a shared machine while the table is built does not bend the calibration."""
    shape = [settings.batch, *input_shape]
    dense_ms, candidate_ms = float("inf"), float("inf")
    for _ in range(CALIBRATION_ROUNDS):
        dense_ms = min(dense_ms, time_model(dense, shape, settings.threads, settings.repeats))
        candidate_ms = min(candidate_ms, time_model(candidate, shape, settings.threads, settings.repeats))
    return {"speedup": dense_ms / candidate_ms, "dense_min_ms": dense_ms, "min_ms": candidate_ms}


def load_average() -> float | None:
    """The 1-minute load average (runnable threads, this process's included); None where the system has none."""
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None


def machine() -> dict:
    """The host, CPU, vector extensions and onnxruntime version: what a latency depends on."""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"host": platform.node(), "cpu": cpu or platform.processor(), "onnxruntime": ORT_VERSION,
            "cpu_extensions": describe_cpu(cpu_capability())}  # latency depends on the vector extensions
