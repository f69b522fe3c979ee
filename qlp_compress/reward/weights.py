"""The search reward: top-1 accuracy of the pruned, not fine-tuned model on the reward split.

This is the search's hot path (one call per episode), so the model is never copied per call: the
pruned weights are written in place from each layer's precomputed magnitude order.

Two engines:
- "onnxruntime" (default on CPU, about 2–3× faster than PyTorch there): BatchNorm is folded into the
  preceding convolution, the folded model is exported once, and each call writes the masked, folded
  weights into its initializers and opens a session on it.
- "torch" (default on CUDA, and the fallback when a model cannot be traced): masks the weights of one
  model copy in place and runs it.

With `bn_recalibrate`, BatchNorm statistics are re-estimated on a fixed set of reward images after
pruning (in PyTorch) and folded anew before the accuracy is measured.

At extreme sparsity (global sparsity ≥ `finetune_from`) the accuracy of the pruned network says almost
nothing: every allocation scores near chance, and the best-scoring one can fine-tune far worse than
another (see docs/method.md). There the reward first fine-tunes a copy briefly (`finetune_steps` SGD
steps, masks held, on reward-split images other than the measured ones) and then measures it, in PyTorch.
With `finetune_repeats` > 1 it does so that many times, each time from the same pruned model with the
images in another order (seeds 0, 1, …), and returns the mean accuracy.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx, nn
from torch.utils.data import Dataset, TensorDataset

from qlp_compress.base.errors import UsageError
from qlp_compress.data import materialize
from qlp_compress.deploy import engine, export
from qlp_compress.pruning.masks import MagnitudePruner, pruned_count
from qlp_compress.train.finetune import TrainSettings, train
from qlp_compress.train.measure import accuracy, recalibrate_batchnorm

ENGINES = ("auto", "onnxruntime", "torch")


@dataclass(frozen=True)
class RewardSettings:
    """How the reward is measured."""

    images: int = 1000  # reward-split images per evaluation (always the same ones; the CLI default too)
    batch_size: int = 500  # images per forward pass
    engine: str = "auto"  # "onnxruntime" on CPU, "torch" on CUDA, or either by name
    bn_recalibrate: int = 256  # reward images used to re-estimate BatchNorm after pruning (0 = off); without
    #                            it a ResNet-20 pruned to 90 % scores chance level whatever the allocation
    # Brief fine-tuning before measuring, at targets ≥ finetune_from (0 steps = never). Both defaults come from
    # the reward-fidelity gate (benchmarks/reward_fidelity.py; rank correlation with accuracy after 0.3 epoch):
    # at 0.95 the one-shot reward ranks best (+0.75 over 9 allocations; 10 steps +0.68), at 0.98 only 25 steps
    # rank clearly (+0.74 over 13 allocations, one-sided p 0.003; 10 steps +0.21, one-shot −0.04).
    finetune_steps: int = 25
    finetune_from: float = 0.97  # global sparsity from which the reward fine-tunes briefly
    finetune_repeats: int = 1  # brief fine-tunings averaged per evaluation, each with its own image order
    device: str = "cpu"  # where the torch engine runs; "cuda" makes onnxruntime use its CUDA provider


BRIEF_FINETUNE = TrainSettings(epochs=1.0, batch_size=128, lr=0.01, warmup_epochs=0.0, augment=False, seed=0)


class Reward:
    """Callable: per-layer sparsities (network order) → accuracy on the fixed reward images."""

    def __init__(self, model: nn.Module, reward_split: Dataset, settings: RewardSettings):
        if settings.engine not in ENGINES:
            raise UsageError(f"--reward-engine must be one of {', '.join(ENGINES)}, got {settings.engine!r}")
        if settings.finetune_steps < 0 or not 0.0 < settings.finetune_from <= 1.0 or settings.finetune_repeats < 1:
            raise UsageError(f"--reward-finetune-steps must be ≥ 0 (got {settings.finetune_steps}), "
                             f"--reward-finetune-from between 0 and 1 (got {settings.finetune_from}) and "
                             f"the brief fine-tuning repeats ≥ 1 (got {settings.finetune_repeats})")
        self.settings = settings
        self.model = copy.deepcopy(model).eval().to(settings.device)
        self.pruner = MagnitudePruner(self.model)
        self.names = self.pruner.names
        self.numels = self.pruner.numels
        # the brief-fine-tuning threshold in whole weights, rounded as the search rounds its targets: an
        # episode that meets it to the weight is fine-tuned however its count rounded
        self.finetune_from_pruned = round(settings.finetune_from * sum(self.numels))
        brief = settings.finetune_steps * BRIEF_FINETUNE.batch_size
        x, y = materialize(reward_split, limit=settings.images + brief)
        x, y = x.to(settings.device), y.to(settings.device)
        self.x, self.y = x[: settings.images], y[: settings.images]
        # brief fine-tuning trains on the images after the measured ones (on the measured ones when the
        # reward split holds no others)
        self.x_train, self.y_train = (x[settings.images :], y[settings.images :]) if len(x) > settings.images \
            else (self.x, self.y)
        self.calibration = self.x[: settings.bn_recalibrate]
        self.engine = self._choose_engine()
        self.evaluations = 0

    def _choose_engine(self) -> str:
        wanted = self.settings.engine
        if wanted == "auto":
            wanted = "torch" if self.settings.device == "cuda" else "onnxruntime"
        if wanted == "onnxruntime":
            try:
                self._build_onnxruntime()
            except Exception as e:  # an untraceable model: measure with PyTorch instead
                if self.settings.engine == "onnxruntime":
                    raise UsageError(f"the onnxruntime reward engine cannot run this model ({e}); "
                                     "use --reward-engine torch") from e
                return "torch"
        return wanted

    def __call__(self, sparsities: np.ndarray) -> float:
        self.evaluations += 1
        per_layer = dict(zip(self.names, (float(s) for s in sparsities), strict=True))
        pruned = sum(pruned_count(s, n) for s, n in zip(per_layer.values(), self.numels, strict=True))
        brief = self.settings.finetune_steps > 0 and pruned >= self.finetune_from_pruned
        if self.engine == "torch" or self.settings.bn_recalibrate or brief:
            self.pruner.apply(per_layer)
            if self.settings.bn_recalibrate:
                recalibrate_batchnorm(self.model, self.calibration.split(self.settings.batch_size))
        if brief:
            return self._briefly_finetuned_accuracy(per_layer)
        if self.engine == "torch":
            with torch.inference_mode():
                batches = zip(self.x.split(self.settings.batch_size), self.y.split(self.settings.batch_size),
                              strict=True)
                return accuracy(self.model, batches, self.settings.device)
        return self._onnxruntime_accuracy(per_layer)

    def _briefly_finetuned_accuracy(self, per_layer: dict[str, float]) -> float:
        """Accuracy after `finetune_steps` SGD steps on a copy of the pruned model (always the same images), the
        mean over `finetune_repeats` image orders."""
        n = min(len(self.y_train), self.settings.finetune_steps * BRIEF_FINETUNE.batch_size)
        epochs = self.settings.finetune_steps / math.ceil(n / BRIEF_FINETUNE.batch_size)  # exactly that many steps
        masks = self.pruner.masks(per_layer)
        accuracies = []
        for order in range(self.settings.finetune_repeats):
            model = copy.deepcopy(self.model)
            train(model, TensorDataset(self.x_train[:n], self.y_train[:n]),
                  replace(BRIEF_FINETUNE, epochs=epochs, seed=BRIEF_FINETUNE.seed + order,
                          device=self.settings.device), masks=masks)
            with torch.inference_mode():
                batches = zip(self.x.split(self.settings.batch_size), self.y.split(self.settings.batch_size),
                              strict=True)
                accuracies.append(accuracy(model, batches, self.settings.device))
        return sum(accuracies) / len(accuracies)

    # ------------------------------------------------------------------------------ onnxruntime engine

    def _build_onnxruntime(self) -> None:
        traced = fx.GraphModule(self.model, _LeafTracer().trace(self.model))
        modules = dict(traced.named_modules())
        self.bn_of: dict[str, str] = {}  # prunable conv → the BatchNorm folded into it
        for node in traced.graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
                src = node.args[0]
                if (isinstance(src, fx.Node) and src.op == "call_module" and src.target in self.names
                        and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1):
                    self.bn_of[src.target] = node.target
        folded = copy.deepcopy(traced).cpu()
        for bn in self.bn_of.values():
            parent, _, leaf = bn.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, leaf, nn.Identity())
        weights, biases = self._folded_dense()
        generator = torch.Generator().manual_seed(0)
        for name, w, b in zip(self.names, weights, biases, strict=True):
            # placeholders: every call replaces them; random values keep the exporter from merging equal
            # tensors (all-zero biases, say) into one initializer under another name
            layer = folded.get_submodule(name)
            layer.weight = nn.Parameter(torch.randn(w.shape, generator=generator))
            layer.bias = nn.Parameter(torch.randn(b.shape, generator=generator))
        graph = export.export_graph(folded, self.x[:1], opset=17, fold_constants=False, input_name="x",
                                    output_name="logits")
        try:
            self.swap = engine.InitializerSwap(graph, [f"{n}.{p}" for n in self.names for p in ("weight", "bias")],
                                               self.settings.device)
        except KeyError as e:
            raise RuntimeError(f"the exported graph renamed the weight {e}") from e
        self.folded_weights, self.folded_biases = weights, biases
        self.orders = [o.cpu().numpy() for o in self.pruner.order]
        self.x_numpy = [b.cpu().numpy() for b in self.x.split(self.settings.batch_size)]
        self.y_numpy = [b.cpu().numpy() for b in self.y.split(self.settings.batch_size)]
        # check the folded graph against the model itself before trusting it
        with torch.inference_mode():
            expected = self.model(self.x[:8]).cpu().numpy()
        got = engine.outputs(self._session(weights, biases), self.x_numpy[0][:8])
        if not engine.outputs_agree(got, expected)[0]:
            raise RuntimeError("BatchNorm folding changed the outputs")

    def _session(self, weights: list[np.ndarray], biases: list[np.ndarray]):
        """A session on the folded graph with these weights and biases written into its initializers."""
        values = {}
        for name, w, b in zip(self.names, weights, biases, strict=True):
            values[f"{name}.weight"], values[f"{name}.bias"] = w, b
        return self.swap.session(values)

    @torch.no_grad()
    def _folded_dense(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each prunable layer's weight and bias with its BatchNorm (current statistics) folded in."""
        weights, biases = [], []
        for name in self.names:
            layer = self.model.get_submodule(name)
            w = layer.weight.detach().float().cpu()
            b = layer.bias.detach().float().cpu() if layer.bias is not None else torch.zeros(
                layer.weight.shape[0])
            if name in self.bn_of:
                bn = self.model.get_submodule(self.bn_of[name])
                scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).float().cpu()
                w = w * scale.view(-1, *([1] * (w.ndim - 1)))
                b = (b - bn.running_mean.cpu()) * scale + bn.bias.cpu()
            weights.append(np.ascontiguousarray(w.numpy(), dtype=np.float32))
            biases.append(np.ascontiguousarray(b.numpy(), dtype=np.float32))
        return weights, biases

    def _onnxruntime_accuracy(self, per_layer: dict[str, float]) -> float:
        if self.settings.bn_recalibrate:  # weights already masked in place; fold the new statistics
            weights, biases = self._folded_dense()
        else:
            weights, biases = [], self.folded_biases
            for name, dense, order in zip(self.names, self.folded_weights, self.orders, strict=True):
                w = dense.copy()
                w.reshape(-1)[order[: pruned_count(per_layer[name], dense.size)]] = 0.0
                weights.append(w)
        correct, seen = engine.correct_count(self._session(weights, biases), zip(self.x_numpy, self.y_numpy,
                                                                                  strict=True))
        return correct / seen


class _LeafTracer(fx.Tracer):
    """Traces through containers only: every module without children is a leaf, so that modules with
    data-dependent Python inside (onnx2torch's operators, say) are kept whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or next(m.children(), None) is None
