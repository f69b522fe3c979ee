"""The `qlp-compress` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from qlp_compress import __version__
from qlp_compress.base import validate
from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.interrupts import sigterm_as_interrupt
from qlp_compress.base.messages import console
from qlp_compress.base.outputs import check_out_dir
from qlp_compress.deploy.engine import resolve_device
from qlp_compress.deploy.quantize import int8_path, settings_for
from qlp_compress.pruning.allocate import ALLOCATORS, AllocationSettings
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import check_policy, read_policy
from qlp_compress.report.tables import compare_table, evaluation_table, sparsity_table
from qlp_compress.reward.weights import ENGINES, RewardSettings
from qlp_compress.search.curriculum import METHODS, SearchSettings
from qlp_compress.search.env import EnvSettings
from qlp_compress.train.finetune import SCHEDULES, TrainSettings
from qlp_compress.train.zoo import ARCHS
from qlp_compress.workflows import (
    CompressSettings,
    DataSettings,
    ModelSettings,
    Workspace,
    check_can_write,
    check_demonstrations,
    check_sparsity,
    compare,
    compress,
    default_out_dir,
    evaluate_model,
    export_model,
    finetune_pruned,
    open_workspace,
    quantize_file,
    train_model,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress an image classifier: QLP per-layer sparsity search, magnitude pruning, "
                       "fine-tuning, sparse ONNX export, onnxruntime report.")

DataOpt = Annotated[str, typer.Option("--data", help="fashion-mnist, cifar10, a .npz file, or an image folder.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Folder holding fashion-mnist or cifar10 "
                                                                    "(searched instead of the default places).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Compress an image classifier with QLP (deep Q-learning for pruning)."""


@app.command("train")
def train_cmd(
    arch: Annotated[str, typer.Argument(help=f"Architecture: {', '.join(ARCHS)}.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    epochs: Annotated[float, typer.Option(help="Training epochs (fractions allowed).")] = 15.0,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SGD, Nesterov momentum 0.9).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine or onecycle.")] = "cosine",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out.")] = False,
    force: ForceOpt = False,
) -> None:
    """Train a zoo model on the fine-tune split and export it to ONNX with its test accuracy."""
    validate.choice("architecture", arch, tuple(ARCHS))
    validate.positive("--epochs", epochs, "15")
    validate.whole("--batch-size", batch_size, 1, "128")
    validate.positive("--lr", lr, "0.1")
    validate.positive("--weight-decay", weight_decay, "5e-4", zero_ok=True)
    validate.choice("--schedule", schedule, tuple(SCHEDULES))
    validate.seed(seed)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             schedule=schedule, seed=seed, device=resolve_device(device))
    result = train_model(arch, DataSettings(data, data_dir), settings, out, _command(), resume=resume, force=force)
    console.print(f"[green]wrote {escape(str(out))}[/]: test accuracy {result['test_accuracy']:.2%} "
                  f"(onnxruntime, {escape(result['data'])}), trained in {result['train_seconds'] / 60:.1f} min")


