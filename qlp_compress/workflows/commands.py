"""One library call per command. Each takes the command's options in the shared vocabulary (RunOptions: what every
command that reads a model shares; Choice: how per-layer amounts are chosen), validates them once, before anything
is loaded or written, runs the workflow and returns the result document (what `--json` prints)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError
from qlp_compress.base.outputs import check_out_dir
from qlp_compress.base.ownership import check_file_out, check_folder_out, file_checkpoint
from qlp_compress.deploy.engine import resolve_device
from qlp_compress.deploy.quantize import QuantizeSettings, int8_path, settings_for
from qlp_compress.pruning.allocate import ALLOCATORS, AllocationSettings
from qlp_compress.pruning.latency import LatencySettings, check_latency_settings
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import check_policy, read_policy
from qlp_compress.pruning.widths import BASELINES as CHANNEL_BASELINES
from qlp_compress.pruning.widths import check_speedup
from qlp_compress.report.progress import search_progress
from qlp_compress.reward.channels import ChannelRewardSettings
from qlp_compress.reward.weights import ENGINES, RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.curriculum import METHODS as SEARCHES
from qlp_compress.search.curriculum import SearchSettings, check_budget
from qlp_compress.search.env import EnvSettings
from qlp_compress.train import ranks
from qlp_compress.train.distributed import as_job, check_nproc
from qlp_compress.train.finetune import SCHEDULES, TrainSettings
from qlp_compress.train.zoo import ARCHS
from qlp_compress.workflows import channels, evaluate, quantize, selection, train, weights
from qlp_compress.workflows.compare import compare as compare_weights
from qlp_compress.workflows.scale import check_scale
from qlp_compress.workflows.selection import SelectionSettings
from qlp_compress.workflows.workspace import DataSettings, ModelSettings, Workspace, check_can_write, open_workspace

STRUCTURES = ("weight", "channel")
MAX_LATENCY_BATCH = 4096  # latency is timed at a serving batch; a larger one only exhausts memory
DEFAULT_DEMONSTRATIONS = "default"  # every baseline that applies to the structure


@dataclass(frozen=True)
class RunOptions:
    """What every command that reads a model shares; the same name, meaning and default in every command."""

    model: Path
    out: Path | None = None  # a folder (search, prune, compare) or a file (finetune, export, quantize, train)
    data: str = "fashion-mnist"
    data_dir: Path | None = None
    reward_size: int | None = None
    device: str = "auto"
    seed: int = 0  # search, fine-tuning and data order
    arch: str | None = None
    trust_pickle: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    finetune_epochs: float = 2.0  # 0 = no fine-tuning
    lr: float | None = None  # fine-tuning; None: derived from the model by a range test (train.guard.find_lr)
    nproc: int = 1  # processes every fine-tuning runs on (torch DDP, train.distributed)
    sparse_storage: bool = True
    quantize: str = "none"
    calibration_images: int = 1024
    keep_float: str = "none"
    int8_max_loss: float = 1.0
    resume: bool = False
    force: bool = False
    command: str = ""


@dataclass(frozen=True)
class Choice:
    """How per-layer amounts are chosen: a structure, a method and a target, and the search's settings."""

    structure: str = "weight"  # weight (unstructured zeros) or channel (whole channels)
    method: str = "qlp"
    sparsity: float = 0.9  # weight: target global sparsity
    speedup: float = 2.0  # channel: target dense ÷ pruned latency
    policy: Path | None = None  # prune: apply this policy.json instead of a method
    episodes: int = 400
    stages: int = 4
    passes: int = 4
    demonstrations: str = DEFAULT_DEMONSTRATIONS
    reward_images: int = 1000
    bn_recalibrate: int = 256
    reward_finetune_steps: int = RewardSettings.finetune_steps
    reward_finetune_from: float = RewardSettings.finetune_from
    reward_engine: str = "auto"
    min_density: float = 0.0
    latency_batch: int = 64
    threads: int = 2
    round_to: int = 8
    distill: bool = True
    near_best: float | None = None  # share of each stage's episodes that search around the stage's best
    #                                 allocation; None: 0.5 in weight mode (the search's default), 0 in channel mode
    candidates: int = SelectionSettings.candidates  # weight, qlp: allocations fine-tuned to choose the answer
    select_epochs: float = SelectionSettings.epochs  # fine-tuning per candidate
    targets: tuple[float, ...] = field(default_factory=tuple)  # compare: several targets
    workers: int = 0  # search: Ray reward workers (0: rewards scored in this process)
    batch_episodes: int | None = None  # search: episodes per batch (None: the workers, or 1)
    worker_threads: int = 1  # search: torch and onnxruntime threads per worker
    ray_address: str | None = None  # search: a Ray cluster to join (None: $RAY_ADDRESS, else workers here)


