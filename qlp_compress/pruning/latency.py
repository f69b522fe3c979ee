"""A per-layer onnxruntime latency table, measured once per model and machine, and direct speedup measurement.

Each Conv2d / Linear layer is timed alone (Conv + bias + ReLU, or Gemm, as onnxruntime runs it after
fusing BatchNorm) at its input size, the chosen batch and thread count, for every width its input and
output groups may take (multiples of `round_to`, and the full width). The rest of the network (adds,
pooling, the input normalisation) is the measured dense latency minus the layers' sum, scaled with the
activation volume. A pruned network's latency is predicted as the sum; widths between grid points are
interpolated (only when `round_to` is 1). A dropped residual block (depth) removes its layers from the sum and
their outputs from the volume.

The layers' sum does not follow the fused network's latency: layers timed alone pay per-run costs (dispatch,
thread hand-off, output allocation) that weigh more the narrower they are, and how far off the sum is changes with
the load while the table is built. So the table's ratio is mapped onto directly measured networks (uniform widths
of 100 %, 75 %, 50 %, 25 % and the narrowest; with depth also every other block dropped, every block dropped, and
every block dropped at the narrowest widths; minimum latencies, timed alternately with the dense model),
piecewise linearly through those points: the prediction there is their measurement. docs/benchmarks_channel.md
and docs/benchmarks_optimize.md check predictions elsewhere against direct measurement.

Timings are only as good as the machine is quiet, so the build records the load average before and after it,
and `busy_load` says when it exceeded the cores.

The cache is data, not trust (`read_cached`): only a regular file of at most MAX_TABLE_BYTES is read (checked
before opening, and opened without blocking, so a FIFO or a link to /dev/zero is never read), and every field is
checked (types, the exact set of entries, finite positive timings, widths the groups can take). A file that fails
is named in one note and measured again; a prediction that is still not finite stops the run (`speedup`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import atomic_write_json, cache_dir
from qlp_compress.base.messages import console
from qlp_compress.deploy.engine import measure_speedup, time_model
from qlp_compress.pruning.channel_groups import ChannelSpace, LayerShape
from qlp_compress.pruning.latency_cache import BadCache, check_table, read_regular
from qlp_compress.pruning.layer_timing import (
    allowed_widths,
    calibration_units,
    layer_model,
    load_average,
    machine,
    min_ratio,
)

GRID_STEP = 8  # channel step of the table when widths are not rounded (round_to = 1)
TABLE_FORMAT = "qlp-compress/latency/v4"


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured and which widths are allowed."""

    batch: int = 64  # images per run; the speedup target holds at this batch size
    threads: int = 2  # onnxruntime intra-op threads (fixed, so tables and speedups are reproducible)
    round_to: int = 8  # group widths are multiples of this (or the full width); 1 = any width
    repeats: int = 7  # timed runs per table entry (the minimum is kept)


def check_latency_settings(settings: LatencySettings) -> None:
    if settings.batch < 1 or settings.threads < 1 or settings.round_to < 1 or settings.repeats < 1:
        raise UsageError(f"--latency-batch, --threads and --round-to must be ≥ 1 (got {settings.batch}, "
                         f"{settings.threads}, {settings.round_to})")


def _grid(size: int, round_to: int) -> list[int]:
    return allowed_widths(size, round_to if round_to > 1 else GRID_STEP)


def _channels(full: int, group: int | None, width: int | None, sizes: Sequence[int]) -> int:
    """A layer's channel count when its group has `width` of its sizes[group] channels (flatten-aware)."""
    if group is None or width is None:
        return full
    return max(1, round(full * width / sizes[group]))


