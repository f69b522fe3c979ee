"""Fuzz the command line with damaged inputs: mutated ONNX files (random byte flips, truncations, protobuf
field changes) made from the shipped ResNet-20, mutated .npz data sets and policy.json files, and (with --kinds)
damaged channel-mode latency caches and mutated channel policy.json files.

Every case runs the real command (`qlp_compress.cli.main`, in this process) and must end in one of two ways:
- a correct result: exit 0, and what it wrote is whole (an ONNX file that onnx.checker accepts, JSON that
  parses, an output folder with every file);
- a one-line error: exit 1 or 2, exactly one line on stderr, `error: ...`, no traceback, and not the
  "unexpected ... report it" line of a bug.
Never a hang (each case has a time limit), and never a changed input file (every input is hashed before and
after, and nothing may appear beside it). A damaged latency cache (`cache`: a field changed or removed, NaN or
overflowing timings, truncated, a FIFO, a link to /dev/zero, a folder, a file over the size limit) is data, not a
reason to fail: the channel run must end in a whole result (exit 0) with a finite predicted speedup.

    python benchmarks/fuzz.py --mutations 2000 --seed 1 --json benchmarks/results/fuzz.json
    python benchmarks/fuzz.py --mutations 60 --kinds cache,channel-policy

The slow test (tests/test_fuzz.py) runs a few hundred with a fixed seed. A failing case is written to
--keep DIR with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "resnet20_fmnist.onnx"
CASE_SECONDS = 120  # a case still running after this is a hang
KINDS = {"onnx": 0.70, "npz": 0.15, "policy": 0.15, "cache": 0.15, "channel-policy": 0.15}  # share of the cases
DEFAULT_KINDS = ("onnx", "npz", "policy")
CHANNEL = ["--structure", "channel", "--latency-batch", "2", "--threads", "1", "--round-to", "8",
           "--finetune-epochs", "0", "--device", "cpu"]  # a small table, no fine-tuning: a few seconds a case
MEMORY_LIMIT = 24 << 30  # address space: a mutation that asks for a huge tensor fails instead of taking the machine


class Hang(BaseException):
    """Raised by the alarm in a case that ran past CASE_SECONDS (a BaseException: no handler may swallow it)."""


@dataclass
class Case:
    kind: str  # "onnx:flip", "npz:labels", "policy:value", ...
    what: str  # the mutation, in words
    args: list[str]  # the command line (relative to the work folder)
    inputs: list[str]  # the files it reads, which must not change
    outputs: list[str] = field(default_factory=list)  # what it may write (removed after the case)
    after: Callable[[], None] | None = None  # puts back what the case damaged outside its inputs (the cache)


@dataclass
class Outcome:
    case: Case
    code: int | None
    stderr: str
    seconds: float
    problem: str | None  # None when the case ended in one of the two good ways

    @property
    def verdict(self) -> str:
        if self.problem:
            return "FAIL"
        return "ok" if self.code == 0 else "error"


# ------------------------------------------------------------------------------------------- base inputs


def make_base(folder: Path, rng: np.random.Generator) -> None:
    """The shipped model, a small Fashion-MNIST-shaped .npz, a LeNet-5 and a valid policy.json for it."""
    import torch

    from qlp_compress.base.io import sha256_file
    from qlp_compress.workflows import (
        AllocationSettings,
        Policy,
        allocate,
        build_model,
        find_prunable_layers,
        load_model,
        to_onnx_bytes,
    )

    shutil.copy(SHIPPED, folder / "resnet20.onnx")
    x = rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8)
    y = np.arange(96) % 10
    np.savez(folder / "data.npz", x=x[:64], y=y[:64], x_test=x[64:], y_test=y[64:])
    torch.manual_seed(0)
    lenet = build_model("lenet5", 1, 10, (0.286,), (0.353,)).eval()
    (folder / "lenet.onnx").write_bytes(to_onnx_bytes(lenet, (1, 28, 28)))
    loaded = load_model(folder / "lenet.onnx", verify_input_shape=(1, 28, 28))
    layers = find_prunable_layers(loaded.module)
    names = [layer.name for layer in layers]
    weights = {layer.name: layer.weight.detach() for layer in layers}
    sparsities = allocate("uniform", weights, 0.5, AllocationSettings())
    Policy(method="uniform", target=0.5, layers=names, numels=[layer.numel for layer in layers],
           sparsities=[sparsities[n] for n in names], model_sha256=sha256_file(folder / "lenet.onnx"),
           ).save(folder / "policy.json")


# ------------------------------------------------------------------------------------------- ONNX mutations


def _raw_data_spans(raw: bytes, proto: onnx.ModelProto) -> list[tuple[int, int]]:
    """Where the initializers' raw_data lie in the file (to aim some byte flips at the structure instead)."""
    spans = []
    for tensor in proto.graph.initializer:
        if len(tensor.raw_data) >= 64:
            start = raw.find(tensor.raw_data)
            if start >= 0:
                spans.append((start, start + len(tensor.raw_data)))
    return spans