def methods_for(structure: str) -> tuple[str, ...]:
    return (*SEARCHES, *(CHANNEL_BASELINES if structure == "channel" else ALLOCATORS))


# ------------------------------------------------------------------------------------------------ checks


def _check_run(run: RunOptions) -> QuantizeSettings | None:
    check_nproc(run.nproc, resolve_device(run.device))
    validate.seed(run.seed)
    validate.positive("--finetune-epochs", run.finetune_epochs, "2", zero_ok=True)
    if run.lr is not None:
        validate.positive("--lr", run.lr, "0.01")
    validate.normalisation(run.mean, run.std)
    if run.reward_size is not None:
        validate.whole("--reward-size", run.reward_size, 1, "5000")
    return settings_for(run.quantize, run.calibration_images, run.keep_float, run.int8_max_loss)


def _check_choice(how: Choice, searching: bool) -> None:
    validate.choice("--structure", how.structure, STRUCTURES)
    validate.choice("--method", how.method, methods_for(how.structure))
    if how.structure == "channel":
        check_speedup(how.speedup)
        if how.latency_batch > MAX_LATENCY_BATCH:
            raise UsageError(f"--latency-batch must be at most {MAX_LATENCY_BATCH}, got {how.latency_batch}: latency "
                             "is timed at the batch the model will serve; e.g. --latency-batch 64")
        check_latency_settings(_latency(how))
    else:
        validate.sparsity(how.sparsity)
        validate.fraction("--min-density", how.min_density, 0, 1, "0.05", high_open=True)
    if searching and how.method in SEARCHES:
        check_budget(how.episodes, how.stages if how.method == "qlp" else 1, stages_option=how.method == "qlp")
        validate.whole("--passes", how.passes, 1, "4")
        if how.near_best is not None:
            validate.fraction("--near-best", how.near_best, 0, 1, "0.5")
        if how.near_best and how.structure == "channel":
            raise UsageError("--near-best searches around the best per-layer sparsities of --structure weight; "
                             "leave it out with --structure channel")
        validate.whole("--reward-images", how.reward_images, 1, "1000")
        validate.whole("--bn-recalibrate", how.bn_recalibrate, 0, "256")
        validate.whole("--reward-finetune-steps", how.reward_finetune_steps, 0, str(RewardSettings.finetune_steps))
        validate.fraction("--reward-finetune-from", how.reward_finetune_from, 0, 1, str(RewardSettings.finetune_from),
                          low_open=True)
        validate.choice("--reward-engine", how.reward_engine, ENGINES)
        _demonstrations(how)
        selection.check(_selection(how))
        check_scale(how.workers, how.worker_threads, how.batch_episodes, how.ray_address)


def _demonstrations(how: Choice) -> tuple[str, ...] | None:
    """The --demonstrations list; None = every baseline that applies."""
    names = tuple(n.strip() for n in how.demonstrations.split(",") if n.strip())
    if names in ((DEFAULT_DEMONSTRATIONS,), ()):
        return None
    if names == ("none",):
        return ()
    allowed = CHANNEL_BASELINES if how.structure == "channel" else tuple(ALLOCATORS)
    for name in names:
        if name not in allowed:
            raise UsageError(f"--demonstrations: unknown {how.structure} allocation {name!r}; use a comma-separated "
                             f"list of {', '.join(allowed)}, {DEFAULT_DEMONSTRATIONS} (all of them), or none")
    return names


def _selection(how: Choice) -> SelectionSettings:
    return SelectionSettings(candidates=how.candidates, epochs=how.select_epochs)


def _scale(how: Choice) -> ScaleSettings:
    return ScaleSettings(workers=how.workers, threads=how.worker_threads, address=how.ray_address)


def _latency(how: Choice) -> LatencySettings:
    return LatencySettings(batch=how.latency_batch, threads=how.threads, round_to=how.round_to)


