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
  same names.

May import: base, data, deploy, importer, pruning, report, reward, search, train."""

from qlp_compress.workflows.channel_compare import compare_channels
from qlp_compress.workflows.channels import (
    ChannelSettings,
    check_method,
    compress_channels,
    find_widths,
    measure_against_dense,
    open_channels,
    prune_channels_and_finetune,
)
from qlp_compress.workflows.compare import compare
from qlp_compress.workflows.evaluate import evaluate_model
from qlp_compress.workflows.optimize import OptimizeSettings, best_within_budget, held_out
from qlp_compress.workflows.quantize import quantize_beside, quantize_file
from qlp_compress.workflows.train import train_model
from qlp_compress.workflows.weights import (
    CompressSettings,
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
    load_onnx_file,
    measure_onnx,
    open_workspace,
    policy_masks,
)

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
    "check_method",
    "compare",
    "compare_channels",
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
