"""The options of the commands that read a model, in the shared vocabulary (RunOptions: what every such command
shares; Choice: how per-layer amounts are chosen), each checked once, at the boundary, and turned into the settings
of the workflows (one builder per settings object)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from qlp_compress.base import validate
from qlp_compress.base.errors import UsageError
from qlp_compress.base.names import SEARCH_METHODS as SEARCHES
from qlp_compress.base.names import STRUCTURES
from qlp_compress.deploy.engine import resolve_device
from qlp_compress.deploy.quantize import QuantizeSettings, settings_for
from qlp_compress.pruning.allocate import AllocationSettings
from qlp_compress.pruning.latency import LatencySettings
from qlp_compress.reward.weights import ENGINES, RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.curriculum import SearchSettings, check_budget
from qlp_compress.search.env import EnvSettings
from qlp_compress.train.distributed import check_nproc
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows import selection
from qlp_compress.workflows.channels import ChannelSettings
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
    speedup: float = ChannelSettings.speedup  # channel: target dense ÷ pruned latency
    policy: Path | None = None  # prune: apply this policy.json instead of a method
    episodes: int = SearchSettings.episodes
    stages: int = SearchSettings.stages
    passes: int = EnvSettings.passes
    demonstrations: str = DEFAULT_DEMONSTRATIONS
    reward_images: int = RewardSettings.images
    bn_recalibrate: int = RewardSettings.bn_recalibrate
    reward_finetune_steps: int = RewardSettings.finetune_steps
    reward_finetune_from: float = RewardSettings.finetune_from
    reward_engine: str = RewardSettings.engine
    min_density: float = AllocationSettings.min_density
    latency_batch: int = LatencySettings.batch
    threads: int = LatencySettings.threads
    round_to: int = LatencySettings.round_to
    distill: bool = ChannelSettings.distill
    near_best: float | None = None  # share of each stage's episodes that search around the stage's best
    #                                 allocation; None: 0.5 in weight mode (the search's default), 0 in channel mode
    candidates: int = SelectionSettings.candidates  # weight, qlp: allocations fine-tuned to choose the answer
    select_epochs: float = SelectionSettings.epochs  # fine-tuning per candidate
    targets: tuple[float, ...] = field(default_factory=tuple)  # compare: several targets
    workers: int = 0  # search: Ray workers for rewards and the candidates; compare: for its cells (0: none)
    batch_episodes: int | None = None  # search: episodes per batch (None: the workers, or 1)
    worker_threads: int = ScaleSettings.threads  # search, compare: torch and onnxruntime threads per worker
    ray_address: str | None = None  # search, compare: a Ray cluster to join (None: $RAY_ADDRESS, else workers here)


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


def check_choice(how: Choice, structure, searching: bool) -> None:
    """The Choice's options, each once: the structure's own (`structure`: its plug-in, workflows.structures), the
    method among the structure's, and a search's settings."""
    validate.choice("--structure", how.structure, STRUCTURES)
    validate.choice("--method", how.method, structure.methods(how.structure))
    structure.check(how)
    if searching and how.method in SEARCHES:
        check_budget(how.episodes, how.stages if how.method == "qlp" else 1, stages_option=how.method == "qlp")
        validate.whole("--passes", how.passes, 1, "4")
        if how.near_best is not None:
            validate.fraction("--near-best", how.near_best, 0, 1, "0.5")
        validate.whole("--reward-images", how.reward_images, 1, "1000")
        validate.whole("--bn-recalibrate", how.bn_recalibrate, 0, "256")
        validate.whole("--reward-finetune-steps", how.reward_finetune_steps, 0, str(RewardSettings.finetune_steps))
        validate.fraction("--reward-finetune-from", how.reward_finetune_from, 0, 1, str(RewardSettings.finetune_from),
                          low_open=True)
        validate.choice("--reward-engine", how.reward_engine, ENGINES)
        demonstrations(how, structure.baselines(how.structure))
        selection.check(selection_settings(how))
        check_scale(how.workers, how.worker_threads, how.batch_episodes, how.ray_address)


def demonstrations(how: Choice, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    """The --demonstrations list, each one of the structure's baselines (`allowed`); None = every one of them."""
    names = tuple(n.strip() for n in how.demonstrations.split(",") if n.strip())
    if names in ((DEFAULT_DEMONSTRATIONS,), ()):
        return None
    if names == ("none",):
        return ()
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


def folder_writes(structure, run: RunOptions, int8: QuantizeSettings | None) -> tuple[str, ...]:
    """The outputs a search or prune run writes in its folder (the plots aside: the run's commit checks those)."""
    return ("model.onnx", "policy.json", "report.json", "report.md", *structure.writes(run),
            *(("model.int8.onnx",) if int8 else ()))


def search_settings(how: Choice, run: RunOptions, target: float,
                    demonstrations: tuple[str, ...] | None = None) -> SearchSettings:
    """The search's settings; `target` is the share of the structure's cost it removes, and `demonstrations` the
    baselines it plays first (None: every one that applies)."""
    settings = SearchSettings(target_removed=target, episodes=how.episodes, stages=how.stages, method=how.method,
                              seed=run.seed, env=EnvSettings(passes=how.passes),
                              batch_episodes=how.batch_episodes or max(1, how.workers))
    if how.near_best is not None:
        settings = replace(settings, near_best=how.near_best)
    if demonstrations is not None:
        settings = replace(settings, demonstrations=demonstrations)
    return settings
