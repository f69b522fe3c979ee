"""Model import: graphs the project did not write (torchvision through torch.onnx at several opsets), the
project's own export, PyTorch files, and every way a file can be refused. References: onnxruntime on the
source file, and the PyTorch model the file was made from."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import sha256_file
from qlp_compress.deploy import export
from qlp_compress.deploy.engine import open_session
from qlp_compress.importer import load_model, unsupported_operators
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.train import zoo

ATOL = 1e-4
IMAGE = (3, 64, 64)  # small images keep torchvision models fast on a CPU


def torch_export(model: nn.Module, path: Path, shape: tuple[int, ...], opset: int | None,
                 input_name: str | None = "input", output_name: str | None = None, dynamic: bool = True) -> None:
    """torch.onnx.export (TorchScript exporter) as a user would call it; opset None is the exporter's default."""
    kwargs: dict = {} if opset is None else {"opset_version": opset}
    if input_name is not None:
        kwargs["input_names"] = [input_name]
    if output_name is not None:
        kwargs["output_names"] = [output_name]
    if dynamic:
        kwargs["dynamic_axes"] = {input_name: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, **kwargs)


def ort_run(model: Path | bytes, x: np.ndarray) -> np.ndarray:
    session = open_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def io_names(model: Path | bytes) -> tuple[str, str]:
    session = open_session(model)
    return session.get_inputs()[0].name, session.get_outputs()[0].name


def images(batch: int, shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def weight_nodes(proto: onnx.ModelProto) -> int:
    """Conv/Gemm (and MatMul) nodes whose weight is a constant: initializer, Constant, or Identity of one."""
    constants = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:  # nodes are topologically sorted
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in constants):
            constants.update(node.output)
    return sum(1 for node in proto.graph.node
               if node.op_type in export.WEIGHT_OPS and len(node.input) > 1 and node.input[1] in constants)


def assert_round_trip(loaded, source: Path, shape: tuple[int, ...]) -> None:
    """Export the loaded module as the pipeline does: same names, same outputs at batch 1 and 3."""
    exported = export.to_onnx_bytes(loaded.module, shape, loaded.input_name, loaded.output_name)
    assert io_names(exported) == (loaded.input_name, loaded.output_name)
    for batch in (1, 3):
        x = images(batch, shape, seed=batch)
        np.testing.assert_allclose(ort_run(exported, x), ort_run(source, x), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------- graphs the project did not write


@pytest.fixture(scope="module")
def torchvision_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"resnet18": torchvision.models.resnet18(weights=None, num_classes=10).eval(),
            "mobilenet_v2": torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()}


# resnet18 keeps the exporter's own output name (a number such as "191", which TorchScript cannot set)
NAMES = {"resnet18": ("pixel_values", None), "mobilenet_v2": ("images", "scores")}


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 17, None], ids=["opset13", "opset17", "default"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_import_and_round_trip(tmp_path, torchvision_models, arch, opset):
    model = torchvision_models[arch]
    source = tmp_path / f"{arch}.onnx"
    torch_export(model, source, IMAGE, opset, *NAMES[arch])
    proto = onnx.load(str(source))
    if opset is not None:
        assert proto.opset_import[0].version == opset

    loaded = load_model(source)

    assert loaded.format == "onnx" and loaded.source == source and loaded.sha256 == sha256_file(source)
    assert (loaded.input_name, loaded.output_name) == io_names(source)
    assert loaded.input_name == NAMES[arch][0]
    assert loaded.input_shape == IMAGE and loaded.num_classes == 10
    assert not loaded.module.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.module.parameters())
    layers = find_prunable_layers(loaded.module)
    assert len(layers) == weight_nodes(proto)
    assert sum(isinstance(layer.module, nn.Linear) for layer in layers) == 1  # the Gemm classifier
    x = images(3, IMAGE)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(), ort_run(source, x), rtol=0, atol=ATOL)
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy(),
                                   rtol=0, atol=ATOL)
    assert_round_trip(loaded, source, IMAGE)


def test_zoo_resnet20_from_project_export(tmp_path):
    torch.manual_seed(0)
    model = zoo.build_model("resnet20", 1, 10, *zoo.DATASET_STATS["fashion-mnist"]).eval()
    source = tmp_path / "resnet20.onnx"
    source.write_bytes(export.with_metadata(export.to_onnx_bytes(model, (1, 28, 28)), {"qlp.arch": "resnet20"}))

    loaded = load_model(source)

    assert (loaded.input_name, loaded.output_name) == (export.INPUT_NAME, export.OUTPUT_NAME)
    assert loaded.input_shape == (1, 28, 28) and loaded.num_classes == 10
    assert loaded.metadata == {"qlp.arch": "resnet20"}
    assert len(find_prunable_layers(loaded.module)) == len(find_prunable_layers(model)) == 20
    assert_round_trip(loaded, source, (1, 28, 28))