def flip_bytes(raw: bytes, rng: random.Random, spans: list[tuple[int, int]]) -> tuple[bytes, str]:
    data = bytearray(raw)
    structure = rng.random() < 0.7  # mostly outside the weights, where a flip changes the graph
    count = rng.choice((1, 1, 2, 3, 8, 32))
    positions = []
    while len(positions) < count:
        p = rng.randrange(len(data))
        if structure and any(a <= p < b for a, b in spans):
            continue
        positions.append(p)
    for p in positions:
        data[p] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(data), f"{count} byte(s) flipped {'in the structure' if structure else 'anywhere'}"


def truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice((rng.randrange(0, 64), rng.randrange(len(raw)), len(raw) - rng.randrange(1, 64)))
    return raw[:cut], f"truncated to {cut} of {len(raw)} bytes"


def _random_value(rng: random.Random) -> int:
    return rng.choice((0, -1, 1, 2, 3, 7, 64, 1 << 20, 1 << 40, -(1 << 40)))


def _mutate_node(proto: onnx.ModelProto, rng: random.Random) -> str:
    if not proto.graph.node:
        return "no node left to change"
    node = rng.choice(list(proto.graph.node))
    choice = rng.randrange(7)
    if choice == 0:
        old, node.op_type = node.op_type, rng.choice(("Relu", "Conv", "Gemm", "Identity", "NoSuchOp", "Softmax",
                                                       "MaxPool", "Loop", ""))
        return f"node {node.name} op {old} → {node.op_type!r}"
    if choice == 1 and node.input:
        i = rng.randrange(len(node.input))
        other = rng.choice([n.output[0] for n in proto.graph.node] + ["", "missing", proto.graph.input[0].name])
        node.input[i] = other
        return f"node {node.name} input {i} → {other!r}"
    if choice == 2 and node.attribute:
        attribute = rng.choice(list(node.attribute))
        if attribute.ints:
            attribute.ints[rng.randrange(len(attribute.ints))] = _random_value(rng)
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = rng.choice((float("nan"), float("inf"), -1.0, 0.0, 1e30))
        elif attribute.type == onnx.AttributeProto.INT:
            attribute.i = _random_value(rng)
        else:
            attribute.type = rng.choice((onnx.AttributeProto.STRING, onnx.AttributeProto.GRAPH,
                                         onnx.AttributeProto.TENSOR))
        return f"node {node.name} attribute {attribute.name} changed"
    if choice == 3:
        proto.graph.node.remove(node)
        return f"node {node.name} removed"
    if choice == 4:
        proto.graph.node.append(copy.deepcopy(node))
        return f"node {node.name} duplicated"
    if choice == 5:
        nodes = list(proto.graph.node)
        rng.shuffle(nodes)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        return "nodes shuffled (not topologically sorted)"
    node.domain = rng.choice(("com.microsoft", "ai.onnx.ml", "evil"))
    return f"node {node.name} domain → {node.domain}"


