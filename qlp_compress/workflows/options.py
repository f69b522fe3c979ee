"""The options of the commands that read a model, in the shared vocabulary (RunOptions: what every such command
shares; Choice: how per-layer amounts are chosen), each checked once, at the boundary, and turned into the settings
of the workflows (one builder per settings object)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError
from qlp_compress.base.names import SEARCH_METHODS as SEARCHES
from qlp_compress.base.names import STRUCTURES, is_structured, structure_name
from qlp_compress.deploy.engine import resolve_device
from qlp_compress.deploy.quantize import QuantizeSettings, settings_for
from qlp_compress.pruning.allocate import ALLOCATORS
from qlp_compress.pruning.latency import LatencySettings, check_latency_settings
from qlp_compress.pruning.widths import baselines_for, check_speedup
from qlp_compress.reward.channels import ChannelRewardSettings
from qlp_compress.reward.weights import ENGINES, RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.curriculum import SearchSettings, check_budget
from qlp_compress.search.env import EnvSettings
from qlp_compress.train.distributed import check_nproc
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows import channels, selection
from qlp_compress.workflows.scale import check_scale
from qlp_compress.workflows.selection import SelectionSettings

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

    structure: str = "weight"  # weight (unstructured zeros), channel (whole channels), depth (whole blocks) or both
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
    workers: int = 0  # search: Ray workers for rewards and the candidates; compare: for its cells (0: none)
    batch_episodes: int | None = None  # search: episodes per batch (None: the workers, or 1)
    worker_threads: int = 1  # search, compare: torch and onnxruntime threads per worker
    ray_address: str | None = None  # search, compare: a Ray cluster to join (None: $RAY_ADDRESS, else workers here)


def methods_for(structure: str) -> tuple[str, ...]:
    return (*SEARCHES, *(baselines_for(structure) if is_structured(structure) else ALLOCATORS))


def default_prune_method(structure: str) -> str:
    """prune's method when none is given: LAMP for weights, l1 for channels, uniform depth for blocks alone."""
    name = structure_name(structure)
    return {"weight": "lamp", "depth": "depth"}.get(name, "l1")


def default_compare_methods(structure: str) -> str:
    name = structure_name(structure)
    if not is_structured(name):
        return "qlp,lamp,global,erk,uniform"
    return ",".join(("qlp", *baselines_for(name), "random"))


# ------------------------------------------------------------------------------------------------ checks


def check_run(run: RunOptions) -> QuantizeSettings | None:
    check_nproc(run.nproc, resolve_device(run.device))
    validate.seed(run.seed)
    validate.positive("--finetune-epochs", run.finetune_epochs, "2", zero_ok=True)
    if run.lr is not None:
        validate.positive("--lr", run.lr, "0.01")
    validate.normalisation(run.mean, run.std)
    if run.reward_size is not None:
        validate.whole("--reward-size", run.reward_size, 1, "5000")
    return settings_for(run.quantize, run.calibration_images, run.keep_float, run.int8_max_loss)


def check_choice(how: Choice, searching: bool) -> None:
    validate.choice("--structure", how.structure, STRUCTURES)
    validate.choice("--method", how.method, methods_for(how.structure))
    if is_structured(how.structure):
        check_speedup(how.speedup)
        if how.latency_batch > MAX_LATENCY_BATCH:
            raise UsageError(f"--latency-batch must be at most {MAX_LATENCY_BATCH}, got {how.latency_batch}: latency "
                             "is timed at the batch the model will serve; e.g. --latency-batch 64")
        check_latency_settings(latency_settings(how))
    else:
        validate.sparsity(how.sparsity)
        validate.fraction("--min-density", how.min_density, 0, 1, "0.05", high_open=True)
    if searching and how.method in SEARCHES:
        check_budget(how.episodes, how.stages if how.method == "qlp" else 1, stages_option=how.method == "qlp")
        validate.whole("--passes", how.passes, 1, "4")
        if how.near_best is not None:
            validate.fraction("--near-best", how.near_best, 0, 1, "0.5")
        if how.near_best and is_structured(how.structure):
            raise UsageError("--near-best searches around the best per-layer sparsities of --structure weight; "
                             f"leave it out with --structure {how.structure}")
        validate.whole("--reward-images", how.reward_images, 1, "1000")
        validate.whole("--bn-recalibrate", how.bn_recalibrate, 0, "256")
        validate.whole("--reward-finetune-steps", how.reward_finetune_steps, 0, str(RewardSettings.finetune_steps))
        validate.fraction("--reward-finetune-from", how.reward_finetune_from, 0, 1, str(RewardSettings.finetune_from),
                          low_open=True)
        validate.choice("--reward-engine", how.reward_engine, ENGINES)
        demonstrations(how)
        selection.check(selection_settings(how))
        check_scale(how.workers, how.worker_threads, how.batch_episodes, how.ray_address)


