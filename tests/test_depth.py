"""Depth: the removable residual blocks are the ones the architectures define, and dropping one equals the model
with that block's branch output set to zero (its sum then passes the shortcut alone), through PyTorch and through
the exported ONNX file in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from conftest import trained_looking
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock

from qlp_compress.base.errors import QLPError
from qlp_compress.deploy.engine import open_session
from qlp_compress.deploy.export import to_onnx_bytes
from qlp_compress.importer import load_model
from qlp_compress.pruning.depth import drop_blocks, find_blocks, trace
from qlp_compress.train.zoo import build_model

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "resnet20_fmnist.onnx"


def _models():
    torch.manual_seed(0)
    yield "shipped resnet20 (onnx2torch)", load_model(SHIPPED, verify_input_shape=(1, 28, 28)).module, (1, 28, 28)
    yield "zoo resnet20 (option A)", build_model("resnet20", 1, 10, (0.5,), (0.25,)), (1, 28, 28)
    yield "torchvision resnet18", torchvision.models.resnet18(num_classes=10), (3, 64, 64)
    yield "torchvision mobilenet_v2", torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64)


MODELS = {name: (trained_looking(model), shape) for name, model, shape in _models()}


def _with_zero_branches(model: torch.nn.Module, example: torch.Tensor, blocks) -> torch.nn.Module:
    """The reference: the traced model with each block's branch output replaced by zeros."""
    gm = trace(model, example)
    nodes = {n.name: n for n in gm.graph.nodes}
    for block in blocks:
        end = nodes[block.branch[-1]]
        assert end.op == "call_module"
        gm.get_submodule(end.target).register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    return gm


def _expected_count(model: torch.nn.Module) -> int:
    """What the architecture itself says: blocks without a trained shortcut."""
    if any(isinstance(m, BasicBlock) for m in model.modules()):
        return sum(1 for m in model.modules() if isinstance(m, BasicBlock) and m.downsample is None)
    if any(isinstance(m, InvertedResidual) for m in model.modules()):
        return sum(1 for m in model.modules() if isinstance(m, InvertedResidual) and m.use_res_connect)
    return 9  # CIFAR ResNet-20: 3 stages of 3 blocks, every shortcut an identity or option A (parameter-free)


@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_are_the_architectures_own_and_dropping_equals_a_zero_branch(name):
    model, shape = MODELS[name]
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    blocks = find_blocks(model, x)
    assert len(blocks) == _expected_count(model)
    assert len({b.name for b in blocks}) == len(blocks)
    chosen = [blocks[0], blocks[len(blocks) // 2], blocks[-1]]
    dropped = drop_blocks(model, x, [b.name for b in chosen])
    with torch.no_grad():
        assert torch.allclose(trace(model, x)(x), model(x), atol=1e-6)  # the traced copy is the model
        reference = _with_zero_branches(model, x, chosen)(x)
        assert torch.allclose(dropped(x), reference, atol=1e-5)
        assert (dropped(x) - model(x)).abs().max() > 1e-2 * model(x).abs().max()  # the blocks did compute something
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in dropped.parameters())
    assert removed == sum(b.parameters for b in chosen)
    assert len(find_blocks(dropped, x)) == len(blocks) - len(chosen)


def test_the_exported_file_has_fewer_operators_and_agrees_with_pytorch():
    model, shape = MODELS["shipped resnet20 (onnx2torch)"]
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2))
    blocks = find_blocks(model, x)
    dropped = drop_blocks(model, x, [b.name for b in blocks[::2]])
    full, thin = (onnx.load_from_string(to_onnx_bytes(m, shape)) for m in (model, dropped))

    def convs(proto):
        return sum(n.op_type == "Conv" for n in proto.graph.node)

    assert convs(full) - convs(thin) == 2 * len(blocks[::2])  # two convolutions in each ResNet basic block
    session = open_session(thin.SerializeToString())
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, dropped(x).numpy(), atol=1e-4, rtol=1e-4)


def test_models_without_removable_blocks_and_unknown_names():
    vgg = build_model("plain_vgg", 1, 10, (0.5,), (0.25,)).eval()
    x = torch.rand(2, 1, 28, 28)
    assert find_blocks(vgg, x) == []
    model, shape = MODELS["torchvision resnet18"]
    with pytest.raises(QLPError, match=r"not removable residual blocks: layer2\.0"):  # its shortcut is a trained conv
        drop_blocks(model, torch.rand(2, *shape), ["layer2.0"])