@app.command("evaluate")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model file.", exists=True, dir_okay=False)],
    data: Annotated[str | None, typer.Option("--data", help="Data set for accuracy (omit for size/latency only).")]
    = "fashion-mnist",
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    repeats: Annotated[int, typer.Option(help="Timed runs per latency measurement.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Top-1 accuracy, latency (batch 1 and 64), file size and sparsity, measured with onnxruntime."""
    validate.whole("--repeats", repeats, 1, "30")
    result = evaluate_model(model, DataSettings(data, data_dir) if data else None, device, repeats=repeats)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(evaluation_table(result))
    console.print(sparsity_table(result["layers"]))


ModelArg = Annotated[Path, typer.Argument(help="Model file: ONNX, PyTorch module/TorchScript, or a state dict "
                                                "(with --arch).", exists=True, dir_okay=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Zoo architecture of a state-dict checkpoint.")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow full-module pickles (runs code from the file; "
                                                             "only for files you trust).")]
MeanOpt = Annotated[list[float] | None, typer.Option("--mean", help="Per-channel mean to fold in (repeat).")]
StdOpt = Annotated[list[float] | None, typer.Option("--std", help="Per-channel std to fold in (repeat per channel).")]
SparsityOpt = Annotated[float, typer.Option("--sparsity", help="Target global sparsity of the prunable weights, "
                                                               "strictly between 0 and 1.")]
OutDirOpt = Annotated[Path | None, typer.Option("--out", help="Output folder (default: beside the model).")]
EpochsOpt = Annotated[float, typer.Option("--finetune-epochs", help="Fine-tuning epochs on the fine-tune split.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed of search and fine-tuning.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Fine-tuning peak learning rate (cosine decay).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in the same --out.")]
SparseOpt = Annotated[bool, typer.Option("--sparse-storage/--no-sparse-storage",
                                         help="Also write model.sparse.onnx (sparse_initializer).")]
MinDensityOpt = Annotated[float, typer.Option("--min-density", help="global: keep at least this fraction of "
                                                                     "every layer.")]
QuantizeOpt = Annotated[str, typer.Option("--quantize", help="none, or int8: also write an int8 model (onnxruntime "
                                                             "static quantization, calibrated on the reward split).")]
CalibrationOpt = Annotated[int, typer.Option("--calibration-images", help="Reward-split images the int8 "
                                                                          "calibration uses.")]
KeepFloatOpt = Annotated[str, typer.Option("--keep-float", help="Prunable layers left in float in the int8 model: "
                                                                "first, last, first,last or none.")]
MaxLossOpt = Annotated[float, typer.Option("--int8-max-loss", help="Warn when int8 loses more test accuracy than "
                                                                   "this many points (reporting only).")]

StructureOpt = Annotated[str, typer.Option("--structure", help="weight: unstructured zeros (the paper; size only). "
                                                              "channel: remove whole channels for a measured "
                                                              "onnxruntime speedup (a smaller, faster dense model).")]
SpeedupOpt = Annotated[float, typer.Option("--speedup", help="channel: target dense ÷ pruned onnxruntime latency at "
                                                             "--latency-batch (e.g. 2).")]
LatencyBatchOpt = Annotated[int, typer.Option("--latency-batch", help="channel: batch size the speedup target holds "
                                                                      "at (64: throughput serving, where channel "
                                                                      "widths pay off; at batch 1 per-op overhead "
                                                                      "dominates small models).")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="channel: onnxruntime threads for every latency "
                                                           "measurement.")]
RoundToOpt = Annotated[int, typer.Option("--round-to", help="channel: widths are multiples of this (or the full "
                                                            "width); 1 = any width.")]
DistillOpt = Annotated[bool, typer.Option("--distill/--no-distill", help="channel: fine-tune with KL to the dense "
                                                                          "model's logits as well as the labels.")]
STRUCTURES = ("weight", "channel")


def _structure(structure: str) -> bool:
    """True for channel mode; a usage error for an unknown structure."""
    if structure not in STRUCTURES:
        raise UsageError(f"--structure must be weight or channel, got {structure!r}")
    return structure == "channel"


def _channel_settings(method: str, speedup: float, latency_batch: int, threads: int, round_to: int,
                      finetune: TrainSettings | None, distill: bool, **kwargs):
    from qlp_compress.deploy.latency import LatencySettings, check_latency_settings
    from qlp_compress.pruning.widths import check_speedup
    from qlp_compress.workflows import ChannelSettings, check_method

    check_method(method)
    check_speedup(speedup)
    latency = LatencySettings(batch=latency_batch, threads=threads, round_to=round_to)
    check_latency_settings(latency)
    return ChannelSettings(method=method, speedup=speedup, latency=latency, finetune=finetune, distill=distill,
                           **kwargs)


def _workspace(model: Path, data: str, data_dir: Path | None, device: str, arch: str | None, trust_pickle: bool,
               mean: list[float] | None, std: list[float] | None, reward_size: int | None = None) -> Workspace:
    return open_workspace(model, ModelSettings(arch, trust_pickle, tuple(mean) if mean else None,
                                               tuple(std) if std else None),
                          DataSettings(data, data_dir, reward_size), device)


def _command() -> str:
    return "qlp-compress " + shlex.join(sys.argv[1:])


def _check_finetune(epochs_option: str, epochs: float, lr: float, seed: int) -> None:
    validate.positive(epochs_option, epochs, "2", zero_ok=True)
    validate.positive("--lr", lr, "0.01")
    validate.seed(seed)


def _finetune_settings(epochs: float, lr: float, seed: int, device: str) -> TrainSettings | None:
    if epochs <= 0:
        return None
    return TrainSettings(epochs=epochs, lr=lr, warmup_epochs=0.0, seed=seed, device=resolve_device(device))


def _demonstrations(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("none",):
        return ()
    check_demonstrations(names)  # before the (slow) model and data loading
    return names


@app.command("search")
def search_cmd(
    model: ModelArg,
    sparsity: SparsityOpt = 0.9,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    episodes: Annotated[int, typer.Option(help="Search episodes (reward evaluations), all stages together.")] = 400,
    stages: Annotated[int, typer.Option(help="Curriculum stages of increasing sparsity (1 = none).")] = 4,
    passes: Annotated[int, typer.Option(help="Visits per layer in one episode.")] = 4,
    method: Annotated[str, typer.Option(help="qlp, or random (random search, same budget).")] = "qlp",
    demonstrations: Annotated[str, typer.Option(help="Baseline allocations played as the first episodes of every "
                                                     "stage, comma-separated, or 'none'.")]
    = "lamp,erk,global,uniform",
    reward_images: Annotated[int, typer.Option(help="Reward-split images per reward evaluation.")] = 1000,
    reward_size: Annotated[int | None, typer.Option(help="Training images held out as the reward split "
                                                         "[default: 5000, or a tenth of a smaller training split]")]
    = None,
    bn_recalibrate: Annotated[int, typer.Option(help="Re-estimate BatchNorm on this many reward images before "
                                                     "each reward (0 = off).")] = 256,
    reward_finetune_steps: Annotated[int, typer.Option(help="At sparsity ≥ --reward-finetune-from, fine-tune each "
                                                            "candidate this many SGD steps before measuring it "
                                                            "(0 = never).")] = 10,
    reward_finetune_from: Annotated[float, typer.Option(help="Global sparsity from which the reward fine-tunes "
                                                             "briefly.")] = 0.95,
    reward_engine: Annotated[str, typer.Option(help="auto, onnxruntime or torch.")] = "auto",
    finetune_epochs: EpochsOpt = 2.0,
    finetune: Annotated[bool, typer.Option("--finetune/--no-finetune", help="Fine-tune after pruning.")] = True,
    lr: LrOpt = 0.01,
    sparse_storage: SparseOpt = True,
    out: OutDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    structure: StructureOpt = "weight",
    speedup: SpeedupOpt = 2.0,
    latency_batch: LatencyBatchOpt = 64,
    threads: ThreadsOpt = 2,
    round_to: RoundToOpt = 8,
    distill: DistillOpt = True,
    quantize: QuantizeOpt = "none",
    calibration_images: CalibrationOpt = 1024,
    keep_float: KeepFloatOpt = "none",
    int8_max_loss: MaxLossOpt = 1.0,
) -> None:
    """Find per-layer sparsities (or, with --structure channel, layer widths for a speedup) with QLP, prune,
    fine-tune, export a verified ONNX and report."""
    if _structure(structure):
        _channel_search(model, method, speedup, latency_batch, threads, round_to, distill, data, data_dir, episodes,
                        stages, passes, demonstrations, reward_images, reward_size, bn_recalibrate,
                        finetune_epochs if finetune else 0, lr, out, seed, device, arch, trust_pickle, mean, std,
                        resume, force, settings_for(quantize, calibration_images, keep_float, int8_max_loss))
        return
    check_sparsity(sparsity)
    int8 = settings_for(quantize, calibration_images, keep_float, int8_max_loss)
    resolve_device(device)
    demos = _demonstrations(demonstrations)
    validate.choice("--method", method, (*METHODS, *ALLOCATORS))
    validate.curriculum(episodes, stages)
    validate.whole("--passes", passes, 1, "4")
    validate.whole("--reward-images", reward_images, 1, "1000")
    if reward_size is not None:
        validate.whole("--reward-size", reward_size, 1, "5000")
    validate.whole("--bn-recalibrate", bn_recalibrate, 0, "256")
    validate.whole("--reward-finetune-steps", reward_finetune_steps, 0, "10")
    validate.fraction("--reward-finetune-from", reward_finetune_from, 0, 1, "0.95", low_open=True)
    validate.choice("--reward-engine", reward_engine, ENGINES)
    _check_finetune("--finetune-epochs", finetune_epochs, lr, seed)
    validate.normalisation(mean, std)
    out = out or default_out_dir(model, method, sparsity)
    check_out_dir(out, force, resume)
    ws = _workspace(model, data, data_dir, device, arch, trust_pickle, mean, std, reward_size)
    search = SearchSettings(target=sparsity, episodes=episodes, stages=stages, method=method, seed=seed,
                            demonstrations=demos, env=EnvSettings(passes=passes))
    reward = RewardSettings(images=reward_images, engine=reward_engine, bn_recalibrate=bn_recalibrate,
                            finetune_steps=reward_finetune_steps, finetune_from=reward_finetune_from,
                            device=ws.device)
    settings = CompressSettings(method=method, target=sparsity, search=search, reward=reward,
                                finetune=_finetune_settings(finetune_epochs if finetune else 0, lr, seed, device),
                                sparse_storage=sparse_storage, quantize=int8)
    report = compress(model, ws, settings, out, _command(), resume=resume, force=force)
    console.print(f"[green]wrote {escape(str(out))}[/]: model.onnx at sparsity {report['achieved_sparsity']:.4f}, "
                  f"test accuracy "
                  f"{report['accuracy']['finetuned']:.2%} (dense {report['accuracy']['dense']:.2%})")


def _channel_search(model, method, speedup, latency_batch, threads, round_to, distill, data, data_dir, episodes,
                    stages, passes, demonstrations, reward_images, reward_size, bn_recalibrate, finetune_epochs, lr,
                    out, seed, device, arch, trust_pickle, mean, std, resume, force, int8=None) -> None:
    from qlp_compress.pruning.widths import BASELINES
    from qlp_compress.report.progress import search_progress
    from qlp_compress.reward.channels import ChannelRewardSettings
    from qlp_compress.workflows import compress_channels

    resolve_device(device)
    names = tuple(n.strip() for n in demonstrations.split(",") if n.strip())
    demos = None if names == ("lamp", "erk", "global", "uniform") else () if names == ("none",) else names
    unknown = [n for n in demos or () if n not in BASELINES]
    if unknown:
        raise UsageError(f"--demonstrations: unknown channel allocation {unknown[0]!r}; use a comma-separated list "
                         f"of {', '.join(BASELINES)}, or none")
    search = SearchSettings(target=0.5, episodes=episodes, stages=stages, method=method, seed=seed,
                            env=EnvSettings(passes=passes))
    settings = _channel_settings(method, speedup, latency_batch, threads, round_to,
                                 _finetune_settings(finetune_epochs, lr, seed, device), distill, search=search,
                                 reward=ChannelRewardSettings(images=reward_images, bn_recalibrate=bn_recalibrate),
                                 demonstrations=demos, quantize=int8)
    out = out or model.parent / f"{model.stem}.{method}-{speedup:g}x"
    check_out_dir(out, force, resume)
    ws = _workspace(model, data, data_dir, device, arch, trust_pickle, mean, std, reward_size)
    with search_progress(f"{method} channel search", episodes) as on_episode:
        report = compress_channels(model, ws, settings, out, _command(), resume=resume, on_episode=on_episode,
                                   force=force)
    _print_channel_report(out, report)


def _print_channel_report(out: Path, report: dict) -> None:
    speed = ", ".join(f"batch {b}: {v:.2f}×" for b, v in report["measured_speedup"].items())
    console.print(f"[green]wrote {out}[/]: model.onnx measured speedup {speed} (target {report['target_speedup']:g}× "
                  f"at batch {report['latency_batch']}), test accuracy {report['accuracy']['finetuned']:.2%} "
                  f"(dense {report['accuracy']['dense']:.2%})")
    if report["left_whole"]:
        console.print("left whole: " + "; ".join(f"{g['group']} ({g['why']})" for g in report["left_whole"]))


@app.command("prune")
def prune_cmd(
    model: ModelArg,
    sparsity: SparsityOpt = 0.9,
    method: Annotated[str, typer.Option(help=f"Baseline allocator: {', '.join(ALLOCATORS)}.")] = "lamp",
    policy: Annotated[Path | None, typer.Option(help="Apply this policy.json instead of a method.",
                                                dir_okay=False)] = None,
    min_density: MinDensityOpt = 0.0,
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    finetune_epochs: EpochsOpt = 0.0,
    lr: LrOpt = 0.01,
    sparse_storage: SparseOpt = True,
    out: OutDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    structure: StructureOpt = "weight",
    speedup: SpeedupOpt = 2.0,
    latency_batch: LatencyBatchOpt = 64,
    threads: ThreadsOpt = 2,
    round_to: RoundToOpt = 8,
    distill: DistillOpt = True,
    quantize: QuantizeOpt = "none",
    calibration_images: CalibrationOpt = 1024,
    keep_float: KeepFloatOpt = "none",
    int8_max_loss: MaxLossOpt = 1.0,
) -> None:
    """Prune by a baseline allocation (or a policy.json), optionally fine-tune, export and report. With
    --structure channel the methods are uniform, l1 (global filter norm) and bn-slimming."""
    resolve_device(device)
    int8 = settings_for(quantize, calibration_images, keep_float, int8_max_loss)
    if _structure(structure):
        from qlp_compress.workflows import compress_channels

        method = "l1" if method == "lamp" else method
        _check_finetune("--finetune-epochs", finetune_epochs, lr, seed)
        settings = _channel_settings(method, speedup, latency_batch, threads, round_to,
                                     _finetune_settings(finetune_epochs, lr, seed, device), distill, quantize=int8)
        out = out or model.parent / f"{model.stem}.{method}-{speedup:g}x"
        check_out_dir(out, force, resume)
        ws = _workspace(model, data, data_dir, device, arch, trust_pickle, mean, std)
        _print_channel_report(out, compress_channels(model, ws, settings, out, _command(), resume=resume,
                                                     policy_path=policy, force=force))
        return
    chosen = read_policy(policy) if policy is not None else None  # its fields are checked before anything else
    if chosen is not None:
        method, sparsity = chosen.method, chosen.target
    else:
        check_sparsity(sparsity)
        validate.choice("--method", method, (*ALLOCATORS, *METHODS))
    validate.fraction("--min-density", min_density, 0, 1, "0.05", high_open=True)
    _check_finetune("--finetune-epochs", finetune_epochs, lr, seed)
    validate.normalisation(mean, std)
    out = out or default_out_dir(model, method, sparsity)
    check_out_dir(out, force, resume)
    ws = _workspace(model, data, data_dir, device, arch, trust_pickle, mean, std)
    if chosen is not None:
        layers = find_prunable_layers(ws.loaded.module)
        check_policy(chosen, policy, ws.loaded.sha256, [x.name for x in layers], [x.numel for x in layers])
    settings = CompressSettings(method=method, target=sparsity, allocation=AllocationSettings(min_density=min_density),
                                finetune=_finetune_settings(finetune_epochs, lr, seed, device),
                                sparse_storage=sparse_storage, quantize=int8)
    report = compress(model, ws, settings, out, _command(), resume=resume, policy=chosen, force=force)
    console.print(f"[green]wrote {escape(str(out))}[/]: test accuracy {report['accuracy']['finetuned']:.2%} at "
                  f"sparsity "
                  f"{report['achieved_sparsity']:.4f}")


@app.command("compare")
def compare_cmd(
    model: ModelArg,
    sparsity: Annotated[list[float] | None, typer.Option("--sparsity", help="Target sparsity (repeat for several).")]
    = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: qlp, random, global, lamp, erk, uniform.")]
    = "qlp,lamp,global,erk,uniform",
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    episodes: Annotated[int, typer.Option(help="Search episodes for qlp and random.")] = 400,
    reward_images: Annotated[int, typer.Option(help="Reward-split images per reward evaluation.")] = 1000,
    finetune_epochs: EpochsOpt = 1.0,
    lr: LrOpt = 0.01,
    min_density: MinDensityOpt = 0.0,
    out: OutDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    force: ForceOpt = False,
    structure: StructureOpt = "weight",
    speedup: Annotated[list[float] | None, typer.Option("--speedup", help="channel: target speedup (repeat for "
                                                                          "several).")] = None,
    latency_batch: LatencyBatchOpt = 64,
    threads: ThreadsOpt = 2,
    round_to: RoundToOpt = 8,
    distill: DistillOpt = True,
) -> None:
    """Several methods at several sparsities (or speedups, --structure channel), same fine-tuning budget, one
    table."""
    if _structure(structure):
        from qlp_compress.reward.channels import ChannelRewardSettings
        from qlp_compress.workflows import compare_channels

        if methods == "qlp,lamp,global,erk,uniform":
            methods = "qlp,uniform,l1,bn-slimming,random"
        names = [m.strip() for m in methods.split(",") if m.strip()]
        targets = speedup or [2.0]
        settings = _channel_settings(names[0], targets[0], latency_batch, threads, round_to,
                                     _finetune_settings(finetune_epochs, lr, seed, device), distill,
                                     search=SearchSettings(target=0.5, episodes=episodes, seed=seed),
                                     reward=ChannelRewardSettings(images=reward_images))
        out = out or model.parent / f"{model.stem}.compare-channel"
        check_out_dir(out, force, False, resumable=False)
        ws = _workspace(model, data, data_dir, device, arch, trust_pickle, None, None)
        compare_channels(ws, names, targets, settings, out, _command(), force=force)
        console.print(f"[green]wrote {escape(str(out))}/compare.json and compare.md[/]")
        return
    if not sparsity:
        raise UsageError("compare needs --sparsity (repeat for several), or --structure channel with --speedup")
    for target in sparsity:
        check_sparsity(target)
    resolve_device(device)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise UsageError(f"--methods lists no method; give e.g. --methods {','.join((*METHODS, *ALLOCATORS))}")
    for name in names:
        validate.choice("--methods", name, (*METHODS, *ALLOCATORS))
    search = SearchSettings(target=sparsity[0], episodes=episodes, seed=seed)
    if "qlp" in names:  # random search plays the final target only
        validate.curriculum(episodes, search.stages, stages_option=False)
    elif any(name in METHODS for name in names):
        validate.whole("--episodes", episodes, 1, "400")
    validate.whole("--reward-images", reward_images, 1, "1000")
    validate.fraction("--min-density", min_density, 0, 1, "0.05", high_open=True)
    _check_finetune("--finetune-epochs", finetune_epochs, lr, seed)
    out = out or model.parent / f"{model.stem}.compare"
    check_out_dir(out, force, False, resumable=False)
    ws = _workspace(model, data, data_dir, device, arch, trust_pickle, None, None)
    rows = compare(ws, names, sparsity, search, RewardSettings(images=reward_images, device=ws.device),
                   AllocationSettings(min_density=min_density), _finetune_settings(finetune_epochs, lr, seed, device),
                   out, _command(), force=force)
    console.print(compare_table(rows))
    console.print(f"[green]wrote {escape(str(out))}/compare.json and compare.md[/]")


@app.command("finetune")
def finetune_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    epochs: Annotated[float, typer.Option(help="Fine-tuning epochs.")] = 2.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).")] = 0.01,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out.")] = False,
    force: ForceOpt = False,
    quantize: QuantizeOpt = "none",
    calibration_images: CalibrationOpt = 1024,
    keep_float: KeepFloatOpt = "none",
    int8_max_loss: MaxLossOpt = 1.0,
) -> None:
    """Fine-tune an already pruned model with its zeros held (masks = its zero weights); export verified ONNX."""
    int8 = settings_for(quantize, calibration_images, keep_float, int8_max_loss)
    resolve_device(device)
    _check_finetune("--epochs", epochs, lr, seed)
    check_can_write(out, force, out.with_suffix(".ckpt"), resume)
    if int8:
        check_can_write(int8_path(out), force or resume)
    ws = _workspace(model, data, data_dir, device, arch, trust_pickle, None, None)
    result = finetune_pruned(ws, _finetune_settings(epochs, lr, seed, device) or TrainSettings(epochs=0), out,
                             _command(), resume, force, int8=int8)
    console.print(f"[green]wrote {escape(str(out))}[/]: test accuracy {result['accuracy']:.2%} at sparsity "
                  f"{result['global_sparsity']:.4f}")
    if int8:
        _print_int8(result["int8"])


