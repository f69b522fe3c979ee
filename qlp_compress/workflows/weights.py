"""The weight-mode workflows (unstructured zeros, the paper's method): search or allocate per-layer sparsities,
prune, fine-tune, export, verify, report; `finetune` of an already pruned model; `export`."""

from __future__ import annotations

import copy
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from torch import nn

from qlp_compress.base import machine, validate
from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.locks import file_lock
from qlp_compress.base.names import SEARCH_METHODS as METHODS
from qlp_compress.base.outputs import OutputRun
from qlp_compress.base.ownership import file_checkpoint
from qlp_compress.deploy import export, quantize
from qlp_compress.pruning.allocate import ALLOCATORS, AllocationSettings, allocate
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.pruning.policy import Policy
from qlp_compress.reward.weights import Reward, RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.curriculum import SearchSettings, run_search
from qlp_compress.search.env import PruningEnv
from qlp_compress.train import ranks
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows import advice
from qlp_compress.workflows.quantize import quantize_beside
from qlp_compress.workflows.scale import IN_PROCESS, scale_record, scoring, search_title
from qlp_compress.workflows.selection import SelectionSettings, choose_answer, run_record
from qlp_compress.workflows.workspace import (
    Workspace,
    check_can_write,
    export_bytes,
    export_verified,
    finetune_guarded,
    finetune_report,
    measure_onnx,
    prune_weights_and_finetune,
    with_record,
)


def check_demonstrations(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in ALLOCATORS]
    if unknown:
        raise UsageError(f"--demonstrations: unknown allocation {unknown[0]!r}; use a comma-separated list of "
                         f"{', '.join(ALLOCATORS)}, or none")


EPISODE_COUNTS = ("episodes = agent_episodes + demonstration_episodes = reward_evaluations + failed_episodes: every "
                  "episode that reaches its stage's target is scored once by the reward (a reward evaluation); an "
                  "episode that ends short of it is not scored and gets a negative reward for the sparsity it "
                  "misses")
PER_EPISODE = ("rewards", "stage_of_episode", "succeeded", "demonstration")  # policy.json keeps these lists


LATENCY_NOTE = ("weight sparsity gives no speedup in onnxruntime's dense kernels: the zeros are stored and multiplied "
                "like any other weight, so a latency difference between the dense and pruned rows is measurement "
                "noise (they are timed one after another, not interleaved); use --structure channel for a measured "
                "speedup")


def sparse_identical_note() -> str:
    d = export.SPARSE_STORAGE_MAX_DENSITY
    return (f"model.sparse.onnx is byte for byte the same as model.onnx: sparse storage (a value and an int64 index "
            f"per kept weight) pays only for a layer of density {d:.2f} or less (sparsity {1 - d:.2f} or more), and "
            "no layer is that sparse")


def allocator(ws: Workspace, settings: AllocationSettings | None = None) -> Callable[[str, float], list[float]]:
    """(baseline allocator's name, target) → its per-layer sparsities for the loaded model, in network order."""
    layers = find_prunable_layers(ws.loaded.module)
    weights = {layer.name: layer.weight.detach() for layer in layers}

    def baseline(name: str, goal: float) -> list[float]:
        sparsities = allocate(name, weights, goal, settings or AllocationSettings())
        return [sparsities[layer.name] for layer in layers]

    return baseline