def _mutate_initializer(proto: onnx.ModelProto, rng: random.Random) -> str:
    if not proto.graph.initializer:
        return "no initializer left to change"
    tensor = rng.choice(list(proto.graph.initializer))
    choice = rng.randrange(7)
    if choice == 0 and tensor.dims:
        i = rng.randrange(len(tensor.dims))
        tensor.dims[i] = _random_value(rng)
        return f"initializer {tensor.name} dim {i} → {tensor.dims[i]}"
    if choice == 1:
        tensor.data_type = rng.choice((0, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.STRING,
                                       TensorProto.FLOAT16, TensorProto.BOOL, 99))
        return f"initializer {tensor.name} data_type → {tensor.data_type}"
    if choice == 2:
        tensor.raw_data = tensor.raw_data[: rng.randrange(len(tensor.raw_data) + 1)]
        return f"initializer {tensor.name} raw_data cut to {len(tensor.raw_data)} bytes"
    if choice == 3:
        array = numpy_helper.to_array(tensor).copy()
        if array.dtype.kind == "f" and array.size:
            array.flat[rng.randrange(array.size)] = rng.choice((np.nan, np.inf, -np.inf, 1e38))
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            return f"initializer {tensor.name}: one value non-finite or huge"
    if choice == 4:
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        location = rng.choice(("", ".", "..", "../x.bin", "/etc/passwd", "missing.bin", "sub/", "a\x00b",
                               "resnet20.onnx", "data.npz", "policy.json"))
        tensor.external_data.add(key="location", value=location)
        if rng.random() < 0.5:
            tensor.external_data.add(key="length", value=str(rng.choice((0, 4, 1 << 40, -5))))
        if rng.random() < 0.3:
            tensor.external_data.add(key="offset", value=rng.choice(("0", "12", "-1", "x", str(1 << 40))))
        return f"initializer {tensor.name}: external data {location!r}"
    if choice == 5:
        proto.graph.initializer.remove(tensor)
        return f"initializer {tensor.name} removed"
    tensor.name = rng.choice(("", proto.graph.input[0].name, "renamed", proto.graph.initializer[0].name))
    return f"initializer renamed to {tensor.name!r}"


def _mutate_model(proto: onnx.ModelProto, rng: random.Random) -> str:
    choice = rng.randrange(8)
    if choice == 0:
        proto.ir_version = rng.choice((0, 1, 3, 11, 12, 99, -1))
        return f"ir_version → {proto.ir_version}"
    if choice == 1:
        proto.opset_import[0].version = rng.choice((1, 6, 9, 11, 18, 21, 23, 99, 0))
        return f"opset → {proto.opset_import[0].version}"
    if choice == 2:
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        i = rng.randrange(len(dims))
        if rng.random() < 0.5:
            dims[i].dim_value = rng.choice((0, 1, 3, 27, 1 << 30))
        else:
            dims[i].dim_param = rng.choice(("N", "H", ""))
        return f"input dim {i} changed"
    if choice == 3:
        proto.graph.input[0].type.tensor_type.elem_type = rng.choice((TensorProto.INT64, TensorProto.DOUBLE,
                                                                      TensorProto.UINT8, 0))
        return "input type changed"
    if choice == 4:
        if rng.random() < 0.5 or not proto.graph.output:
            del proto.graph.output[:]
            return "graph outputs removed"
        proto.graph.output.append(copy.deepcopy(proto.graph.output[0]))
        return "graph output duplicated"
    if choice == 5:
        proto.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 1, 28, 28]))
        return "a second graph input"
    if choice == 6:
        proto.metadata_props.add(key="[/red]" * rng.randrange(1, 4), value="x" * rng.randrange(0, 10000))
        return "metadata added"
    dims = proto.graph.output[0].type.tensor_type.shape.dim if proto.graph.output else []
    if dims:
        dims[-1].dim_value = rng.choice((1, 3, 1000))
    return "output class count changed"