def demonstrations(how: Choice) -> tuple[str, ...] | None:
    """The --demonstrations list; None = every baseline that applies."""
    names = tuple(n.strip() for n in how.demonstrations.split(",") if n.strip())
    if names in ((DEFAULT_DEMONSTRATIONS,), ()):
        return None
    if names == ("none",):
        return ()
    allowed = baselines_for(how.structure) if is_structured(how.structure) else tuple(ALLOCATORS)
    for name in names:
        if name not in allowed:
            raise UsageError(f"--demonstrations: unknown {how.structure} allocation {name!r}; use a comma-separated "
                             f"list of {', '.join(allowed)}, {DEFAULT_DEMONSTRATIONS} (all of them), or none")
    return names


def selection_settings(how: Choice) -> SelectionSettings:
    return SelectionSettings(candidates=how.candidates, epochs=how.select_epochs)


def scale_settings(how: Choice) -> ScaleSettings:
    return ScaleSettings(workers=how.workers, threads=how.worker_threads, address=how.ray_address)


def latency_settings(how: Choice) -> LatencySettings:
    return LatencySettings(batch=how.latency_batch, threads=how.threads, round_to=how.round_to)


def finetune_settings(run: RunOptions) -> TrainSettings | None:
    if run.finetune_epochs <= 0:
        return None
    return TrainSettings(epochs=run.finetune_epochs, lr=run.lr, warmup_epochs=0.0, seed=run.seed,
                         device=resolve_device(run.device), nproc=run.nproc)


def inputs(run: RunOptions) -> tuple[Path | None, ...]:
    """The files a run reads, which no output may replace: the model and a data file."""
    data = Path(run.data)
    return run.model, data if data.is_file() else None


def folder_writes(run: RunOptions, how: Choice, int8: QuantizeSettings | None) -> tuple[str, ...]:
    """The outputs a search or prune run writes in its folder (the plots aside: the run's commit checks those)."""
    extra = ("model.sparse.onnx",) if run.sparse_storage and not is_structured(how.structure) else ()
    return ("model.onnx", "policy.json", "report.json", "report.md", *extra, *(("model.int8.onnx",) if int8 else ()))



def search_settings(how: Choice, run: RunOptions, target: float) -> SearchSettings:
    demos = demonstrations(how)
    settings = SearchSettings(target=target, episodes=how.episodes, stages=how.stages, method=how.method,
                              seed=run.seed, env=EnvSettings(passes=how.passes),
                              batch_episodes=how.batch_episodes or max(1, how.workers))
    if how.near_best is not None:
        settings = replace(settings, near_best=how.near_best)
    if demos is not None and how.structure == "weight":
        settings = replace(settings, demonstrations=demos)
    return settings


def channel_settings(how: Choice, run: RunOptions, int8: QuantizeSettings | None) -> channels.ChannelSettings:
    return channels.ChannelSettings(
        structure=how.structure, method=how.method, speedup=how.speedup, latency=latency_settings(how),
        finetune=finetune_settings(run), distill=how.distill,
        search=search_settings(how, run, 0.5),
        reward=ChannelRewardSettings(images=how.reward_images, bn_recalibrate=how.bn_recalibrate),
        demonstrations=demonstrations(how), quantize=int8, scale=scale_settings(how))