@app.command("export")
def export_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    sparse_storage: Annotated[bool, typer.Option("--sparse-storage", help="Write the sparse_initializer form "
                                                                          "too (FILE.sparse.onnx).")] = False,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    force: ForceOpt = False,
    quantize: QuantizeOpt = "none",
    calibration_images: CalibrationOpt = 1024,
    keep_float: KeepFloatOpt = "none",
    int8_max_loss: MaxLossOpt = 1.0,
) -> None:
    """Export a PyTorch or ONNX model to a verified ONNX file (exact zeros kept, dynamic batch)."""
    int8 = settings_for(quantize, calibration_images, keep_float, int8_max_loss)
    validate.normalisation(mean, std)
    check_can_write(out, force)
    if sparse_storage:
        check_can_write(out.with_suffix(".sparse.onnx"), force)
    if int8:
        check_can_write(int8_path(out), force)
    ws = _workspace(model, data, data_dir, "cpu", arch, trust_pickle, mean, std)
    result = export_model(ws, out, out.with_suffix(".sparse.onnx") if sparse_storage else None, int8=int8)
    console.print(f"[green]wrote {escape(str(out))}[/] ({result['bytes'] / 1e6:.3f} MB, verified: max abs diff "
                  f"{result['max_abs_diff']:.1e})")
    if int8:
        _print_int8(result["int8"])