class PoolNet(nn.Module):
    """AveragePool, ReduceMean and Reshape: operators whose opset-18+ versions onnx2torch 1.5 lacks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        x = x + x.mean(dim=(2, 3), keepdim=True)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("opset", [11, 20])
@pytest.mark.parametrize("name", ["poolnet", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_old_and_new_opsets(tmp_path, name, opset):
    """Opset 11 is converted up to 13; opset 20 (the exporter's default) has Pad-19, AveragePool-19,
    ReduceMean-18 and Reshape-19, which onnx2torch 1.5 has no converter for: they must still import."""
    torch.manual_seed(0)
    model, shape = ((PoolNet(), (3, 8, 8)) if name == "poolnet"
                    else (zoo.build_model("resnet20", 3, 10, (0.5,) * 3, (0.25,) * 3), (3, 16, 16)))
    source = tmp_path / f"{name}.onnx"
    torch_export(model, source, shape, opset)
    assert onnx.load(str(source)).opset_import[0].version == opset

    loaded = load_model(source)

    assert len(find_prunable_layers(loaded.module)) == len(find_prunable_layers(model))
    with torch.no_grad():
        x = torch.from_numpy(images(2, shape))
        np.testing.assert_allclose(loaded.module(x).numpy(), model.eval()(x).numpy(), rtol=0, atol=ATOL)
    assert_round_trip(loaded, source, shape)


def test_activations_that_became_operators(tmp_path):
    """At the exporter's default opset (20) GELU is one Gelu node, and other exporters write Mish (opset 18)
    as one node; onnx2torch 1.5 has no converter for either and onnx.version_converter cannot take them back
    to opset 17."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 3), nn.GELU(approximate="tanh"),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    source = tmp_path / "gelu.onnx"
    torch_export(model, source, (3, 8, 8), None)
    assert "Gelu" in {node.op_type for node in onnx.load(str(source)).graph.node}
    loaded = load_model(source)
    assert len(find_prunable_layers(loaded.module)) == 3
    same_outputs(loaded.module, model, (3, 8, 8))
    assert_round_trip(loaded, source, (3, 8, 8))

    kernel = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["c"]), helper.make_node("Mish", ["c"], ["m"]),
         helper.make_node("Flatten", ["m"], ["y"])],
        "mish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [kernel])
    source = tmp_path / "mish.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(source))
    assert_round_trip(load_model(source), source, (3, 4, 4))


def test_a_feature_the_older_converter_lacks_is_refused(tmp_path):
    """AveragePool-19 with dilations: onnx2torch's AveragePool converter ignores dilations, and
    onnx.version_converter keeps them when it converts down, so both routes would be silently wrong."""
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2], dilations=[2, 2]),
         helper.make_node("Flatten", ["p"], ["y"])],
        "dilated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])])
    path = tmp_path / "dilated.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))
    with pytest.raises(QLPError, match=r"onnx2torch cannot convert: AveragePool \(opset 19\)"):
        load_model(path)


def linear_graph(tmp_path: Path, kind: str) -> Path:
    """Conv → Flatten → a dense layer written as MatMul + Add (as tf2onnx and others write it) or as a Gemm
    with a (1, N) bias (which onnx2torch leaves as a generic Gemm); symbolic batch."""
    rng = np.random.default_rng(0)
    kernel = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "kernel")
    weight = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "weight")
    bias_shape = (10,) if kind == "matmul_add" else (1, 10)
    bias = numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "bias")
    dense = ([helper.make_node("MatMul", ["flat", "weight"], ["mm"]), helper.make_node("Add", ["mm", "bias"], ["y"])]
             if kind == "matmul_add" else [helper.make_node("Gemm", ["flat", "weight", "bias"], ["y"], alpha=0.5)])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "kernel"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["flat"]), *dense],
        "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [kernel, weight, bias])
    path = tmp_path / f"{kind}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("kind", ["matmul_add", "gemm_2d_bias"])
def test_dense_layers_become_linear(tmp_path, kind):
    source = linear_graph(tmp_path, kind)
    loaded = load_model(source)
    layers = find_prunable_layers(loaded.module)
    assert [type(layer.module) for layer in layers] == [nn.Conv2d, nn.Linear]
    assert layers[1].module.bias is not None
    assert (loaded.input_name, loaded.output_name) == ("x", "y")
    assert_round_trip(loaded, source, (3, 4, 4))


def test_unfaithful_conversion_is_refused(tmp_path, monkeypatch):
    """A conversion that changes the outputs (simulated: a weight nudged after onnx2torch) never loads."""
    from qlp_compress.importer import from_onnx as importer

    def nudged(module):
        original(module)
        with torch.no_grad():
            find_prunable_layers(module)[0].weight.add_(1e-2)

    original = importer.linear_from_matmul
    monkeypatch.setattr(importer, "linear_from_matmul", nudged)
    with pytest.raises(QLPError, match=r"not faithful \(max abs diff"):
        load_model(linear_graph(tmp_path, "matmul_add"))