def _finetune(run: RunOptions) -> TrainSettings | None:
    if run.finetune_epochs <= 0:
        return None
    return TrainSettings(epochs=run.finetune_epochs, lr=run.lr, warmup_epochs=0.0, seed=run.seed,
                         device=resolve_device(run.device), nproc=run.nproc)


def _inputs(run: RunOptions) -> tuple[Path | None, ...]:
    """The files a run reads, which no output may replace: the model and a data file."""
    data = Path(run.data)
    return run.model, data if data.is_file() else None


def _folder_writes(run: RunOptions, how: Choice, int8: QuantizeSettings | None) -> tuple[str, ...]:
    """The outputs a search or prune run writes in its folder (the plots aside: the run's commit checks those)."""
    extra = ("model.sparse.onnx",) if run.sparse_storage and how.structure == "weight" else ()
    return ("model.onnx", "policy.json", "report.json", "report.md", *extra, *(("model.int8.onnx",) if int8 else ()))


def _workspace(run: RunOptions) -> Workspace:
    return open_workspace(run.model, ModelSettings(run.arch, run.trust_pickle, run.mean, run.std),
                          DataSettings(run.data, run.data_dir, run.reward_size), run.device)


def _search_settings(how: Choice, run: RunOptions, target: float) -> SearchSettings:
    demos = _demonstrations(how)
    settings = SearchSettings(target=target, episodes=how.episodes, stages=how.stages, method=how.method,
                              seed=run.seed, env=EnvSettings(passes=how.passes),
                              batch_episodes=how.batch_episodes or max(1, how.workers))
    if how.near_best is not None:
        settings = replace(settings, near_best=how.near_best)
    if demos is not None and how.structure == "weight":
        settings = replace(settings, demonstrations=demos)
    return settings


def _channel_settings(how: Choice, run: RunOptions, int8: QuantizeSettings | None) -> channels.ChannelSettings:
    return channels.ChannelSettings(
        method=how.method, speedup=how.speedup, latency=_latency(how), finetune=_finetune(run), distill=how.distill,
        search=_search_settings(how, run, 0.5),
        reward=ChannelRewardSettings(images=how.reward_images, bn_recalibrate=how.bn_recalibrate),
        demonstrations=_demonstrations(how), quantize=int8, scale=_scale(how))


def default_out(model: Path, how: Choice, suffix: str = "") -> Path:
    if how.structure == "channel":
        return model.parent / f"{model.stem}.{how.method}-{how.speedup:g}x{suffix}"
    return weights.default_out_dir(model, how.method, how.sparsity)


# ------------------------------------------------------------------------------------------------ commands


def search(run: RunOptions, how: Choice) -> dict:
    """`search` and `prune`: choose the per-layer amounts (search, a baseline, or a policy.json), prune, fine-tune,
    export verified ONNX and report, all under run.out (a folder, written as a set)."""
    return as_job(resolve_device(run.device), lambda: _search(run, how))  # torchrun: train.job


def _search(run: RunOptions, how: Choice) -> dict:
    int8 = _check_run(run)
    chosen = None
    if how.policy is not None and how.structure == "weight":
        chosen = read_policy(how.policy)  # its fields are checked before anything else
        how = replace(how, method=chosen.method, sparsity=chosen.target)
    else:
        _check_choice(how, searching=True)
    out = run.out or default_out(run.model, how)
    check_folder_out(out, (*_inputs(run), how.policy))
    check_out_dir(out, run.force, run.resume, writes=_folder_writes(run, how, int8))
    ws = _workspace(run)
    if how.structure == "channel":
        searching = how.method in SEARCHES and how.policy is None
        with search_progress(f"{how.method} channel search", how.episodes if searching else 0) as on_episode:
            report = channels.compress_channels(run.model, ws, _channel_settings(how, run, int8), out, run.command,
                                                resume=run.resume, on_episode=on_episode, policy_path=how.policy,
                                                force=run.force)
        return {"out": str(out), **report}
    if chosen is not None:
        layers = find_prunable_layers(ws.loaded.module)
        paths = [x.name for x in layers]
        chosen = check_policy(chosen, how.policy, ws.loaded.sha256, paths, [x.numel for x in layers],
                              names=ws.loaded.names_of(paths))
    reward = RewardSettings(images=how.reward_images, engine=how.reward_engine, bn_recalibrate=how.bn_recalibrate,
                            finetune_steps=how.reward_finetune_steps, finetune_from=how.reward_finetune_from,
                            device=ws.device)
    settings = weights.CompressSettings(
        method=how.method, target=how.sparsity, search=_search_settings(how, run, how.sparsity), reward=reward,
        allocation=AllocationSettings(min_density=how.min_density), finetune=_finetune(run),
        sparse_storage=run.sparse_storage, quantize=int8, selection=_selection(how), scale=_scale(how))
    report = weights.compress(run.model, ws, settings, out, run.command, resume=run.resume, policy=chosen,
                              force=run.force)
    return {"out": str(out), **report}


