"""What a run removes, as plug-ins of one pipeline.

Every command that prunes goes the same way (workflows.commands): its options are checked once, the output folder
is claimed, the model and its splits are loaded, then the structure allocates, prunes, fine-tunes
(workspace.recalibrate_and_finetune), exports verified ONNX and reports. What differs between structures is only
what a `Structure` says:

- `names`: the --structure values it serves;
- `cost_option` and `target(how)`: the option that bounds the cost the search removes, and its value (the search's
  target is the share of that cost removed: of the weights, or of the predicted latency);
- `methods(name)`: the searches and its closed-form baselines; `default_prune_method` and `default_compare_methods`;
- `check(how)`: the options only it has;
- `writes(run)`: the files its run writes besides model.onnx, policy.json, report.json and report.md;
- `default_out(model, how)`; `compress(...)`: one run into a folder; `compare(...)`: every method at every target.

A new structure (N:M sparsity, say) is one module with one such class, its name in base.names.STRUCTURES and its
class in `STRUCTURE_CLASSES` (docs/architecture.md sketches one).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError
from qlp_compress.base.names import SEARCH_METHODS, STRUCTURES, structure_name
from qlp_compress.deploy.quantize import QuantizeSettings
from qlp_compress.pruning.allocate import ALLOCATORS, AllocationSettings
from qlp_compress.pruning.latency import check_latency_settings
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import check_policy, read_policy
from qlp_compress.pruning.widths import baselines_for, check_speedup, speedup_to_target
from qlp_compress.report.progress import search_progress
from qlp_compress.reward.channels import ChannelRewardSettings
from qlp_compress.reward.weights import RewardSettings
from qlp_compress.search.curriculum import SearchSettings
from qlp_compress.workflows import channels, weights
from qlp_compress.workflows.channel_compare import compare_channels
from qlp_compress.workflows.compare import compare_weights
from qlp_compress.workflows.options import (
    MAX_LATENCY_BATCH,
    Choice,
    RunOptions,
    demonstrations,
    finetune_settings,
    latency_settings,
    scale_settings,
    search_settings,
    selection_settings,
)
from qlp_compress.workflows.scale import search_title
from qlp_compress.workflows.workspace import Workspace


class WeightStructure:
    """Unstructured zeros (the paper): per-layer sparsities for a global --sparsity; a smaller file, no speedup."""

    names = ("weight",)
    cost_option = "--sparsity"
    compare_on_workers = True  # a cell times nothing: cells may run side by side

    def methods(self, name: str) -> tuple[str, ...]:
        return (*SEARCH_METHODS, *ALLOCATORS)

    def baselines(self, name: str) -> tuple[str, ...]:
        return tuple(ALLOCATORS)

    def default_prune_method(self, name: str) -> str:
        return "lamp"

    def default_compare_methods(self, name: str) -> str:
        return "qlp,lamp,global,erk,uniform"

    def target(self, how: Choice) -> float:
        return how.sparsity

    def with_target(self, how: Choice, target: float) -> Choice:
        return replace(how, sparsity=target)

    def check(self, how: Choice) -> None:
        validate.sparsity(how.sparsity)
        validate.fraction("--min-density", how.min_density, 0, 1, "0.05", high_open=True)

    def writes(self, run: RunOptions) -> tuple[str, ...]:
        return ("model.sparse.onnx",) if run.sparse_storage else ()

    def default_out(self, model: Path, how: Choice) -> Path:
        return weights.default_out_dir(model, how.method, how.sparsity)

    def read_policy(self, how: Choice):
        """A policy.json given with --policy, read and checked before anything else (its method and target become
        the run's); None without one."""
        return None if how.policy is None else read_policy(how.policy)

    def compress(self, run: RunOptions, how: Choice, ws: Workspace, out: Path, int8: QuantizeSettings | None,
                 chosen=None) -> dict:
        if chosen is not None:
            layers = find_prunable_layers(ws.loaded.module)
            paths = [x.name for x in layers]
            chosen = check_policy(chosen, how.policy, ws.loaded.sha256, paths, [x.numel for x in layers],
                                  names=ws.loaded.names_of(paths))
        settings = weights.CompressSettings(
            method=how.method, target=how.sparsity, search=self.search_settings(how, run, how.sparsity),
            reward=self.reward_settings(how, ws), allocation=AllocationSettings(min_density=how.min_density),
            finetune=finetune_settings(run), sparse_storage=run.sparse_storage, quantize=int8,
            selection=selection_settings(how), scale=scale_settings(how))
        return weights.compress(run.model, ws, settings, out, run.command, resume=run.resume, policy=chosen,
                                force=run.force)

    def search_settings(self, how: Choice, run: RunOptions, target: float) -> SearchSettings:
        return search_settings(how, run, target, demonstrations(how, self.baselines(how.structure)))

    def reward_settings(self, how: Choice, ws: Workspace) -> RewardSettings:
        return RewardSettings(images=how.reward_images, engine=how.reward_engine, bn_recalibrate=how.bn_recalibrate,
                              finetune_steps=how.reward_finetune_steps, finetune_from=how.reward_finetune_from,
                              device=ws.device)

    def compare(self, run: RunOptions, how: Choice, ws: Workspace, methods: list[str], targets: list[float],
                out: Path) -> list[dict]:
        # --workers runs whole cells on workers, each cell's search in its worker one episode at a time (K = 1)
        return compare_weights(ws, methods, targets, self.search_settings(replace(how, workers=0), run, targets[0]),
                               RewardSettings(images=how.reward_images, device=ws.device),
                               AllocationSettings(min_density=how.min_density), finetune_settings(run), out,
                               run.command, force=run.force, resume=run.resume, selection=selection_settings(how),
                               scale=scale_settings(how))


class StructuredNetwork:
    """Whole channels, whole residual blocks, or both (workflows.channels): group widths and block keep flags for a
    --speedup of onnxruntime latency predicted by the model's latency table; a smaller, faster network."""

    names = ("channel", "depth", "channel,depth")
    cost_option = "--speedup"
    compare_on_workers = False  # a cell times latency, which must run alone

    def methods(self, name: str) -> tuple[str, ...]:
        return (*SEARCH_METHODS, *baselines_for(name))

    def baselines(self, name: str) -> tuple[str, ...]:
        return baselines_for(name)

    def default_prune_method(self, name: str) -> str:
        """l1 for channels, uniform depth for blocks alone."""
        return "depth" if name == "depth" else "l1"

    def default_compare_methods(self, name: str) -> str:
        return ",".join(("qlp", *baselines_for(name), "random"))

    def target(self, how: Choice) -> float:
        return how.speedup

    def with_target(self, how: Choice, target: float) -> Choice:
        return replace(how, speedup=target)

    def check(self, how: Choice) -> None:
        check_speedup(how.speedup)
        if how.latency_batch > MAX_LATENCY_BATCH:
            raise UsageError(f"--latency-batch must be at most {MAX_LATENCY_BATCH}, got {how.latency_batch}: latency "
                             "is timed at the batch the model will serve; e.g. --latency-batch 64")
        check_latency_settings(latency_settings(how))
        if how.method in SEARCH_METHODS and how.near_best:
            raise UsageError("--near-best searches around the best per-layer sparsities of --structure weight; "
                             f"leave it out with --structure {how.structure}")

    def writes(self, run: RunOptions) -> tuple[str, ...]:
        return ()

    def default_out(self, model: Path, how: Choice) -> Path:
        return model.parent / f"{model.stem}.{how.method}-{how.speedup:g}x"

    def read_policy(self, how: Choice):
        return None  # a channel policy.json is read against the model's groups (workflows.channel_checks)

    def settings(self, how: Choice, run: RunOptions, int8: QuantizeSettings | None) -> channels.ChannelSettings:
        return channels.ChannelSettings(
            structure=how.structure, method=how.method, speedup=how.speedup, latency=latency_settings(how),
            finetune=finetune_settings(run), distill=how.distill,
            search=search_settings(how, run, speedup_to_target(how.speedup)),
            reward=ChannelRewardSettings(images=how.reward_images, bn_recalibrate=how.bn_recalibrate),
            demonstrations=demonstrations(how, self.baselines(how.structure)), quantize=int8,
            scale=scale_settings(how))

    def compress(self, run: RunOptions, how: Choice, ws: Workspace, out: Path, int8: QuantizeSettings | None,
                 chosen=None) -> dict:
        searching = how.method in SEARCH_METHODS and how.policy is None
        title = search_title(f"{how.method} {how.structure} search", scale_settings(how),
                             how.batch_episodes or max(1, how.workers))
        with search_progress(title, how.episodes if searching else 0) as on_episode:
            return channels.compress_channels(run.model, ws, self.settings(how, run, int8), out, run.command,
                                              resume=run.resume, on_episode=on_episode, policy_path=how.policy,
                                              force=run.force)

    def compare(self, run: RunOptions, how: Choice, ws: Workspace, methods: list[str], targets: list[float],
                out: Path) -> list[dict]:
        return compare_channels(ws, methods, targets, self.settings(how, run, None), out, run.command,
                                force=run.force, resume=run.resume)


STRUCTURE_CLASSES = (WeightStructure, StructuredNetwork)
BY_NAME = {name: cls() for cls in STRUCTURE_CLASSES for name in cls.names}
assert set(BY_NAME) == set(STRUCTURES), "every --structure value has one plug-in (base.names.STRUCTURES)"


def structure_for(text: str) -> WeightStructure | StructuredNetwork:
    """The plug-in of a --structure value (any spelling structure_name accepts); an unknown one is a usage error."""
    return _named(text)[0]


def _named(text: str) -> tuple[WeightStructure | StructuredNetwork, str]:
    """(the plug-in, the canonical --structure value) of any spelling."""
    name = structure_name(text)
    validate.choice("--structure", name, STRUCTURES)
    return BY_NAME[name], name


def methods_for(structure: str) -> tuple[str, ...]:
    plugin, name = _named(structure)
    return plugin.methods(name)


def default_prune_method(structure: str) -> str:
    """prune's method when none is given: LAMP for weights, l1 for channels, uniform depth for blocks alone."""
    plugin, name = _named(structure)
    return plugin.default_prune_method(name)


def default_compare_methods(structure: str) -> str:
    plugin, name = _named(structure)
    return plugin.default_compare_methods(name)