def test_fixed_batch_is_freed_or_refused(tmp_path):
    """Exported without dynamic axes, the batch is fixed to 1: freed when the graph allows it, else refused."""
    torch.manual_seed(0)
    resnet = zoo.build_model("resnet20", 3, 10, (0.5,) * 3, (0.25,) * 3)
    source = tmp_path / "fixed.onnx"
    torch_export(resnet, source, (3, 16, 16), 17, dynamic=False)
    loaded = load_model(source)
    exported = export.to_onnx_bytes(loaded.module, (3, 16, 16), loaded.input_name, loaded.output_name)
    x = images(3, (3, 16, 16))
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(exported, x), resnet.eval()(torch.from_numpy(x)).numpy(), atol=ATOL)

    baked = tmp_path / "baked.onnx"  # x.view(x.size(0), -1) becomes Reshape to a constant [1, 128]
    torch.manual_seed(0)
    pool_net = PoolNet().eval()
    torch_export(pool_net, baked, (3, 8, 8), 17, dynamic=False)
    assert any(n.op_type == "Reshape" for n in onnx.load(str(baked)).graph.node)
    loaded = load_model(baked)  # the baked batch entry is rewritten to "the input's batch size"
    x = images(5, (3, 8, 8))
    with torch.no_grad():
        expected = pool_net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(), expected, atol=ATOL)
    exported = export.to_onnx_bytes(loaded.module, (3, 8, 8), loaded.input_name, loaded.output_name)
    np.testing.assert_allclose(ort_run(exported, x), expected, atol=ATOL)

    mixing = tmp_path / "mixing.onnx"  # flattens the whole batch into one row: it truly depends on batch 1
    torch_export(BatchFlatNet(), mixing, (3, 8, 8), 17, dynamic=False)
    with pytest.raises(QLPError, match=r"fixed batch size of 1.*dynamic batch axis"):
        load_model(mixing)