def compare_methods(run: RunOptions, how: Choice, methods: list[str]) -> dict:
    """`compare`: every method at every target (sparsity or speedup), the same fine-tuning budget, one table."""
    return as_job(resolve_device(run.device), lambda: _compare(run, how, methods))


def _compare(run: RunOptions, how: Choice, methods: list[str]) -> dict:
    _check_run(run)
    if not methods:
        raise UsageError(f"--method lists no method; give e.g. --method {','.join(methods_for(how.structure))}")
    targets = list(how.targets) or ([how.speedup] if how.structure == "channel" else [])
    if not targets:
        raise UsageError("compare needs --sparsity (repeat for several), or --structure channel with --speedup")
    for method in methods:
        for target in targets:
            one = replace(how, method=method, targets=(),
                          **({"speedup": target} if how.structure == "channel" else {"sparsity": target}))
            _check_choice(one, searching=True)
    out = run.out or run.model.parent / f"{run.model.stem}.compare{'-channel' if how.structure == 'channel' else ''}"
    check_folder_out(out, _inputs(run))
    check_out_dir(out, run.force, run.resume, writes=("compare.json", "compare.md"))
    ws = _workspace(run)
    if how.structure == "channel":
        rows = channels.compare_channels(ws, methods, targets, _channel_settings(how, run, None), out, run.command,
                                         force=run.force, resume=run.resume)
    else:
        rows = compare_weights(ws, methods, targets, _search_settings(how, run, targets[0]),
                               RewardSettings(images=how.reward_images, device=ws.device),
                               AllocationSettings(min_density=how.min_density), _finetune(run), out, run.command,
                               force=run.force, resume=run.resume, selection=_selection(how))
    return {"out": str(out), "compare_json": str(out / "compare.json"), "compare_md": str(out / "compare.md"),
            "rows": rows}


def finetune(run: RunOptions) -> dict:
    """`finetune`: an already pruned model, its zeros held, fine-tuned and exported to the file run.out."""
    int8 = _check_run(run)
    if run.out is None:
        raise UsageError("finetune needs --out FILE.onnx (the file to write)")
    checkpoint = file_checkpoint(run.out)
    if ranks.is_main():  # in a torchrun job only rank 0 writes
        check_file_out(run.out, (checkpoint, *((int8_path(run.out),) if int8 else ())), _inputs(run))
        check_can_write(run.out, run.force, checkpoint, run.resume)
    if int8 and ranks.is_main():  # --resume continues a fine-tuning; it never overwrites a file (that takes --force)
        check_can_write(int8_path(run.out), run.force, resume=run.resume)
    ws = _workspace(run)
    result = weights.finetune_pruned(ws, _finetune(run) or TrainSettings(epochs=0), run.out, run.command, run.resume,
                                     run.force, int8=int8)
    return {"path": str(run.out), **result}


def export(run: RunOptions) -> dict:
    """`export`: a PyTorch or ONNX model to a verified ONNX file (and its sparse-storage and int8 forms)."""
    int8 = _check_run(run)
    if run.out is None:
        raise UsageError("export needs --out FILE.onnx (the file to write)")
    sparse = run.out.with_suffix(".sparse.onnx") if run.sparse_storage else None
    check_file_out(run.out, [p for p in (sparse, int8_path(run.out) if int8 else None) if p], _inputs(run))
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
        check_file_out(run.out, (file_checkpoint(run.out),), _inputs(run)[1:])
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
    check_file_out(run.out, (), _inputs(run))
    return quantize.quantize_file(run.model, run.out, DataSettings(run.data, run.data_dir, run.reward_size), settings,
                                  run.command, run.force)
