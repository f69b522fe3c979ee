"""What the importer returns (LoadedModel) and what each format's loader is asked (Request), with the checks and
the normalisation every format shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from qlp_compress.base.errors import UsageError
from qlp_compress.base.names import unique
from qlp_compress.train import zoo

MIN_OPSET = 13  # onnx2torch converts opset 13+ well; older graphs are converted up to it
DOWN_OPSETS = (17, 13)  # tried, in order, when onnx2torch has no converter for an operator of a newer opset
VERIFY_BATCH = 2  # images in the batch the conversion is checked on
REEXPORT_HINT = "re-export it with standard operators at opset 13–17 (torch.onnx.export(..., opset_version=17))"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")  # checkpoint wrappers



@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module  # eval mode, CPU, float32
    source: Path  # the file it came from
    sha256: str  # of that file
    format: str  # "onnx", "torchscript", "pytorch-module" or "state-dict"
    input_name: str  # kept on export ("input" when the source has none)
    output_name: str  # kept on export ("logits" when the source has none)
    input_shape: tuple[int, ...] | None  # (C, H, W) when the file fixes it, else None
    num_classes: int | None  # when known
    metadata: dict[str, str]  # ONNX metadata_props of the source (empty for PyTorch)
    layer_names: dict[str, str] = field(default_factory=dict)  # module path → the user's name for the layer, where
    #                                                           they differ (an imported graph; see base.names)

    def names_of(self, paths: Sequence[str]) -> list[str]:
        """The readable names of the layers at these module paths (base.names): what every report shows."""
        return unique([self.layer_names.get(p, p) for p in paths], list(paths))


@dataclass(frozen=True)
class Request:
    """What load_model was asked, passed to the loader of the file's format."""

    path: Path
    arch: str | None
    trust_pickle: bool
    num_classes: int | None
    in_channels: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    verify_input_shape: tuple[int, ...] | None


def normalised(module: nn.Module, request: Request, channels: int | None) -> nn.Module:
    """The module with the requested normalisation folded into its front (zoo.Normalize), eval/CPU/float32."""
    module = module.float().eval().cpu()
    if request.mean is None or request.std is None:
        return module
    check_stats(request, channels)
    return nn.Sequential(zoo.Normalize(request.mean, request.std), module).eval()


def carry_names(names: dict[str, str], before: nn.Module, after: nn.Module) -> dict[str, str]:
    """`names` (module path in `before` → readable name) keyed by the paths of the same modules in `after`, a
    module that contains them (e.g. behind a folded-in normalisation)."""
    by_module = {id(m): names[p] for p, m in before.named_modules() if p in names}
    return {p: by_module[id(m)] for p, m in after.named_modules() if id(m) in by_module}


def check_stats(request: Request, channels: int | None) -> None:
    assert request.mean is not None and request.std is not None
    if len(request.mean) != len(request.std):
        raise UsageError(f"--mean has {len(request.mean)} values but --std has {len(request.std)}; give one "
                         "of each per input channel")
    if channels is not None and len(request.mean) not in (1, channels):
        raise UsageError(f"--mean/--std need {channels} values (one per input channel), got {len(request.mean)}")



def verify_batch(shape: tuple[int, ...], fixed_batch: int | None = None) -> np.ndarray:
    """Real-looking images: pixel values uniform in [0, 1], fixed seed. A file that fixes its batch size B gets
    2·B images, run B at a time through the file itself and all at once through the batch-free rewrite."""
    n = VERIFY_BATCH * (fixed_batch or 1)
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)