def mutate_fields(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    proto = onnx.load_from_string(raw)
    changes = [rng.choice((_mutate_node, _mutate_node, _mutate_initializer, _mutate_initializer,
                           _mutate_model))(proto, rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    return proto.SerializeToString(), "; ".join(changes)


# ------------------------------------------------------------------------------------------- .npz mutations


def mutate_npz(folder: Path, rng: random.Random) -> tuple[bytes | dict[str, np.ndarray], str]:
    with np.load(folder / "data.npz") as f:
        arrays = {k: f[k] for k in f.files}
    choice = rng.randrange(12)
    key = rng.choice(["x", "x_test", "y", "y_test"])
    if choice == 0:  # the file's bytes
        raw = bytearray((folder / "data.npz").read_bytes())
        for _ in range(rng.choice((1, 4, 16))):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw), "bytes flipped"
    if choice == 1:
        raw = (folder / "data.npz").read_bytes()
        return raw[: rng.randrange(len(raw))], "truncated"
    if choice == 2:
        del arrays[key]
        return arrays, f"{key} removed"
    a = arrays[key]
    if key.startswith("x"):
        variants: list[tuple[str, Callable[[], np.ndarray]]] = [
            ("uint16", lambda: a.astype(np.uint16) * 257), ("int8", lambda: (a // 2).astype(np.int8)),
            ("float 0..255", lambda: a.astype(np.float32)), ("float64 in [0,1]", lambda: a / 255.0),
            ("NaN pixel", lambda: _with(a.astype(np.float32) / 255, np.nan)), ("bool", lambda: a > 127),
            ("complex", lambda: a.astype(np.complex64)), ("NHWC", lambda: a.transpose(0, 2, 3, 1)),
            ("no channel axis", lambda: a[:, 0]), ("5-D", lambda: a[:, None]), ("empty", lambda: a[:0]),
            ("20×20", lambda: a[:, :, :20, :20]), ("3 channels", lambda: np.repeat(a, 3, axis=1)),
            ("one image", lambda: a[:1]), ("zero width", lambda: a[:, :, :, :0]), ("strings", lambda: a.astype(str)),
        ]
    else:
        variants = [
            ("column", lambda: a[:, None]), ("one-hot", lambda: np.eye(10, dtype=np.float32)[a]),
            ("float whole", lambda: a.astype(np.float64)), ("float fractions", lambda: a + 0.5),
            ("NaN", lambda: _with(a.astype(np.float32), np.nan)), ("negative", lambda: a - 5),
            ("huge", lambda: _with(a.astype(np.int64), 1 << 40)), ("uint64 huge", lambda: _with(a.astype(np.uint64),
                                                                                              2**63 + 1)),
            ("bool", lambda: a > 4), ("strings", lambda: a.astype(str)), ("one short", lambda: a[:-1]),
            ("scalar", lambda: np.array(3)), ("empty", lambda: a[:0]), ("complex", lambda: a.astype(np.complex64)),
            ("float 1e30", lambda: _with(a.astype(np.float64), 1e30)),
        ]
    name, make = rng.choice(variants)
    arrays[key] = make()
    return arrays, f"{key}: {name}"


def _with(a: np.ndarray, value) -> np.ndarray:
    a = a.copy()
    a.flat[len(a.flat) // 2] = value
    return a


# ------------------------------------------------------------------------------------------- policy mutations


def _paths(doc, prefix=()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def mutate_policy(folder: Path, rng: random.Random, name: str = "policy.json") -> tuple[str, str]:
    text = (folder / name).read_text()
    choice = rng.randrange(6)
    if choice == 0:
        data = bytearray(text.encode())
        for _ in range(rng.choice((1, 3))):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return data.decode("latin1"), "bytes changed"
    if choice == 1:
        return text[: rng.randrange(len(text))], "truncated"
    if choice == 2:
        depth = rng.choice((100, 5000, 100000))
        return "[" * depth + "]" * depth, f"nested {depth} deep"
    doc = json.loads(text)
    path = rng.choice([p for p in _paths(doc) if p])
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if choice == 3:
        del parent[path[-1]]
        return text_of(doc), f"{'/'.join(map(str, path))} removed"
    value = rng.choice(("/../../../../outside", "", "qlp", "random", "lamp", "snip", None, True, 0, -1, 0.5, 1.0,
                        1.5, 1e308, float("nan"), float("inf"), 10**30, [], {}, "x" * 1000, [0.5] * 3))
    parent[path[-1]] = value
    return text_of(doc), f"{'/'.join(map(str, path))} → {str(value)[:40]!r}"


def text_of(doc) -> str:
    return json.dumps(doc, indent=1)


# ------------------------------------------------------------------------------------------- latency caches


def make_channel_base(folder: Path) -> Path:
    """channel.json (a channel policy of lenet.onnx, about half of every group's channels) and the latency cache
    of the channel runs, built by one run; returns the cache file. `--policy channel.json` needs no reachable
    --speedup, so every case runs whatever the machine measures."""
    from qlp_compress.base.io import sha256_file
    from qlp_compress.workflows import ChannelSpace, allowed_widths, load_model

    loaded = load_model(folder / "lenet.onnx", verify_input_shape=(1, 28, 28))
    import torch

    space = ChannelSpace(loaded.module, torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    groups = [{"name": g.name, "module": g.name, "channels": g.size,
               "width": next(w for w in allowed_widths(g.size, 8) if w >= g.size // 2)} for g in space.groups]
    (folder / "channel.json").write_text(text_of({
        "format": "qlp-compress/channel-policy/v1", "structure": "channel", "method": "l1", "target_speedup": 1.5,
        "model_sha256": sha256_file(folder / "lenet.onnx"), "criterion": "l1", "groups": groups}))
    base = Case("base", "the undamaged channel run", ["prune", "lenet.onnx", "--policy", "channel.json", "--data",
                                                      "data.npz", "--out", "base-run", *CHANNEL], [])
    outcome = run_case(base, folder)
    tables = sorted(Path(os.environ["XDG_CACHE_HOME"]).glob("qlp-compress/latency/*.json"))
    if outcome.code != 0 or len(tables) != 1:
        raise SystemExit(f"the base channel run failed ({outcome.code}): {outcome.stderr[-2000:]}")
    return tables[0]


def damage_cache(path: Path, original: str, rng: random.Random) -> str:
    """Damage the cached table at `path` (whole, as `original`) in one way; returns what was done."""
    _remove(path)
    choice = rng.randrange(12)
    if choice == 0:
        os.mkfifo(path)
        return "a FIFO"
    if choice == 1:
        path.symlink_to("/dev/zero")
        return "a link to /dev/zero"
    if choice == 2:
        path.mkdir()
        return "a folder"
    if choice == 3:
        with open(path, "wb") as f:
            f.truncate((64 << 20) + rng.randrange(1, 4096))  # sparse: costs no disk
        return "over the size limit"
    if choice == 4:
        path.write_text(original[: rng.randrange(len(original))])
        return "truncated"
    doc = json.loads(original)
    entries = doc["entries"]
    if choice == 5:
        value = rng.choice((float("nan"), float("inf"), 0.0, -1.0, 1e308, "x", None))
        doc["entries"] = {k: value for k in entries}
        what = f"every entry {value!r}"
    elif choice == 6:
        keys = sorted(entries)
        doc["entries"] = {k: entries[k] for k in rng.sample(keys, rng.randrange(len(keys)))}
        what = "entries dropped"
    elif choice == 7:
        doc["calibration"][rng.randrange(len(doc["calibration"]))]["speedup"] = rng.choice((0, -1, float("nan"), "1"))
        what = "a calibration speedup changed"
    elif choice == 8:
        doc["load"] = rng.choice(("busy", {"before": "x", "after": None, "cpus": 2}, [], None, {"cpus": -1}))
        what = f"load → {str(doc['load'])[:40]!r}"
    else:  # a field anywhere removed or changed (the key and the entries included)
        path_in = rng.choice([q for q in _paths(doc) if q])
        parent = doc
        for k in path_in[:-1]:
            parent = parent[k]
        if choice == 9:
            del parent[path_in[-1]]
            what = f"{'/'.join(map(str, path_in))[:80]} removed"
        else:
            value = rng.choice(("", None, True, 0, -1, 0.5, 1e308, float("nan"), [], {}, "x" * 100, [0.5] * 3))
            parent[path_in[-1]] = value
            what = f"{'/'.join(map(str, path_in))[:80]} → {str(value)[:40]!r}"
    path.write_text(json.dumps(doc, allow_nan=True))
    return what


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _restore(path: Path, original: str) -> Callable[[], None]:
    def restore() -> None:
        _remove(path)
        path.write_text(original)

    return restore


# ------------------------------------------------------------------------------------------- running a case


def make_cases(folder: Path, count: int, seed: int, kinds: tuple[str, ...] = DEFAULT_KINDS,
               table: Path | None = None) -> Iterator[Case]:
    """`count` cases of `kinds` in the shares of KINDS (by default about 70 % ONNX, 15 % .npz, 15 % policy.json),
    each written into `folder` as it comes; `table`: the latency cache file the cache cases damage."""
    rng = random.Random(seed)
    raw = (folder / "resnet20.onnx").read_bytes()
    spans = _raw_data_spans(raw, onnx.load_from_string(raw))
    total = sum(KINDS[k] for k in kinds)
    bounds, edge = [], 0.0
    for k in kinds:
        edge += KINDS[k] / total
        bounds.append((edge, k))
    original = table.read_text() if table is not None else ""
    for i in range(count):
        roll = rng.random()
        kind_of_case = next((k for edge, k in bounds if roll < edge), kinds[-1])
        if kind_of_case == "cache":
            what = damage_cache(table, original, rng)
            yield Case("cache", what, ["prune", "lenet.onnx", "--policy", "channel.json", "--data", "data.npz",
                                       "--out", f"run{i}", *CHANNEL], ["lenet.onnx", "channel.json", "data.npz"],
                       [f"run{i}"], after=_restore(table, original))
        elif kind_of_case == "channel-policy":
            text, what = mutate_policy(folder, rng, "channel.json")
            name = f"c{i}.json"
            (folder / name).write_text(text, encoding="latin1")
            yield Case("channel-policy", what, ["prune", "lenet.onnx", "--policy", name, "--data", "data.npz",
                                                "--out", f"run{i}", *CHANNEL], ["lenet.onnx", name, "data.npz"],
                       [f"run{i}"])
        elif kind_of_case == "onnx":
            kind = rng.choice(("flip", "flip", "truncate", "fields", "fields", "fields"))
            data, what = {"flip": lambda: flip_bytes(raw, rng, spans), "truncate": lambda: truncate(raw, rng),
                          "fields": lambda: mutate_fields(raw, rng)}[kind]()
            name = f"m{i}.onnx"
            (folder / name).write_bytes(data)
            if rng.random() < 0.25:  # through the converter too
                yield Case(f"onnx:{kind}", what, ["export", name, "--data", "data.npz", "--out", f"out{i}.onnx",
                                                  "--no-sparse-storage"],
                           [name, "data.npz"], [f"out{i}.onnx"])
            else:
                yield Case(f"onnx:{kind}", what, ["evaluate", name, "--data", "data.npz", "--repeats", "1",
                                                  "--device", "cpu", "--json"], [name, "data.npz"])
        elif kind_of_case == "npz":
            data, what = mutate_npz(folder, rng)
            name = f"d{i}.npz"
            if isinstance(data, bytes):
                (folder / name).write_bytes(data)
            else:
                np.savez(folder / name, **data)
            yield Case("npz", what, ["evaluate", "resnet20.onnx", "--data", name, "--repeats", "1", "--device", "cpu",
                                     "--json"], ["resnet20.onnx", name])
        else:
            text, what = mutate_policy(folder, rng)
            name = f"p{i}.json"
            (folder / name).write_text(text, encoding="latin1")
            yield Case("policy", what, ["prune", "lenet.onnx", "--policy", name, "--data", "data.npz", "--out",
                                        f"run{i}", "--device", "cpu", "--no-sparse-storage"],
                       ["lenet.onnx", name, "data.npz"], [f"run{i}"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


@contextlib.contextmanager
def _captured() -> Iterator[Path]:
    """stdout and stderr (file descriptors 1 and 2: onnxruntime's C++ logs included) into a temporary file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            os.dup2(fo.fileno(), 1)
            os.dup2(fe.fileno(), 2)
            try:
                yield Path(tmp)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])


def _alarm(signum, frame):
    raise Hang()


def run_case(case: Case, folder: Path) -> Outcome:
    from qlp_compress import cli

    before = {name: _digest(folder / name) for name in case.inputs}
    listing = set(os.listdir(folder))
    code, started = None, time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    with _captured() as tmp:
        sys.argv = ["qlp-compress", *case.args]
        signal.alarm(CASE_SECONDS)
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Hang:
            code = None
        except BaseException as e:
            print(f"escaped main(): {type(e).__name__}: {e}", file=sys.stderr)
            code = -1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        stdout, stderr = (tmp / "out").read_text(errors="replace"), (tmp / "err").read_text(errors="replace")
    seconds = time.perf_counter() - started
    problem = judge(case, folder, code, stdout, stderr, before, listing)
    for name in case.outputs:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    if case.after is not None:
        case.after()
    return Outcome(case, code, stderr, seconds, problem)


def judge(case: Case, folder: Path, code: int | None, stdout: str, stderr: str, before: dict[str, str],
          listing: set[str]) -> str | None:
    """None when the case ended in a correct result or a one-line error; else what went wrong."""
    if code is None:
        return f"hang: still running after {CASE_SECONDS} s"
    changed = [name for name, digest in before.items() if _digest(folder / name) != digest]
    if changed:
        return f"input changed: {changed}"
    added = set(os.listdir(folder)) - listing - set(case.outputs)
    if added:
        return f"files appeared beside the inputs: {sorted(added)}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    if case.kind in ("cache", "channel-policy"):  # channel runs may first warn of a table built on a busy machine
        lines = [line for line in lines if not line.startswith(("warning: ", "note: "))]
    if "Traceback" in stderr + stdout:
        return "traceback"
    if code == 0:
        return check_result(case, folder, stdout)
    if case.kind == "cache":  # the policy and the model are whole: a damaged cache is measured again, never an error
        return f"a damaged cache failed the run: {lines[-1:]}"
    if code not in (1, 2):
        return f"exit code {code}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one error line: {lines[:4]}"
    if lines[0].startswith("error: unexpected"):
        return "an unexpected error (a bug)"
    return None


def check_result(case: Case, folder: Path, stdout: str) -> str | None:
    """An exit-0 case must have produced something whole."""
    try:
        if case.args[0] == "evaluate":
            result = json.loads(stdout)
            if not 0.0 <= result["accuracy"] <= 1.0:
                return f"accuracy {result['accuracy']} outside [0, 1]"
        elif case.args[0] == "export":
            onnx.checker.check_model(onnx.load(str(folder / case.outputs[0])), full_check=True)
        elif case.args[0] == "prune":
            out = folder / case.outputs[0]
            for name in ("model.onnx", "policy.json", "report.json", "report.md"):
                if not (out / name).is_file():
                    return f"exit 0 but {name} is missing"
            report = json.loads((out / "report.json").read_text())
            onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
            for key in ("predicted_speedup", "target_speedup"):  # channel mode: no NaN passes as a prediction
                if key in report and not (isinstance(report[key], float | int) and math.isfinite(report[key])):
                    return f"exit 0 but {key} is {report[key]!r}"
    except Exception as e:
        return f"exit 0 but the result is not whole: {type(e).__name__}: {str(e)[:200]}"
    return None


# ------------------------------------------------------------------------------------------- main


def fuzz(count: int, seed: int, keep: Path | None = None, log: Callable[[str], None] = print,
         kinds: tuple[str, ...] = DEFAULT_KINDS) -> dict:
    import torch

    torch.set_num_threads(1)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > MEMORY_LIMIT:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, hard))
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    unknown = set(kinds) - KINDS.keys()
    if unknown or not kinds:
        raise SystemExit(f"--kinds: {', '.join(sorted(unknown)) or 'none given'}; use some of {', '.join(KINDS)}")
    cache_home = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory(prefix="qlp-fuzz-") as tmp:
        folder = Path(tmp) / "inputs"
        folder.mkdir()
        # this run's caches (the latency tables; matplotlib's and onnxruntime's own files) live beside the inputs
        # folder, not in it, so they never count as files a case wrote beside its inputs
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        make_base(folder, np.random.default_rng(seed))
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            table = make_channel_base(folder) if {"cache", "channel-policy"} & set(kinds) else None
            for i, case in enumerate(make_cases(folder, count, seed, tuple(kinds), table)):
                outcome = run_case(case, folder)
                outcomes.append(outcome)
                if outcome.problem:
                    log(f"FAIL {i} {case.kind} ({case.what}): {outcome.problem}\n  qlp-compress "
                        f"{' '.join(case.args)}\n  {outcome.stderr.strip()[-1500:]}")
                    if keep is not None:
                        keep.mkdir(parents=True, exist_ok=True)
                        for name in case.inputs:
                            shutil.copy(folder / name, keep / f"{i}-{name}")
                        (keep / f"{i}.txt").write_text(f"{case.what}\nqlp-compress {' '.join(case.args)}\n"
                                                       f"{outcome.problem}\n{outcome.stderr}")
                for name in case.inputs:
                    if name not in ("resnet20.onnx", "lenet.onnx", "data.npz", "policy.json", "channel.json"):
                        (folder / name).unlink(missing_ok=True)
        finally:
            os.chdir(cwd)
            if cache_home is None:
                os.environ.pop("XDG_CACHE_HOME", None)
            else:
                os.environ["XDG_CACHE_HOME"] = cache_home
    by_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.case.kind, Counter())[o.verdict] += 1
    messages = Counter(_gist(o) for o in outcomes if o.verdict == "error")
    return {"seed": seed, "cases": len(outcomes), "seconds": round(time.perf_counter() - started, 1),
            "failures": [{"kind": o.case.kind, "what": o.case.what, "command": o.case.args, "problem": o.problem,
                          "stderr": o.stderr[-2000:]} for o in outcomes if o.problem],
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "exit_codes": dict(Counter(str(o.code) for o in outcomes)),
            "slowest_seconds": round(max((o.seconds for o in outcomes), default=0.0), 2),
            "common_errors": dict(messages.most_common(25))}


def _gist(outcome: Outcome) -> str:
    """The first words of an error line, with the case's file names taken out (to count kinds of message)."""
    line = outcome.stderr.strip().splitlines()[-1].removeprefix("error: ")
    for name in outcome.case.inputs:
        line = line.replace(name, "FILE")
    return " ".join(line.split()[:6])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=300, help="cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--keep", type=Path, help="copy failing inputs here")
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                        help=f"what to damage, comma-separated: some of {', '.join(KINDS)}")
    args = parser.parse_args()
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    summary = fuzz(args.mutations, args.seed, args.keep, log=lambda line: print(line, file=sys.stderr, flush=True),
                   kinds=kinds)
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2))
    print(f"{len(summary['failures'])} of {summary['cases']} cases failed")
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
