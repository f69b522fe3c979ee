"""One library call per command. Each takes the command's options in the shared vocabulary (RunOptions: what every
command that reads a model shares; Choice: how per-layer amounts are chosen), validates them once, before anything
is loaded or written, runs the workflow and returns the result document (what `--json` prints)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError
from qlp_compress.base.names import SEARCH_METHODS, is_structured, structure_name
from qlp_compress.base.outputs import check_out_dir
from qlp_compress.base.ownership import check_file_out, check_folder_out, file_checkpoint
from qlp_compress.deploy.engine import resolve_device
from qlp_compress.deploy.quantize import int8_path, settings_for
from qlp_compress.pruning.allocate import AllocationSettings
from qlp_compress.reward.weights import RewardSettings
from qlp_compress.train import ranks
from qlp_compress.train.distributed import as_job, check_nproc
from qlp_compress.train.finetune import SCHEDULES, TrainSettings
from qlp_compress.train.zoo import ARCHS
from qlp_compress.workflows import evaluate, optimize, quantize, train, weights
from qlp_compress.workflows.optimize import OptimizeSettings
from qlp_compress.workflows.options import (
    Choice,
    RunOptions,
    check_choice,
    check_run,
    finetune_settings,
    folder_writes,
    inputs,
    scale_settings,
    selection_settings,
)
from qlp_compress.workflows.scale import check_scale
from qlp_compress.workflows.structures import (
    default_compare_methods,
    default_prune_method,
    methods_for,
    structure_for,
)
from qlp_compress.workflows.workspace import DataSettings, ModelSettings, Workspace, check_can_write, open_workspace


def _workspace(run: RunOptions) -> Workspace:
    return open_workspace(run.model, ModelSettings(run.arch, run.trust_pickle, run.mean, run.std),
                          DataSettings(run.data, run.data_dir, run.reward_size), run.device)






# ------------------------------------------------------------------------------------------------ commands


def search(run: RunOptions, how: Choice) -> dict:
    """`search` and `prune`: choose the per-layer amounts (search, a baseline, or a policy.json), prune, fine-tune,
    export verified ONNX and report, all under run.out (a folder, written as a set)."""
    return as_job(resolve_device(run.device), lambda: _search(run, how))  # torchrun: train.job


def _search(run: RunOptions, how: Choice) -> dict:
    int8 = check_run(run)
    structure = structure_for(how.structure)
    how = replace(how, structure=structure_name(how.structure))
    chosen = structure.read_policy(how)  # weight: a policy.json's fields are checked before anything else
    if chosen is not None:
        how = replace(how, method=chosen.method, sparsity=chosen.target)
    else:
        check_choice(how, structure, searching=True)
    out = run.out or structure.default_out(run.model, how)
    check_folder_out(out, (*inputs(run), how.policy))
    check_out_dir(out, run.force, run.resume, writes=folder_writes(structure, run, int8))
    report = structure.compress(run, how, _workspace(run), out, int8, chosen)
    return {"out": str(out), **report}


def compare_methods(run: RunOptions, how: Choice, methods: list[str]) -> dict:
    """`compare`: every method at every target (sparsity or speedup), the same fine-tuning budget, one table; in weight
    mode the cells run on how.workers Ray workers when it is given."""
    return as_job(resolve_device(run.device), lambda: _compare(run, how, methods))


def _compare(run: RunOptions, how: Choice, methods: list[str]) -> dict:
    check_run(run)
    structure = structure_for(how.structure)
    how = replace(how, structure=structure_name(how.structure))
    if not methods:
        raise UsageError(f"--method lists no method; give e.g. --method {','.join(methods_for(how.structure))}")
    targets = list(how.targets) or ([how.speedup] if structure.cost_option == "--speedup" else [])
    if not targets:
        raise UsageError("compare needs --sparsity (repeat for several), or --structure channel with --speedup")
    for method in methods:
        for target in targets:
            check_choice(structure.with_target(replace(how, method=method, targets=()), target), structure,
                         searching=True)
    check_scale(how.workers, how.worker_threads, None, how.ray_address)
    if how.workers and not structure.compare_on_workers:
        raise UsageError(f"--workers runs compare's cells side by side, and {how.structure} mode measures latency, "
                         f"which runs alone; leave --workers out with --structure {how.structure}")
    suffix = "" if how.structure == "weight" else "-" + how.structure.replace(",", "-")
    out = run.out or run.model.parent / f"{run.model.stem}.compare{suffix}"
    check_folder_out(out, inputs(run))
    check_out_dir(out, run.force, run.resume, writes=("compare.json", "compare.md"))
    rows = structure.compare(run, how, _workspace(run), methods, targets, out)
    return {"out": str(out), "compare_json": str(out / "compare.json"), "compare_md": str(out / "compare.md"),
            "rows": rows}


def optimize_model(run: RunOptions, how: Choice, goal: OptimizeSettings) -> dict:
    """`optimize`: the fastest (or smallest) verified model within goal.max_loss points, in the folder run.out.
    `goal` holds the budget, the objective, the batch and the time budget; the candidates are made as `search` makes
    a QLP run with `how` (at --structure channel,depth for speed, weight for size)."""
    return as_job(resolve_device(run.device), lambda: _optimize_model(run, how, goal))


def _optimize_model(run: RunOptions, how: Choice, goal: OptimizeSettings) -> dict:
    int8 = check_run(run)
    optimize.check_settings(goal)
    speed = goal.objective == "speed"
    structure = structure_name(how.structure if how.structure != "weight" else "channel,depth")
    how = replace(how, method="qlp", structure=structure if speed else "weight",
                  batch_episodes=how.batch_episodes, latency_batch=goal.batch)
    structured = structure_for(structure)
    check_choice(replace(how, speedup=min(goal.speedups), sparsity=min(goal.sparsities)),
                 structure_for(how.structure), searching=True)
    if how.structure not in ("channel", "channel,depth", "weight"):
        raise UsageError(f"optimize searches --structure channel or channel,depth (depth alone cannot be "
                         f"fine-grained enough), not {how.structure}")
    out = run.out or run.model.parent / f"{run.model.stem}.optimize"
    check_folder_out(out, inputs(run))
    check_out_dir(out, run.force, run.resume, writes=("model.onnx", "optimize.json", "report.md", "pareto.png",
                                                      "candidates"))
    ws = _workspace(run)
    weight = structure_for("weight")
    settings = replace(goal, structure=structure, int8=int8, channel=structured.settings(how, run, int8),
                       weight=weights.CompressSettings(
                           search=weight.search_settings(how, run, 0.9), finetune=finetune_settings(run),
                           reward=RewardSettings(images=how.reward_images, device=ws.device),
                           allocation=AllocationSettings(min_density=how.min_density),
                           selection=selection_settings(how), scale=scale_settings(how)))
    report = optimize.best_within_budget(run.model, ws, settings, out, run.command, resume=run.resume,
                                         force=run.force)
    return {"out": str(out), **report}


def finetune(run: RunOptions) -> dict:
    """`finetune`: an already pruned model, its zeros held, fine-tuned and exported to the file run.out."""
    int8 = check_run(run)
    if run.out is None:
        raise UsageError("finetune needs --out FILE.onnx (the file to write)")
    checkpoint = file_checkpoint(run.out)
    if ranks.is_main():  # in a torchrun job only rank 0 writes
        check_file_out(run.out, (checkpoint, *((int8_path(run.out),) if int8 else ())), inputs(run))
        check_can_write(run.out, run.force, checkpoint, run.resume)
    if int8 and ranks.is_main():  # --resume continues a fine-tuning; it never overwrites a file (that takes --force)
        check_can_write(int8_path(run.out), run.force, resume=run.resume)
    ws = _workspace(run)
    result = weights.finetune_pruned(ws, finetune_settings(run) or TrainSettings(epochs=0), run.out, run.command,
                                     run.resume,
                                     run.force, int8=int8)
    return {"path": str(run.out), **result}


def export(run: RunOptions) -> dict:
    """`export`: a PyTorch or ONNX model to a verified ONNX file (and its sparse-storage and int8 forms)."""
    int8 = check_run(run)
    if run.out is None:
        raise UsageError("export needs --out FILE.onnx (the file to write)")
    sparse = run.out.with_suffix(".sparse.onnx") if run.sparse_storage else None
    check_file_out(run.out, [p for p in (sparse, int8_path(run.out) if int8 else None) if p], inputs(run))
    for path in (run.out, sparse, int8_path(run.out) if int8 else None):
        if path is not None:
            check_can_write(path, run.force)
    return weights.export_model(_workspace(run), run.out, sparse, int8=int8)


def evaluate_file(model: Path, data: str | None, data_dir: Path | None, device: str, repeats: int) -> dict:
    """`evaluate`: accuracy (when `data` is given), latency, size and sparsity of an ONNX file."""
    validate.whole("--repeats", repeats, 1, "30")
    return evaluate.evaluate_model(model, DataSettings(data, data_dir) if data else None, device, repeats=repeats)


@dataclass(frozen=True)
class TrainOptions:
    arch: str
    epochs: float = 15.0
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "cosine"


def train_zoo_model(run: RunOptions, how: TrainOptions) -> dict:
    """`train`: a zoo architecture trained on the fine-tune split and exported to the ONNX file run.out."""
    validate.choice("architecture", how.arch, tuple(ARCHS))
    validate.positive("--epochs", how.epochs, "15")
    validate.whole("--batch-size", how.batch_size, 1, "128")
    validate.positive("--lr", how.lr, "0.1")
    validate.positive("--weight-decay", how.weight_decay, "5e-4", zero_ok=True)
    validate.choice("--schedule", how.schedule, tuple(SCHEDULES))
    validate.seed(run.seed)
    check_nproc(run.nproc, resolve_device(run.device))
    if run.out is None:
        raise UsageError("train needs --out FILE.onnx (the file to write)")
    if ranks.is_main():  # in a torchrun job only rank 0 writes
        check_file_out(run.out, (file_checkpoint(run.out),), inputs(run)[1:])
    settings = TrainSettings(epochs=how.epochs, batch_size=how.batch_size, lr=how.lr, weight_decay=how.weight_decay,
                             schedule=how.schedule, seed=run.seed, device=resolve_device(run.device), nproc=run.nproc)
    result = train.train_model(how.arch, DataSettings(run.data, run.data_dir), settings, run.out, run.command,
                               resume=run.resume, force=run.force)
    return {"path": str(run.out), **result}


def quantize_model(run: RunOptions) -> dict:
    """`quantize`: any float ONNX classifier → a verified int8 file, calibrated on the reward split."""
    settings = settings_for("int8", run.calibration_images, run.keep_float, run.int8_max_loss)
    if run.out is None:
        raise UsageError("quantize needs --out FILE.onnx (the file to write)")
    check_file_out(run.out, (), inputs(run))
    return quantize.quantize_file(run.model, run.out, DataSettings(run.data, run.data_dir, run.reward_size), settings,
                                  run.command, run.force)


# the CLI's defaults, which depend on --structure (re-exported: the CLI reads this module only)
__all__ = ["SEARCH_METHODS", "Choice", "OptimizeSettings", "RunOptions", "TrainOptions", "compare_methods",
           "default_compare_methods", "default_prune_method", "evaluate_file", "export", "finetune", "is_structured",
           "optimize_model", "quantize_model", "search", "structure_name", "train_zoo_model"]