@app.command("quantize")
def quantize_cmd(
    model: Annotated[Path, typer.Argument(help="Float ONNX classifier.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="int8 ONNX file to write.")],
    data: DataOpt = "fashion-mnist",
    data_dir: DataDirOpt = None,
    reward_size: Annotated[int | None, typer.Option(help="Training images held out as the reward split, which "
                                                         "calibrates (default: 5000, or a tenth of a smaller "
                                                         "training split).")] = None,
    calibration_images: CalibrationOpt = 1024,
    keep_float: KeepFloatOpt = "none",
    int8_max_loss: MaxLossOpt = 1.0,
    force: ForceOpt = False,
) -> None:
    """int8 static quantization (onnxruntime, QDQ, per-channel weights) of any float ONNX classifier, calibrated on
    the reward split; checked (zeros kept, onnx.checker, onnxruntime) and compared with the float model on test."""
    settings = settings_for("int8", calibration_images, keep_float, int8_max_loss)
    _print_int8(quantize_file(model, out, DataSettings(data, data_dir, reward_size), settings, _command(), force))


def _print_int8(r: dict) -> None:
    a = r["accuracy"]
    console.print(f"[green]wrote {r['path']}[/]: int8 test accuracy {a['int8_accuracy']:.2%} (float "
                  f"{a['float_accuracy']:.2%}), {r['bytes'] / 1e6:.3f} MB (float {r['float_bytes'] / 1e6:.3f} MB), "
                  f"all {r['zeros']['float_zeros']:,} zero weights kept")


def main() -> None:
    """Entry point: a failure prints one line (no traceback unless --debug) and exits 1, 2 for usage errors
    (ours and Typer's), or 130 when Ctrl-C or SIGTERM stopped the run."""
    args = sys.argv[1:]
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    if debug:  # accepted before and after the command name: Typer knows it only before
        args = [a for a in args[:end] if a != "--debug"] + args[end:]
    try:
        with sigterm_as_interrupt():
            code = app(args=["--debug", *args] if debug else args, standalone_mode=False)
    except typer.TyperException as e:  # Typer's usage errors: a bad option value, a missing argument, ...
        if type(e).__name__ == "NoArgsIsHelpError":  # no command: the help text was shown
            sys.exit(e.exit_code)
        command = getattr(getattr(e, "ctx", None), "command_path", "qlp-compress")
        _fail(f"{e.format_message().rstrip('.')}; fix the command line (see '{command} --help')",
              getattr(e, "exit_code", 2), debug)
    except QLPError as e:
        _fail(str(e), e.exit_code, debug)
    except KeyboardInterrupt:
        _fail(_interrupted(args), 130, debug)
    except MemoryError:
        _fail("out of memory; ask for less (a smaller model, data set, --episodes or batch) or use a machine with "
              "more memory", 1, debug)
    except Exception as e:  # an unexpected failure: still one line, unless --debug
        first = next((line for line in str(e).splitlines() if line.strip()), "")[:300]
        _fail(f"unexpected {type(e).__name__}: {first} (rerun with --debug for details, and report it)", 1, debug)
    if code == 130:  # Typer turns a KeyboardInterrupt outside our handlers into exit code 130, silently
        _fail(_interrupted(args), 130, False)
    sys.exit(code if isinstance(code, int) else 0)


RESUMABLE = ("search", "prune", "finetune", "train")  # the commands with --resume


def _interrupted(args: list[str]) -> str:
    command = next((a for a in args if not a.startswith("-")), "")
    if command in RESUMABLE:
        return "interrupted; rerun the same command with --resume to continue from its last checkpoint"
    return "interrupted; rerun the command"


def _fail(message: str, code: int, debug: bool) -> None:
    """Print `message` as one line on stderr (the traceback first with --debug) and exit with `code`."""
    if debug:
        traceback.print_exc()
    console.print(f"[red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(code)