class LatencyTable:
    """Predicted onnxruntime latency of the network at any group widths."""

    def __init__(self, space: ChannelSpace, data: dict):
        self.space = space
        self.data = data
        self.groups = len(space.groups)
        self.sizes = space.unit_sizes  # units: the groups' channels, then 1 per removable block
        self.block_layers = [set(b.modules) for b in space.blocks]
        self.settings = LatencySettings(**data["settings"])
        # dense (original) and rewritten dense model, timed interleaved: the rewrite's own cost is their ratio
        self.rewrite = data["rewrite"]
        self.entries = {k: float(v) for k, v in data["entries"].items()}
        self.allowed = [allowed_widths(s, self.settings.round_to) for s in space.sizes] + [[0, 1]] * len(space.blocks)
        full = self.sizes
        # what the layer table misses (adds, pooling, reorders); ≥ 0: timed alone, layers carry overheads
        # that the fused network does not
        self.rest_ms = max(0.0, float(self.rewrite["pruned_min_ms"]) - self._layers_ms(full))
        self._volume_full = self._volume(full)
        self.full_ms = self.predict_ms(full)
        self.knots = self._calibrate(data.get("calibration", []))

    # --------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, space: ChannelSpace, dense_onnx: bytes, rewritten_onnx: bytes, input_shape: Sequence[int],
              settings: LatencySettings, model_sha256: str, to_onnx: Callable[[nn.Module], bytes],
              cache: Path | None = None, on_progress=None) -> LatencyTable:
        """Measure (or read from the cache) the table of `space` on this machine; `to_onnx` exports a pruned
        network for the calibration runs."""
        layers = [asdict(layer) for layer in space.layers]
        key = {"format": TABLE_FORMAT, "model_sha256": model_sha256, "layers": layers, "sizes": space.sizes,
               "machine": machine(), "settings": asdict(settings), "input_shape": list(input_shape),
               **({"blocks": [[b.name, list(b.modules)] for b in space.blocks]} if space.blocks else {})}
        key = json.loads(json.dumps(key))  # as it reads back from the file (tuples become lists)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = cache if cache is not None else cache_dir() / "latency"
        path = folder / f"{digest}.json"
        cached = read_cached(path, key, space)
        if cached is not None:
            return cached
        started = time.perf_counter()
        load_before = load_average()
        rewrite = measure_speedup(dense_onnx, rewritten_onnx, input_shape, settings.batch, settings.threads)
        entries: dict[str, float] = {}
        todo = []
        for layer in space.layers:
            for cin, cout in cls._points(layer, space.sizes, settings.round_to):
                k = cls._key(layer, cin, cout)
                if k not in entries:
                    entries[k] = -1.0
                    todo.append((k, layer, cin, cout))
        for done, (k, layer, cin, cout) in enumerate(todo):
            shape = [settings.batch, cin, *layer.in_hw] if layer.kind == "conv" else [settings.batch, cin]
            entries[k] = time_model(layer_model(layer.kind, cin, cout, layer, settings.batch), shape,
                                    settings.threads, settings.repeats)
            if on_progress:
                on_progress(done + 1, len(todo))
        calibration = []  # networks (1.0 = the rewritten full model) timed directly against the dense model
        for widths in calibration_units(space, settings.round_to):
            calibration.append({"widths": widths, **min_ratio(dense_onnx, to_onnx(space.prune(widths)), input_shape,
                                                               settings)})
        data = {"key": key, "settings": asdict(settings), "rewrite": rewrite, "entries": entries,
                "calibration": calibration, "seconds": round(time.perf_counter() - started, 1),
                "load": {"before": load_before, "after": load_average(), "cpus": os.cpu_count()}}
        with contextlib.suppress(OSError, QLPError):  # a read-only cache only costs the measurement next time
            atomic_write_json(path, data)
        return cls(space, {**data, "cached": None, "file": str(path)})

    @staticmethod
    def _points(layer: LayerShape, sizes: Sequence[int], round_to: int) -> list[tuple[int, int]]:
        def options(full: int, group: int | None) -> list[int]:
            if group is None:
                return [full]
            return sorted({_channels(full, group, w, sizes) for w in _grid(sizes[group], round_to)})

        if layer.depthwise:
            return [(c, c) for c in options(layer.out_channels, layer.out_group)]
        return [(a, b) for a in options(layer.in_channels, layer.in_group)
                for b in options(layer.out_channels, layer.out_group)]

    @staticmethod
    def _key(layer: LayerShape, cin: int, cout: int) -> str:
        return json.dumps([layer.kind, cin, cout, layer.kernel, layer.stride, layer.padding, layer.dilation,
                           layer.depthwise, layer.in_hw])

    # ------------------------------------------------------------------------------- predicting

    def _layer_ms(self, layer: LayerShape, widths: Sequence[int]) -> float:
        cin = _channels(layer.in_channels, layer.in_group, widths[layer.in_group] if layer.in_group is not None
                        else None, self.sizes)
        cout = _channels(layer.out_channels, layer.out_group, widths[layer.out_group]
                         if layer.out_group is not None else None, self.sizes)
        if layer.depthwise:
            cin = cout
        exact = self.entries.get(self._key(layer, cin, cout))
        if exact is not None:
            return exact
        points = self._points(layer, self.sizes, self.settings.round_to)  # interpolate on the grid
        ins = sorted({a for a, _ in points})
        outs = sorted({b for _, b in points})

        def at(a: int, b: int) -> float:
            return self.entries[self._key(layer, a, a if layer.depthwise else b)]

        def bracket(grid: list[int], v: int) -> tuple[int, int, float]:
            if len(grid) == 1 or v <= grid[0]:
                return grid[0], grid[0], 0.0
            hi = next((g for g in grid if g >= v), grid[-1])
            lo = max(g for g in grid if g <= hi and (g < v or g == hi))
            return lo, hi, 0.0 if hi == lo else (v - lo) / (hi - lo)

        a0, a1, ta = bracket(ins, cin)
        if layer.depthwise:
            return at(a0, a0) * (1 - ta) + at(a1, a1) * ta
        b0, b1, tb = bracket(outs, cout)
        return ((at(a0, b0) * (1 - tb) + at(a0, b1) * tb) * (1 - ta)
                + (at(a1, b0) * (1 - tb) + at(a1, b1) * tb) * ta)

    def _kept_layers(self, units: Sequence[int]) -> list[LayerShape]:
        """The timed layers still in the network: those of dropped blocks are gone."""
        gone = set().union(*(layers for layers, keep in zip(self.block_layers, units[self.groups:], strict=False)
                             if not keep))
        return [layer for layer in self.space.layers if layer.name not in gone]

    def _layers_ms(self, widths: Sequence[int]) -> float:
        return sum(self._layer_ms(layer, widths) for layer in self._kept_layers(widths))

    def _volume(self, widths: Sequence[int]) -> float:
        """Output activations of the timed layers (what the untimed elementwise ops scale with)."""
        total = 0.0
        for layer in self._kept_layers(widths):
            cout = _channels(layer.out_channels, layer.out_group,
                             widths[layer.out_group] if layer.out_group is not None else None, self.sizes)
            total += cout * (np.prod(layer.in_hw) if layer.in_hw else 1) / (np.prod(layer.stride) or 1)
        return float(total)

    def predict_ms(self, widths: Sequence[int]) -> float:
        """The table's latency at these widths (the layers' sum plus the scaled rest)."""
        return self._layers_ms(widths) + self.rest_ms * self._volume(widths) / self._volume_full

    def _calibrate(self, calibration: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Knots (x, y): x = the table's latency at measured widths ÷ its latency at the full widths, y = the
        measured latency there ÷ the dense model's (1 / measured speedup, minimum latencies). y is made
        non-decreasing in x by pooling adjacent violators (timing noise can invert two close points)."""
        points = [(self.predict_ms(c["widths"]) / self.full_ms, 1.0 / float(c["speedup"]), 1.0) for c in calibration]
        if not points:  # no direct measurement: the table's own ratios, levelled by the rewrite's cost
            points = [(1.0, 1.0 / float(self.rewrite["speedup"]), 1.0)]
        merged: dict[float, list[float]] = {}  # the same x (widths that snapped alike): weighted mean of y
        for x, y, w in points:
            key = round(x, 9)
            sy, sw = merged.get(key, [0.0, 0.0])
            merged[key] = [sy + y * w, sw + w]
        blocks = [[x, sy / sw, sw] for x, (sy, sw) in sorted(merged.items())]  # [x, y, weight], x ascending
        pooled: list[list] = []
        for x, y, w in blocks:
            pooled.append([[x], y, w])
            while len(pooled) > 1 and pooled[-2][1] > pooled[-1][1]:
                (xs1, y1, w1), (xs2, y2, w2) = pooled[-2], pooled.pop()
                pooled[-1] = [xs1 + xs2, (y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2]
        xs = np.array([x for xs_, _, _ in pooled for x in xs_])
        ys = np.array([y for xs_, y, _ in pooled for _ in xs_])
        return xs, ys

    def relative(self, widths: Sequence[int]) -> float:
        """Predicted latency at these widths ÷ the dense (original) model's: the table's ratio to the full widths,
        mapped through the measured knots (see _calibrate); below the narrowest knot, proportionally."""
        x = self.predict_ms(widths) / self.full_ms
        xs, ys = self.knots
        if x < xs[0]:
            return float(ys[0] * x / xs[0])
        if x > xs[-1]:
            return float(ys[-1] * x / xs[-1])
        return float(np.interp(x, xs, ys))

    def speedup(self, widths: Sequence[int]) -> float:
        """Predicted dense (original model) latency ÷ latency at these widths; a QLPError when the table cannot
        predict a finite one (a table that escaped the checks of `read_cached`)."""
        relative = self.relative(widths)
        if not (math.isfinite(relative) and relative > 0):
            where = self.data.get("file") or "its file in the latency cache (qlp-compress/latency under ~/.cache)"
            raise QLPError(f"the latency table predicts a latency ratio of {relative} (not a finite positive number) "
                           f"for widths {list(widths)}; delete {where} and rerun to measure the table again")
        return 1.0 / max(relative, 1e-6)

    def reduction(self, widths: Sequence[int]) -> float:
        """Predicted fraction of the dense latency removed: 1 − 1/speedup."""
        return 1.0 - 1.0 / self.speedup(widths)

    def snap(self, group: int, channels: float) -> int:
        """The allowed width of unit `group` nearest to `channels` (at least the smallest allowed); a block is kept
        (1) from 0.5 up, else dropped (0)."""
        if group >= self.groups:
            return 1 if channels >= 0.5 else 0
        options = self.allowed[group]
        return min(options, key=lambda w: (abs(w - channels), -w))

    def busy_load(self) -> float | None:
        """The highest load average recorded while the table was built, when it exceeded the CPU count (or the
        thread count) by half a core or more: other work then competed for the cores being timed. None when the
        machine was quiet, or for a table that recorded no load."""
        load = self.data.get("load") or {}
        highest = max((v for v in (load.get("before"), load.get("after")) if v is not None), default=None)
        if highest is None or highest < max(load.get("cpus") or 1, self.settings.threads) + 0.5:
            return None
        return highest

    def max_speedup(self) -> float:
        """The predicted speedup of the narrowest widths, every removable block dropped."""
        return self.speedup([a[0] for a in self.allowed])


    def summary(self) -> dict:
        return {"blocks": [b.name for b in self.space.blocks], "batch": self.settings.batch,
                "threads": self.settings.threads, "round_to": self.settings.round_to,
                "dense_ms": round(self.rewrite["dense_ms"], 4),
                "rewritten_dense_ms": round(self.rewrite["pruned_ms"], 4),
                "rewrite_speedup": round(self.rewrite["speedup"], 4), "table_full_ms": round(self.full_ms, 4),
                "rest_ms": round(self.rest_ms, 4), "calibration": self.data.get("calibration"),
                "calibration_knots": [[round(float(x), 4), round(float(y), 4)]
                                      for x, y in zip(*self.knots, strict=True)],
                "entries": len(self.entries),
                "measure_seconds": self.data.get("seconds"), "load_while_built": self.data.get("load"),
                "cached": self.data.get("cached"),
                "machine": machine()}


# ------------------------------------------------------------------------------------ reading the cache


def read_cached(path: Path, key: dict, space: ChannelSpace) -> LatencyTable | None:
    """The table cached at `path` for `key`, or None when there is none or it cannot be used. A file that is
    there but is not a whole table of this key (not a regular file, too large, not JSON, a field of the wrong
    type, entries missing or extra, a timing not finite and positive) is named in a one-line note on stderr; the
    caller measures the table again and writes it over the file."""
    try:
        raw = read_regular(path)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
            raise BadCache(f"is not JSON ({type(e).__name__})") from e
        round_to = key["settings"]["round_to"]
        check_table(data, key, space.sizes, {LatencyTable._key(layer, a, b) for layer in space.layers
                                             for a, b in LatencyTable._points(layer, space.sizes, round_to)},
                    blocks=len(space.blocks))
        try:
            table = LatencyTable(space, {**data, "cached": str(path), "file": str(path)})
            finite = math.isfinite(table.full_ms) and table.full_ms > 0 and math.isfinite(table.max_speedup())
        except (ArithmeticError, QLPError):  # timings so extreme that the sums overflow (or vanish)
            finite = False
        if not finite:
            raise BadCache("predicts latencies that are not finite")
        return table
    except BadCache as e:
        console.print(f"note: the cached latency table {path} {e}; measuring the table again", highlight=False,
                      soft_wrap=True, markup=False)
        return None