def find_policy(ws: Workspace, method: str, target: float, search: SearchSettings | None = None,
                reward_settings: RewardSettings | None = None, allocation: AllocationSettings | None = None,
                checkpoint: Path | None = None, resume: bool = False,
                on_episode: Callable[[dict], None] | None = None, scale: ScaleSettings | None = None) -> Policy:
    """Per-layer sparsities by QLP, random search or a baseline allocator; the search's rewards are scored in this
    process or on `scale.workers` Ray workers."""
    validate.sparsity(target)
    layers = find_prunable_layers(ws.loaded.module)
    names, numels = [layer.name for layer in layers], [layer.numel for layer in layers]
    common = {"target": target, "layers": names, "numels": numels, "model_sha256": ws.loaded.sha256,
              "names": ws.loaded.names_of(names)}
    baseline = allocator(ws, allocation)

    if method in ALLOCATORS:
        return Policy(method=method, sparsities=baseline(method, target), **common)
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; use one of {', '.join((*METHODS, *ALLOCATORS))}")
    search = replace(search or SearchSettings(target_removed=target), target_removed=target, method=method)
    check_demonstrations(search.demonstrations)
    reward_settings = reward_settings or RewardSettings(device=ws.device)
    advice.budget_warning(search)
    scale = scale or ScaleSettings()
    with scoring("weight", ws, reward_settings, scale,
                 lambda: Reward(ws.loaded.module, ws.splits.reward, reward_settings)) as scorer:
        env = PruningEnv(numels, scorer.reward_fn, search.env)
        result = run_search(env, search, checkpoint=checkpoint, resume=resume, on_episode=on_episode,
                            allocation=baseline, run_record=ws.record, score_batch=scorer.score_batch)
        scaled = scale_record(scale, search.batch_episodes, result, scorer.pool)
    advice.signal_warning(result.history, ws.data.num_classes, target,
                          reward_settings.finetune_steps if target >= reward_settings.finetune_from else 0)
    if result.final.sparsities is None:
        raise QLPError(f"no episode reached sparsity {target} in {search.episodes} episodes; raise --episodes "
                       "or --passes")
    outside = result.total_seconds - result.reward_seconds
    history = result.history
    succeeded = [bool(h["succeeded"]) for h in history]
    demonstrations = [h.get("demonstration") for h in history]
    stats = {"episodes": len(history), "reward_evaluations": sum(succeeded),
             "failed_episodes": len(history) - sum(succeeded),
             "demonstration_episodes": sum(d is not None for d in demonstrations),
             "agent_episodes": sum(d is None for d in demonstrations),
             "counts": EPISODE_COUNTS,
             "reward_engine": scorer.engine, "reward_images": min(reward_settings.images, len(ws.splits.reward)),
             "wall_seconds": round(result.total_seconds, 2), "reward_seconds": round(result.reward_seconds, 2),
             "seconds_per_episode": round(result.total_seconds / max(1, len(result.history)), 4),
             "share_outside_reward": round(outside / max(1e-9, result.total_seconds), 4),
             "rewards": [round(h["reward"], 5) for h in result.history],
             "stage_of_episode": [h["stage"] for h in result.history], "succeeded": succeeded,
             "demonstration": demonstrations, "near_best": [bool(h.get("near_best")) for h in history], **scaled}
    stages = [{"target": b.target, "reward": b.reward, "episode": b.episode, "sparsities": b.sparsities,
               "demonstration": b.demonstration, "near_best": b.near_best} for b in result.best]
    return Policy(method=method, sparsities=result.final.sparsities, best_reward=result.final.reward,
                  stages=stages, search=stats, seed=search.seed, **common)




@dataclass(frozen=True)
class CompressSettings:
    """One compression run: how to choose the sparsities, fine-tune and export."""

    method: str = "qlp"  # "qlp", "random", or a baseline allocator name
    target: float = 0.9  # global sparsity of the prunable weights
    search: SearchSettings | None = None  # for qlp/random (target and method are filled in)
    reward: RewardSettings | None = None  # how the search reward is measured
    allocation: AllocationSettings | None = None  # for the baseline allocators
    finetune: TrainSettings | None = None  # None = no fine-tuning
    sparse_storage: bool = True  # also write model.sparse.onnx
    latency_repeats: int = 30  # timed runs per latency figure
    quantize: quantize.QuantizeSettings | None = None  # also write model.int8.onnx (None = no int8)
    selection: SelectionSettings = field(default_factory=SelectionSettings)  # how a QLP answer is chosen
    scale: ScaleSettings = field(default_factory=ScaleSettings)  # where the search's rewards are scored


def default_out_dir(model_path: Path, method: str, target: float) -> Path:
    if method not in (*METHODS, *ALLOCATORS):  # a name read from a file never becomes part of a path unchecked
        raise UsageError(f"unknown method {method!r}; use one of {', '.join((*METHODS, *ALLOCATORS))}")
    return model_path.parent / f"{model_path.stem}.{method}-{target:g}"


def compress(model_path: Path, ws: Workspace, settings: CompressSettings, out: Path, command: str,
             resume: bool = False, policy: Policy | None = None, force: bool = False) -> dict:
    """Search (or allocate) → prune → fine-tune → export → verify → report, all files under `out`, written as a
    set (qlp_compress.base.outputs): an existing folder is replaced only with `force`, and only when the run
    succeeds."""
    with OutputRun(out, force, resume) as run:
        report = _compress(model_path, ws, settings, out, run, command, resume, policy)
        run.commit()
    return report