class BatchFlatNet(nn.Module):
    """Flattens the whole batch (x.reshape(1, -1)): correct only at batch 1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(x).unsqueeze(0))


def test_symbolic_image_size_needs_a_shape(tmp_path):
    torch.manual_seed(0)
    model = zoo.build_model("resnet20", 3, 10, (0.5,) * 3, (0.25,) * 3).eval()
    source = tmp_path / "any_size.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(source), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(UsageError, match="symbolic"):
        load_model(source)
    with pytest.raises(UsageError, match=r"takes images of shape \[3, '\?', '\?'\] but the data has \[1, 24, 24\]"):
        load_model(source, verify_input_shape=(1, 24, 24))
    loaded = load_model(source, verify_input_shape=(3, 24, 24))
    assert loaded.input_shape is None and loaded.num_classes == 10
    assert_round_trip(loaded, source, (3, 24, 24))


def test_mean_std_are_folded_in_front(tmp_path):
    source = linear_graph(tmp_path, "matmul_add")
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    loaded = load_model(source, mean=mean, std=std)
    x = images(2, (3, 4, 4))
    normalised = (x - np.array(mean, np.float32).reshape(1, 3, 1, 1)) / np.array(std, np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(), ort_run(source, normalised), atol=ATOL)
    assert isinstance(loaded.module[0], zoo.Normalize)
    with pytest.raises(UsageError, match="--mean/--std need 3 values"):
        load_model(source, mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(UsageError, match="go together"):
        load_model(source, mean=(0.1,))


def test_external_data_inside_the_folder_loads(tmp_path):
    source = linear_graph(tmp_path, "matmul_add")
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(source)), str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    loaded = load_model(external)
    x = images(2, (3, 4, 4))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(), ort_run(source, x), atol=ATOL)


# ---------------------------------------------------------------------------------------------- PyTorch


@pytest.fixture
def lenet() -> nn.Sequential:
    torch.manual_seed(0)
    return zoo.build_model("lenet5", 1, 10, *zoo.DATASET_STATS["fashion-mnist"]).eval()


def same_outputs(a: nn.Module, b: nn.Module, shape: tuple[int, ...] = (1, 28, 28)) -> None:
    x = torch.from_numpy(images(3, shape))
    with torch.no_grad():
        np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), rtol=0, atol=ATOL)


def test_full_module_pickle_needs_trust(tmp_path, lenet):
    path = tmp_path / "lenet.pt"
    torch.save(lenet, path)
    with pytest.raises(QLPError, match="--trust-pickle") as refused:
        load_model(path)
    assert "--arch" in str(refused.value) and not isinstance(refused.value, UsageError)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.format == "pytorch-module" and loaded.metadata == {}
    assert (loaded.input_name, loaded.output_name) == ("input", "logits")
    assert len(find_prunable_layers(loaded.module)) == 5
    same_outputs(loaded.module, lenet)


def test_torchscript_file(tmp_path, lenet):
    path = tmp_path / "lenet.ts"
    torch.jit.save(torch.jit.script(lenet), str(path))
    with pytest.raises(UsageError, match="--data"):
        load_model(path)
    loaded = load_model(path, verify_input_shape=(1, 28, 28))
    assert loaded.format == "torchscript" and loaded.num_classes == 10
    assert [type(layer.module) for layer in find_prunable_layers(loaded.module)] == [nn.Conv2d] * 2 + [nn.Linear] * 3
    same_outputs(loaded.module, lenet)
    exported = export.to_onnx_bytes(loaded.module, (1, 28, 28), loaded.input_name, loaded.output_name)
    x = images(3, (1, 28, 28))
    with torch.no_grad():
        np.testing.assert_allclose(ort_run(exported, x), lenet(torch.from_numpy(x)).numpy(), atol=ATOL)


def test_state_dict_with_arch(tmp_path, lenet):
    whole = tmp_path / "whole.pt"
    torch.save(lenet.state_dict(), whole)  # the zoo model with its Normalize: stats come from the file
    loaded = load_model(whole, arch="lenet5")
    assert loaded.format == "state-dict" and loaded.num_classes == 10
    same_outputs(loaded.module, lenet)

    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": lenet[1].state_dict()}, bare)  # a training checkpoint of the bare network
    mean, std = zoo.DATASET_STATS["fashion-mnist"]
    same_outputs(load_model(bare, arch="lenet5", mean=mean, std=std, num_classes=10, in_channels=1).module, lenet)

    legacy = tmp_path / "legacy.pth"  # torch.save's pre-1.6 format: a plain pickle, not a zip
    torch.save(lenet.state_dict(), legacy, _use_new_zipfile_serialization=False)
    same_outputs(load_model(legacy, arch="lenet5").module, lenet)

    with pytest.raises(QLPError, match="does not fit --arch resnet20"):
        load_model(whole, arch="resnet20")
    with pytest.raises(QLPError, match="size mismatch"):
        load_model(whole, arch="lenet5", num_classes=100)


def test_state_dict_without_arch_asks_for_it(tmp_path, lenet):
    path = tmp_path / "weights.pt"
    torch.save(lenet.state_dict(), path)
    with pytest.raises(UsageError, match="--arch"):
        load_model(path)
    with pytest.raises(UsageError, match="unknown architecture"):
        load_model(path, arch="vgg99")


# ----------------------------------------------------------------------------------------------- refusals


def test_missing_garbage_and_truncated_files(tmp_path):
    with pytest.raises(QLPError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n" * 50)
    with pytest.raises(QLPError, match="is not an ONNX or PyTorch model file"):
        load_model(garbage)
    source = linear_graph(tmp_path, "matmul_add")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(QLPError, match="truncated or corrupt ONNX"):
        load_model(truncated)
    broken_zip = tmp_path / "broken.pt"
    broken_zip.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(QLPError, match="damaged"):
        load_model(broken_zip)


def test_checker_failure_names_the_problem(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("Conv", ["missing", "weight"], ["y"])], "broken",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    with pytest.raises(QLPError, match=r"fails onnx\.checker: .*missing.*re-export") as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


def test_unconvertible_operator_is_named(tmp_path):
    """ThresholdedRelu is standard ONNX (onnxruntime runs it) but onnx2torch has no converter for it."""
    rng = np.random.default_rng(0)
    kernel = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "kernel")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "kernel"], ["c"]), helper.make_node("ThresholdedRelu", ["c"], ["t"]),
         helper.make_node("GlobalAveragePool", ["t"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
        "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [kernel])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "odd.onnx"
    onnx.save(proto, str(path))
    assert unsupported_operators(proto) == ["ThresholdedRelu"]
    with pytest.raises(QLPError, match=r"onnx2torch cannot convert: ThresholdedRelu .*opset") as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


def test_external_data_outside_the_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(64 * 10, np.float32).tobytes())
    proto = onnx.load(str(linear_graph(tmp_path, "matmul_add")))
    weight = next(t for t in proto.graph.initializer if t.name == "weight")
    onnx.external_data_helper.set_external_data(weight, location="../secret.bin")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    model = tmp_path / "models" / "model.onnx"
    model.parent.mkdir()
    onnx.save(proto, str(model))
    with pytest.raises(QLPError, match="outside the model's folder"):
        load_model(model)
    next(e for e in weight.external_data if e.key == "location").value = str(secret)  # an absolute path
    onnx.save(proto, str(model))
    with pytest.raises(QLPError, match="outside the model's folder"):
        load_model(model)
