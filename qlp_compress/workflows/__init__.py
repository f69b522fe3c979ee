"""Workflows: what each command does, as library calls. The CLI calls these and nothing below them; the
benchmarks call them too.

- workspace: data and model settings, the loaded model with its splits, checks before work starts, verified
  export and measurement of ONNX files;
- commands: one library call per command, taking the options vocabulary every command shares;
- weights: weight mode (unstructured zeros): search / allocate, prune, fine-tune, export, report; finetune; export;
- selection: a QLP search's answer chosen among its best allocations by fine-tuning them (weight mode);
- channels: the structured modes (whole channels, residual blocks, or both, removed for a measured speedup);
- optimize: the fastest (or smallest) model within an accuracy budget, with the Pareto front of its candidates;
- options: the commands' options checked once and turned into the workflows' settings;
- compare (weight mode), channel_compare (the structured modes), evaluate, train, quantize: the commands of the
  same names;
- the research surface (re-exported below): what the benchmarks use beyond the commands, so that they import
  nothing of the package but this namespace and base (tools/architecture.py checks it).

May import: base, data, deploy, importer, pruning, report, reward, search, train."""

from qlp_compress.workflows.channel_compare import compare_channels
from qlp_compress.workflows.channels import (
    ChannelSettings,
    compress_channels,
    find_widths,
    measure_against_dense,
    open_channels,
    prune_channels_and_finetune,
)
from qlp_compress.workflows.compare import compare_weights
from qlp_compress.workflows.evaluate import evaluate_model
from qlp_compress.workflows.optimize import OptimizeSettings, best_within_budget, held_out
from qlp_compress.workflows.quantize import quantize_beside, quantize_file
from qlp_compress.workflows.selection import SelectionSettings, candidates, select
from qlp_compress.workflows.train import train_model
from qlp_compress.workflows.weights import (
    CompressSettings,
    allocator,
    check_demonstrations,
    compress,
    default_out_dir,
    export_model,
    find_policy,
    finetune_pruned,
    prune_weights_and_finetune,
)
from qlp_compress.workflows.workspace import (
    DataSettings,
    ModelSettings,
    Workspace,
    check_can_write,
    export_bytes,
    export_verified,
    held_out_images,
    load_onnx_file,
    measure_onnx,
    open_workspace,
    policy_masks,
)

# isort: split
# The research surface the benchmarks use (benchmarks/*.py import only this namespace and base): the settings of
# each concern, the search and its reward, pruning's pieces, data access, models and training, and the engine's
# measurements. Re-exported as they are; the parts below own them.
from qlp_compress.data import (
    TensorImages,
    iterate_batches,
    load_dataset,
    load_fashion_mnist,
    make_splits,
    materialize,
)
from qlp_compress.deploy.engine import measure_latency, open_session, session_accuracy, use_threads
from qlp_compress.deploy.export import to_onnx_bytes, to_sparse_storage
from qlp_compress.deploy.quantize import QuantizeSettings, write_int8
from qlp_compress.importer import load_model
from qlp_compress.pruning.allocate import AllocationSettings, allocate, proportional
from qlp_compress.pruning.channel_groups import ChannelSpace
from qlp_compress.pruning.latency import LatencySettings, allowed_widths, min_ratio
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import Policy
from qlp_compress.reward.channels import ChannelRewardSettings
from qlp_compress.reward.spec import make_spec
from qlp_compress.reward.weights import Reward, RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.agent import AgentSettings
from qlp_compress.search.curriculum import SearchSettings, curriculum_targets, run_search, scored_in_turn
from qlp_compress.search.env import EnvSettings, PruningEnv
from qlp_compress.train.distributed import fit
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.train.measure import accuracy
from qlp_compress.train.zoo import DATASET_STATS, UNLIKE_RESNET, build_model

__all__ = [
    "ChannelSettings",
    "CompressSettings",
    "DataSettings",
    "ModelSettings",
    "OptimizeSettings",
    "Workspace",
    "best_within_budget",
    "check_can_write",
    "check_demonstrations",
    "compare_channels",
    "compare_weights",
    "compress",
    "compress_channels",
    "default_out_dir",
    "evaluate_model",
    "export_bytes",
    "export_model",
    "export_verified",
    "find_policy",
    "find_widths",
    "finetune_pruned",
    "held_out",
    "load_onnx_file",
    "measure_against_dense",
    "measure_onnx",
    "open_channels",
    "open_workspace",
    "policy_masks",
    "prune_channels_and_finetune",
    "prune_weights_and_finetune",
    "quantize_beside",
    "quantize_file",
    "train_model",
]

# the research surface: settings of each concern
__all__ += [
    "AgentSettings",
    "AllocationSettings",
    "ChannelRewardSettings",
    "EnvSettings",
    "LatencySettings",
    "QuantizeSettings",
    "RewardSettings",
    "ScaleSettings",
    "SearchSettings",
    "SelectionSettings",
    "TrainSettings",
]
# the search and its reward
__all__ += [
    "PruningEnv",
    "Reward",
    "allocator",
    "candidates",
    "curriculum_targets",
    "make_spec",
    "run_search",
    "scored_in_turn",
    "select",
]
# pruning's pieces
__all__ += [
    "ChannelSpace",
    "Policy",
    "allocate",
    "allowed_widths",
    "find_prunable_layers",
    "min_ratio",
    "proportional",
]
# data access
__all__ += [
    "TensorImages",
    "held_out_images",
    "iterate_batches",
    "load_dataset",
    "load_fashion_mnist",
    "make_splits",
    "materialize",
]
# models and training
__all__ += [
    "DATASET_STATS",
    "UNLIKE_RESNET",
    "accuracy",
    "build_model",
    "fit",
    "load_model",
]
# the engine's measurements and the deployed files
__all__ += [
    "measure_latency",
    "open_session",
    "session_accuracy",
    "to_onnx_bytes",
    "to_sparse_storage",
    "use_threads",
    "write_int8",
]