def _compress(model_path: Path, ws: Workspace, settings: CompressSettings, out: Path, run: OutputRun, command: str,
              resume: bool, policy: Policy | None) -> dict:
    from qlp_compress.report.documents import write_report
    from qlp_compress.report.progress import phase, search_progress
    from qlp_compress.report.provenance import jsonable, versions

    work, staged = run.work, run.staging
    started = time.perf_counter()
    ws = with_record(ws, run_record(settings.search, settings.reward, settings.allocation, settings.finetune,
                                    settings.selection, settings.method, settings.target, policy))
    if policy is None and settings.method not in METHODS:  # a baseline allocator: closed form, no search
        policy = find_policy(ws, settings.method, settings.target, allocation=settings.allocation)
    if policy is None:
        search = settings.search or SearchSettings(target_removed=settings.target)
        title = search_title(f"{settings.method} search", settings.scale, search.batch_episodes)
        with search_progress(title, search.episodes) as on_episode:
            policy = find_policy(ws, settings.method, settings.target, search, settings.reward,
                                 checkpoint=work / "search.ckpt", resume=resume, on_episode=on_episode,
                                 scale=settings.scale)
        if settings.method == "qlp":
            reward_images = (settings.reward or RewardSettings()).images
            policy = choose_answer(ws, policy, allocator(ws, settings.allocation), settings.selection,
                                   settings.finetune, reward_images, work, resume, settings.scale)
    policy.save(staged / "policy.json")
    pruned, tuned = prune_weights_and_finetune(ws, policy, settings.finetune, work / "finetune.ckpt", resume,
                                          measured=(settings.reward or RewardSettings()).images)
    measured = {}
    for key, module, what in (("dense", ws.loaded.module, "the dense model"),
                              ("pruned", pruned, "the pruned model (not fine-tuned)"),
                              ("finetuned", tuned, "the fine-tuned model")):
        with phase(f"export {what} to ONNX and measure it (onnxruntime: test accuracy, latency)"):
            exported = export_bytes(module, ws)
            measured[key] = measure_onnx(exported, ws, settings.latency_repeats)
    tuned_bytes = exported
    metadata = {"qlp.source_sha256": ws.loaded.sha256, "qlp.method": policy.method,
                "qlp.target_sparsity": policy.target, "qlp.achieved_sparsity": f"{policy.achieved:.6f}",
                "qlp.policy": ",".join(f"{s:.4f}" for s in policy.sparsities), "qlp.dataset": ws.data.name,
                "qlp.dense_test_accuracy": f"{measured['dense']['accuracy']:.4f}",
                "qlp.pruned_test_accuracy": f"{measured['pruned']['accuracy']:.4f}",
                "qlp.finetuned_test_accuracy": f"{measured['finetuned']['accuracy']:.4f}", "qlp.command": command,
                **{k: v for k, v in ws.loaded.metadata.items() if not k.startswith("qlp.")}}
    verification = export_verified(tuned, export.with_metadata(tuned_bytes, metadata), ws, staged / "model.onnx",
                                   policy, staged / "model.sparse.onnx" if settings.sparse_storage else None)
    verification["path"] = str(out / "model.onnx")  # where the file will be once the run's files are in place
    notes = [LATENCY_NOTE]
    if settings.sparse_storage:
        verification["sparse_path"] = str(out / "model.sparse.onnx")
        raw = (staged / "model.sparse.onnx").read_bytes()
        sparse_layers = len(onnx.load_from_string(raw).graph.sparse_initializer)
        identical = raw == (staged / "model.onnx").read_bytes()
        measured["sparse_storage"] = {"bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6)),
                                      "layers_stored_sparse": sparse_layers, "identical_to_model_onnx": identical,
                                      "max_density": export.SPARSE_STORAGE_MAX_DENSITY}
        if identical:
            notes.append(sparse_identical_note())
    int8 = None
    if settings.quantize is not None:  # after pruning and fine-tuning, on the verified file
        int8 = quantize_beside(ws, staged / "model.onnx", settings.quantize,
                                        measured["finetuned"]["accuracy"])
        int8["path"] = str(out / "model.int8.onnx")
        measured["int8"] = measure_onnx(staged / "model.int8.onnx", ws, settings.latency_repeats,
                                        "the int8 model")
    readback, _ = export.onnx_sparsity(onnx.load(str(staged / "model.onnx")))
    report = {
        "model": str(model_path), "model_sha256": ws.loaded.sha256, "data": ws.data.name, "device": ws.device,
        "method": policy.method, "target_sparsity": policy.target, "achieved_sparsity": policy.achieved,
        "file_global_sparsity": measured["finetuned"]["global_sparsity"],
        "test_images": len(ws.splits.test), "accuracy": {k: v["accuracy"] for k, v in measured.items()
                                                         if "accuracy" in v},
        "measured": measured, "verification": verification,
        "layers": [{"name": label, "module": n, "weights": w, "sparsity": s}
                   for label, n, w, s in zip(policy.labels, policy.layers, policy.numels, policy.sparsities,
                                             strict=True)],
        "search": {k: v for k, v in policy.search.items() if k not in PER_EPISODE},
        "scale": policy.search.get("scale", IN_PROCESS) if policy.search else None,
        "stages": [{k: v for k, v in s.items() if k != "sparsities"} for s in policy.stages],
        "finetune": finetune_report(settings.finetune, tuned),
        "file_layers_read_back": len(readback), "command": command,
        "int8": int8, "cpu": machine.cpu_capability(),
        "seed": {"search": policy.seed if policy.method in METHODS else None,
                 "finetune": None if settings.finetune is None else settings.finetune.seed,
                 "split": ws.split_seed},
        "settings": {**jsonable(settings), "device": ws.device, "data": ws.data.name,
                     "reward_split_images": len(ws.splits.reward), "finetune_split_images": len(ws.splits.finetune)},
        "versions": versions(), "notes": notes, "chance_accuracy": 1.0 / ws.data.num_classes,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(staged, report, policy)
    return report


def finetune_pruned(ws: Workspace, settings: TrainSettings, out: Path, command: str, resume: bool = False,
                    force: bool = False, int8: quantize.QuantizeSettings | None = None) -> dict:
    """Fine-tune a model that is already pruned: its zero weights are the masks, held at zero. `out` is written
    only when it does not exist or with `force`; its checkpoint (a hidden `.OUT.qlp-ckpt`) is continued with
    `resume`. In a torchrun job the ranks other than 0 only fine-tune: rank 0 checks, writes and measures."""
    if not ranks.is_main():
        _tuned(ws, settings, out, resume)
        return {"rank": ranks.rank()}  # the CLI prints nothing for it
    check_can_write(out, force, file_checkpoint(out), resume)
    lock = file_lock(out)
    lock.acquire()
    try:
        return _finetune_pruned(ws, settings, out, command, resume, int8)
    finally:
        lock.release()


def _tuned(ws: Workspace, settings: TrainSettings, out: Path, resume: bool) -> nn.Module:
    """The loaded model fine-tuned with its zeros as masks (the part every rank of a torchrun job runs)."""
    module = copy.deepcopy(ws.loaded.module)
    masks = {layer.name: layer.weight.detach() != 0 for layer in find_prunable_layers(module)}
    if settings.epochs > 0:
        finetune_guarded(module, ws, settings, "fine-tune", file_checkpoint(out), resume, record=ws.record,
                         masks=masks)
    return module


def _finetune_pruned(ws: Workspace, settings: TrainSettings, out: Path, command: str, resume: bool,
                     int8: quantize.QuantizeSettings | None) -> dict:
    module = _tuned(ws, settings, out, resume)
    module.cpu().eval()
    data = export_bytes(module, ws)
    measured = measure_onnx(data, ws, repeats=1)
    metadata = {**ws.loaded.metadata, "qlp.source_sha256": ws.loaded.sha256, "qlp.command": command,
                "qlp.finetuned_test_accuracy": f"{measured['accuracy']:.4f}"}
    export_verified(module, export.with_metadata(data, metadata), ws, out)
    if int8 is not None:
        measured["int8"] = quantize_beside(ws, out, int8, measured["accuracy"])
    file_checkpoint(out).unlink(missing_ok=True)
    return measured


def export_model(ws: Workspace, out: Path, sparse_path: Path | None = None,
                 int8: quantize.QuantizeSettings | None = None) -> dict:
    """The loaded model as a verified ONNX file (and its sparse-storage and int8 variants)."""
    from qlp_compress.report.progress import phase

    metadata = {**ws.loaded.metadata, "qlp.source_sha256": ws.loaded.sha256}
    with phase("export to ONNX"):
        data = export.with_metadata(export_bytes(ws.loaded.module, ws), metadata)
    lock = file_lock(out)
    lock.acquire()
    try:
        result = export_verified(ws.loaded.module, data, ws, out, sparse_path=sparse_path)
        if int8 is not None:
            result["int8"] = quantize_beside(ws, out, int8)
        return result
    finally:
        lock.release()
