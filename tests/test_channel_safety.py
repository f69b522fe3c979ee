"""Channel groups are checked for what they compute, not only for running: a group is kept only when removing its
channels equals the model whose removed channels write zeros; and an ONNX file's flatten (a Reshape to a constant
shape) no longer keeps the last convolution whole."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qlp_compress.deploy.engine import open_session
from qlp_compress.deploy.export import to_onnx_bytes
from qlp_compress.importer import load_model
from qlp_compress.pruning.channel_groups import ChannelSpace, _silenced
from qlp_compress.pruning.shortcuts import rewrite_flattens


class Flip(nn.Module):
    """Reverses the channel order: Torch-Pruning takes it for an element-wise op and would remove the wrong input
    channels of the next convolution (the shapes still fit, so a forward pass alone cannot tell)."""

    def forward(self, x):
        return x.flip(1)


class FlipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.flip = nn.Conv2d(1, 8, 3, padding=1), Flip()
        self.b, self.c = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b(self.flip(torch.relu(self.a(x)))))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


class FlattenNet(nn.Module):
    """Convolutions, then `flatten(1)` into a Linear layer (no global pooling): the ONNX file holds a Reshape."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Linear(16 * 6 * 6, 32), nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_group_whose_channels_the_library_maps_wrongly_is_left_whole():
    torch.manual_seed(0)
    space = ChannelSpace(FlipNet().eval(), torch.rand(1, 1, 12, 12))
    assert [name for name, _ in space.unsafe] == ["a"]
    assert "changes what the other channels compute" in space.unsafe[0][1]
    assert [g.name for g in space.groups] == ["b", "c"]
    x = torch.rand(3, 1, 12, 12)
    for index, group in enumerate(space.groups):  # the groups kept remove exactly what silencing them removes
        widths = [g.size for g in space.groups]
        widths[index] = group.size // 2
        removed = group.order("l1")[: group.size - widths[index]]
        with torch.no_grad():
            pruned = space.prune(widths)(x)
            reference = _silenced(space.model, [(layer, removed) for layer in group.layers])(x)
        assert torch.allclose(pruned, reference, atol=1e-5)


def test_an_onnx_flatten_lets_the_last_convolution_be_pruned(tmp_path):
    torch.manual_seed(0)
    model = FlattenNet().eval()
    path = tmp_path / "flatten.onnx"
    path.write_bytes(to_onnx_bytes(model, (1, 12, 12)))
    imported = load_model(path, verify_input_shape=(1, 12, 12)).module
    x = torch.rand(1, 1, 12, 12)
    rewritten, count = rewrite_flattens(imported, x)
    assert count == 1
    with torch.no_grad():
        assert torch.equal(rewritten(x), imported(x))
    reference = ChannelSpace(model, x)  # the PyTorch original: torch.flatten, which the library follows
    space = ChannelSpace(imported, x)
    assert space.unsafe == [] and len(space.groups) == len(reference.groups) == 3  # a, b and fc1
    pruned = space.prune([g.size // 2 for g in space.groups])
    batch = torch.rand(5, 1, 12, 12)
    session = open_session(to_onnx_bytes(pruned, (1, 12, 12)))
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(batch).numpy(), atol=1e-4, rtol=1e-4)
