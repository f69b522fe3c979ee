"""The `qlp-compress` commands: each parses its options, calls one workflow (qlp_compress.workflows.commands) and
prints the result (qlp_compress.cli.output). No logic lives here."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer
from rich.text import Text

from qlp_compress import __version__
from qlp_compress.cli import options as o
from qlp_compress.cli.output import compressed_lines, emit, set_quiet
from qlp_compress.report import tables
from qlp_compress.workflows import commands as run_command
from qlp_compress.workflows.commands import Choice, RunOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 100},
                  help="Compress an image classifier for onnxruntime: QLP (deep Q-learning) chooses how much to "
                       "prune in each layer, then prune, fine-tune, export verified ONNX and report accuracy, "
                       "latency and size. Start with `search`.")


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
    """Compress an image classifier for onnxruntime. Start with `search`."""


def _command() -> str:
    return "qlp-compress " + shlex.join(sys.argv[1:])


def _run(*, mean: list[float] | None = None, std: list[float] | None = None, **options) -> RunOptions:
    """The options every command shares, by name; those a command does not have keep RunOptions's defaults."""
    return RunOptions(mean=tuple(mean) if mean else None, std=tuple(std) if std else None, command=_command(),
                      **options)


@app.command("search")
def search_cmd(
    model: o.ModelArg,
    sparsity: o.Sparsity = o.HOW.sparsity,
    structure: o.Structure = o.HOW.structure,
    speedup: o.Speedup = o.HOW.speedup,
    method: Annotated[str, typer.Option("--method", help="qlp (the search), random (random search, same budget), "
                                                         "or a baseline (see prune).")] = "qlp",
    out: o.OutDir = None,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    episodes: o.Episodes = o.HOW.episodes,
    stages: o.Stages = o.HOW.stages,
    passes: o.Passes = o.HOW.passes,
    demonstrations: o.Demonstrations = o.HOW.demonstrations,
    near_best: o.NearBest = o.HOW.near_best,
    candidates: o.Candidates = o.HOW.candidates,
    select_epochs: o.SelectEpochs = o.HOW.select_epochs,
    reward_images: o.RewardImages = o.HOW.reward_images,
    reward_size: o.RewardSize = None,
    bn_recalibrate: o.BnRecalibrate = o.HOW.bn_recalibrate,
    reward_finetune_steps: o.RewardFinetuneSteps = o.HOW.reward_finetune_steps,
    reward_finetune_from: o.RewardFinetuneFrom = o.HOW.reward_finetune_from,
    reward_engine: o.RewardEngine = o.HOW.reward_engine,
    workers: o.Workers = o.HOW.workers,
    batch_episodes: o.BatchEpisodes = None,
    worker_threads: o.WorkerThreads = o.HOW.worker_threads,
    ray_address: o.RayAddress = None,
    finetune_epochs: o.FinetuneEpochs = o.RUN.finetune_epochs,
    lr: o.Lr = o.RUN.lr,
    nproc: o.Nproc = 1,
    sparse_storage: o.SparseStorage = True,
    latency_batch: o.LatencyBatch = o.HOW.latency_batch,
    threads: o.Threads = o.HOW.threads,
    round_to: o.RoundTo = o.HOW.round_to,
    distill: o.Distill = o.HOW.distill,
    quantize: o.Quantize = "none",
    calibration_images: o.CalibrationImages = o.RUN.calibration_images,
    keep_float: o.KeepFloat = "none",
    int8_max_loss: o.Int8MaxLoss = 1.0,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    arch: o.Arch = None,
    trust_pickle: o.Trust = False,
    mean: o.Mean = None,
    std: o.Std = None,
    resume: o.Resume = False,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Search how much to prune in each layer, prune, fine-tune, export and report.

    Example: qlp-compress search model.onnx --sparsity 0.9 --out runs/q90

    With --structure weight (default) QLP chooses per-layer sparsities: a smaller file, no speedup. With
    --structure channel it chooses layer widths for a measured onnxruntime speedup: a smaller, faster model; depth
    removes whole residual blocks, and channel,depth does both."""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device=device, seed=seed, arch=arch,
               trust_pickle=trust_pickle, mean=mean, std=std, reward_size=reward_size, finetune_epochs=finetune_epochs,
               lr=lr, sparse_storage=sparse_storage, quantize=quantize, calibration_images=calibration_images,
               keep_float=keep_float, int8_max_loss=int8_max_loss, resume=resume, force=force, nproc=nproc)
    how = Choice(structure=structure, method=method, sparsity=sparsity, speedup=speedup, episodes=episodes,
                 stages=stages, passes=passes, demonstrations=demonstrations, near_best=near_best,
                 candidates=candidates, select_epochs=select_epochs, reward_images=reward_images,
                 bn_recalibrate=bn_recalibrate, reward_finetune_steps=reward_finetune_steps,
                 reward_finetune_from=reward_finetune_from, reward_engine=reward_engine, latency_batch=latency_batch,
                 threads=threads, round_to=round_to, distill=distill, workers=workers, batch_episodes=batch_episodes,
                 worker_threads=worker_threads, ray_address=ray_address)
    report = run_command.search(run, how)
    emit(report, as_json, lambda: compressed_lines(report))


@app.command("prune")
def prune_cmd(
    model: o.ModelArg,
    sparsity: o.Sparsity = o.HOW.sparsity,
    structure: o.Structure = o.HOW.structure,
    speedup: o.Speedup = o.HOW.speedup,
    method: Annotated[str | None, typer.Option("--method", help="weight: lamp, erk, global or uniform [default: "
                                                                "lamp]; channel: l1 (global filter norm), bn-slimming "
                                                                "or uniform [default: l1].", show_default=False)]
    = None,
    policy: o.Policy = None,
    min_density: o.MinDensity = o.HOW.min_density,
    out: o.OutDir = None,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    finetune_epochs: o.FinetuneEpochs = o.RUN.finetune_epochs,
    lr: o.Lr = o.RUN.lr,
    nproc: o.Nproc = 1,
    sparse_storage: o.SparseStorage = True,
    latency_batch: o.LatencyBatch = o.HOW.latency_batch,
    threads: o.Threads = o.HOW.threads,
    round_to: o.RoundTo = o.HOW.round_to,
    distill: o.Distill = o.HOW.distill,
    quantize: o.Quantize = "none",
    calibration_images: o.CalibrationImages = o.RUN.calibration_images,
    keep_float: o.KeepFloat = "none",
    int8_max_loss: o.Int8MaxLoss = 1.0,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    arch: o.Arch = None,
    trust_pickle: o.Trust = False,
    mean: o.Mean = None,
    std: o.Std = None,
    resume: o.Resume = False,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Prune by a baseline allocation (or a policy.json), fine-tune, export and report: no search.

    Example: qlp-compress prune model.onnx --method lamp --sparsity 0.9 --out runs/lamp90"""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device=device, seed=seed, arch=arch,
               trust_pickle=trust_pickle, mean=mean, std=std, finetune_epochs=finetune_epochs, lr=lr,
               sparse_storage=sparse_storage, quantize=quantize, calibration_images=calibration_images,
               keep_float=keep_float, int8_max_loss=int8_max_loss, resume=resume, force=force, nproc=nproc)
    method = method or run_command.default_prune_method(structure)
    how = Choice(structure=structure, method=method, sparsity=sparsity, speedup=speedup, policy=policy,
                 min_density=min_density, latency_batch=latency_batch, threads=threads, round_to=round_to,
                 distill=distill)
    if method in run_command.SEARCH_METHODS:
        raise typer.BadParameter(f"{method} is a search; use `qlp-compress search --method {method}`",
                                 param_hint="--method")
    report = run_command.search(run, how)
    emit(report, as_json, lambda: compressed_lines(report))


@app.command("compare")
def compare_cmd(
    model: o.ModelArg,
    sparsity: Annotated[list[float] | None, typer.Option("--sparsity", help="weight: target sparsity (repeat for "
                                                                            "several).", show_default=False)] = None,
    structure: o.Structure = o.HOW.structure,
    speedup: Annotated[list[float] | None, typer.Option("--speedup", help="channel: target speedup (repeat for "
                                                                          "several) [default: 2].",
                                                        show_default=False)] = None,
    method: Annotated[str | None, typer.Option("--method", help="Comma-separated methods [default: weight "
                                                                "qlp,lamp,global,erk,uniform; channel "
                                                                "qlp,uniform,l1,bn-slimming,random].",
                                               show_default=False)] = None,
    out: o.OutDir = None,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    episodes: o.Episodes = o.HOW.episodes,
    stages: o.Stages = o.HOW.stages,
    demonstrations: o.Demonstrations = o.HOW.demonstrations,
    candidates: o.Candidates = o.HOW.candidates,
    select_epochs: o.SelectEpochs = o.HOW.select_epochs,
    reward_images: o.RewardImages = o.HOW.reward_images,
    finetune_epochs: o.FinetuneEpochs = o.RUN.finetune_epochs,
    lr: o.Lr = o.RUN.lr,
    nproc: o.Nproc = 1,
    min_density: o.MinDensity = o.HOW.min_density,
    latency_batch: o.LatencyBatch = o.HOW.latency_batch,
    threads: o.Threads = o.HOW.threads,
    round_to: o.RoundTo = o.HOW.round_to,
    distill: o.Distill = o.HOW.distill,
    workers: o.CompareWorkers = o.HOW.workers,
    worker_threads: o.WorkerThreads = o.HOW.worker_threads,
    ray_address: o.RayAddress = None,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    arch: o.Arch = None,
    trust_pickle: o.Trust = False,
    resume: o.Resume = False,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Several methods at several targets, the same fine-tuning budget, one table (compare.json, compare.md).

    Example: qlp-compress compare model.onnx --sparsity 0.9 --sparsity 0.95 --method qlp,lamp,erk"""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device=device, seed=seed, arch=arch,
               trust_pickle=trust_pickle, finetune_epochs=finetune_epochs, lr=lr, resume=resume, force=force,
               nproc=nproc)
    channel = run_command.is_structured(run_command.structure_name(structure))
    names = method or run_command.default_compare_methods(structure)
    how = Choice(structure=structure, episodes=episodes, stages=stages, demonstrations=demonstrations,
                 candidates=candidates, select_epochs=select_epochs, reward_images=reward_images, threads=threads,
                 min_density=min_density, latency_batch=latency_batch, round_to=round_to, distill=distill,
                 targets=tuple((speedup or [2.0]) if channel else sparsity or ()), workers=workers,
                 worker_threads=worker_threads, ray_address=ray_address)
    result = run_command.compare_methods(run, how, [m.strip() for m in names.split(",") if m.strip()])
    table = tables.compare_channel_table if channel else tables.compare_table
    emit(result, as_json, lambda: (table(result["rows"]),
                                   Text(f"wrote {result['compare_json']} and {result['compare_md']}")))


@app.command("evaluate")
def evaluate_cmd(
    model: o.OnnxArg,
    data: Annotated[str | None, typer.Option("--data", help="Data set for accuracy: fashion-mnist, cifar10, a .npz "
                                                            "file, an image folder, or none (size and latency "
                                                            "only).")] = o.RUN.data,
    data_dir: o.DataDir = None,
    device: o.Device = "auto",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per latency measurement.")] = 30,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """Top-1 accuracy, latency (batch 1 and 64), file size and sparsity of an ONNX file, through onnxruntime.

    Example: qlp-compress evaluate runs/q90/model.onnx --json"""
    set_quiet(quiet)
    result = run_command.evaluate_file(model, None if data in (None, "none") else data, data_dir, device, repeats)
    emit(result, as_json, lambda: (tables.evaluation_table(result), tables.sparsity_table(result["layers"])))
