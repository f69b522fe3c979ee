"""The commands' workflows, as library functions the CLI calls (and tests call directly)."""

from __future__ import annotations

import copy
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from torch import nn

from qlp_compress import data as datasets
from qlp_compress import export, quantize, runtime
from qlp_compress.allocate import ALLOCATORS, AllocationSettings, allocate
from qlp_compress.errors import Interrupted, QLPError, UsageError
from qlp_compress.finetune import TrainSettings, recalibrate_batchnorm, train
from qlp_compress.interrupts import sigterm_as_interrupt
from qlp_compress.io import atomic_write_bytes, atomic_write_text, check_file_size
from qlp_compress.masks import MagnitudePruner, apply_masks, check_finite, find_prunable_layers, pruned_count
from qlp_compress.outputs import OutputRun, check_unlocked, check_writable, file_lock, write_together
from qlp_compress.policy import Policy
from qlp_compress.qlp.env import PruningEnv
from qlp_compress.qlp.reward import Reward, RewardSettings
from qlp_compress.qlp.search import METHODS, SearchSettings, run_search
from qlp_compress.report import training_progress
from qlp_compress.zoo import build_model, stats_for

if TYPE_CHECKING:  # the importer pulls in onnx2torch and torchvision: loaded only when a model is read
    from qlp_compress.importer import LoadedModel


@dataclass(frozen=True)
class DataSettings:
    """Which data and how it is split."""

    data: str = "fashion-mnist"  # a name ("fashion-mnist", "cifar10"), a .npz file or an image folder
    data_dir: Path | None = None  # where to look first for a named data set
    reward_size: int | None = None  # training images held out for the reward (None: 5,000 or a tenth)
    split_seed: int = 0  # fixes which images form the reward split


def check_can_write(path: Path, force: bool, checkpoint: Path | None = None, resume: bool = False) -> None:
    """Refuse, before any work is done, an output file that exists (without --force) or cannot be written, and a
    checkpoint beside it that would be overwritten (without --resume or --force) or that a running run holds."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give the name of the file to write")
    if path.exists() and not force:
        how = "; --resume continues an interrupted run only, it does not overwrite" if resume else ""
        raise UsageError(f"{path} already exists; pass --force to overwrite it or choose another --out{how}")
    check_writable(path.parent, path)
    lock = file_lock(path)
    check_unlocked(lock.path, str(path))
    if checkpoint is not None and checkpoint.exists() and not (resume or force):
        raise UsageError(f"{checkpoint} already exists (the checkpoint of an interrupted run); pass --resume to "
                         "continue it, --force to start over, or choose another --out")


def check_sparsity(target: float) -> None:
    """A target sparsity must lie strictly between 0 and 1 (NaN is refused too)."""
    if not 0.0 < target < 1.0:
        raise UsageError(f"--sparsity must lie strictly between 0 and 1, got {target}; e.g. --sparsity 0.9 removes "
                         "90 % of the prunable weights")


def train_interruptible(model: nn.Module, dataset, settings: TrainSettings, what: str,
                        checkpoint: Path | None = None, resume: bool = False, **kwargs) -> list[dict]:
    """`finetune.train` with a progress bar, where Ctrl-C or SIGTERM stops with a one-line Interrupted error
    (exit code 130); the checkpoint of the last finished epoch is kept for --resume."""
    try:
        with sigterm_as_interrupt(), training_progress(what) as on_step:
            return train(model, dataset, settings, checkpoint=checkpoint, resume=resume, on_step=on_step, **kwargs)
    except KeyboardInterrupt:
        if checkpoint is None:
            raise Interrupted(f"{what} interrupted; rerun the command to start again") from None
        where = f"{checkpoint} keeps the last finished epoch" if checkpoint.exists() else "no epoch had finished yet"
        raise Interrupted(f"{what} interrupted; rerun the same command with --resume to continue ({where})") from None


def train_model(arch: str, data_settings: DataSettings, settings: TrainSettings, out: Path, command: str,
                resume: bool = False, force: bool = False, checkpoint: Path | None = None) -> dict:
    """Train a zoo model on the fine-tune split, export it to ONNX with metadata, measure test accuracy."""
    checkpoint = checkpoint or out.with_suffix(".ckpt")
    check_can_write(out, force, checkpoint, resume)
    data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
    splits = datasets.make_splits(data, data_settings.reward_size, data_settings.split_seed)
    mean, std = stats_for(data.name, data.input_shape[0])
    import torch

    torch.manual_seed(settings.seed)
    model = build_model(arch, data.input_shape[0], data.num_classes, mean, std)
    lock = file_lock(out)
    lock.acquire()
    try:
        return _train_and_export(arch, data, splits, model, settings, out, command, checkpoint, resume)
    finally:
        lock.release()


def _train_and_export(arch: str, data: datasets.ImageData, splits: datasets.Splits, model: nn.Module,
                      settings: TrainSettings, out: Path, command: str, checkpoint: Path, resume: bool) -> dict:
    history = train_interruptible(model, splits.finetune, settings, f"train {arch}", checkpoint, resume)
    train_seconds = sum(h.get("seconds", 0.0) for h in history)  # a resumed run counts every epoch
    model_bytes = export.to_onnx_bytes(model, data.input_shape)
    session = runtime.open_session(model_bytes)
    result = {
        "arch": arch, "data": data.name, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
        "reward_accuracy": runtime.session_accuracy(session, splits.reward),
        "test_accuracy": runtime.session_accuracy(session, splits.test),
        "epochs": settings.epochs, "train_seconds": round(train_seconds, 1), "history": history,
    }
    metadata = {"qlp.dataset": data.name, "qlp.input_shape": "x".join(map(str, data.input_shape)),
                "qlp.num_classes": data.num_classes, "qlp.arch": arch,
                "qlp.test_accuracy": f"{result['test_accuracy']:.4f}", "qlp.command": command,
                "qlp.train_seconds": result["train_seconds"]}
    model_bytes = export.with_metadata(model_bytes, metadata)
    onnx.checker.check_model(onnx.load_from_string(model_bytes), full_check=True)
    atomic_write_bytes(out, model_bytes)
    checkpoint.unlink(missing_ok=True)
    return result


def load_onnx_file(path: Path) -> onnx.ModelProto:
    """An ONNX file, parsed and checked by onnx.checker, with its external data (read relative to the file, and
    only from its folder)."""
    from qlp_compress.importer import _graph_io, read_onnx

    check_file_size(path, "model")
    proto = read_onnx(path)
    _graph_io(proto, path)  # one image input, one logits output, both float
    return proto


def evaluate_model(model_path: Path, data_settings: DataSettings | None, device: str = "auto",
                   latency_batches: tuple[int, ...] = (1, 64), repeats: int = 30) -> dict:
    """Accuracy on the test split, latency, file size and sparsity of an ONNX file, through onnxruntime."""
    device = runtime.resolve_device(device)
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {repeats}; e.g. --repeats 30")
    proto = load_onnx_file(model_path)
    session = runtime.open_session(model_path, device)  # onnxruntime reads external data relative to the file
    per_layer, global_sparsity = export.onnx_sparsity(proto)
    raw = model_path.read_bytes()
    input_shape = tuple(d if isinstance(d, int) else -1 for d in session.get_inputs()[0].shape[1:])
    result: dict = {"model": str(model_path), "data": None, "accuracy": None, "test_images": 0}
    if data_settings is not None:
        data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
        runtime.check_input_fits(session, data.input_shape, data.num_classes)
        input_shape = data.input_shape
    if any(d < 0 for d in input_shape):
        raise UsageError(f"{model_path} has a symbolic image size; pass --data so latency can use real images")
    try:
        if data_settings is not None:
            result.update(data=data.name, accuracy=runtime.session_accuracy(session, data.test),
                          test_images=len(data.test))
        latency = [vars(runtime.measure_latency(session, input_shape, b, repeats=repeats)) for b in latency_batches]
    except runtime.ORT_ERRORS as e:
        raise QLPError(f"onnxruntime cannot run {model_path} on images of shape {list(input_shape)} "
                       f"({runtime.ort_message(e)}); check that the file is an image classifier taking (N, C, H, W), "
                       "or re-export it") from e
    result.update(
        latency=latency,
        file_bytes=len(raw), gzip_bytes=len(gzip.compress(raw, 6)),
        weights=sum(n for n, _ in per_layer.values()), global_sparsity=global_sparsity,
        layers={name: {"weights": n, "sparsity": z / n} for name, (n, z) in per_layer.items()},
        metadata=export.read_metadata(proto),
    )
    return result


# --------------------------------------------------------------------------------------- compression


@dataclass(frozen=True)
class ModelSettings:
    """How to read the input model."""

    arch: str | None = None  # zoo architecture for a bare state dict
    trust_pickle: bool = False  # allow full-module pickles (runs code from the file)
    mean: tuple[float, ...] | None = None  # fold this normalisation in front of the model
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Workspace:
    """A loaded model with the data it is compressed on."""

    loaded: LoadedModel
    data: datasets.ImageData
    splits: datasets.Splits
    device: str  # resolved torch device

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape


def open_workspace(model_path: Path, model_settings: ModelSettings, data_settings: DataSettings,
                   device: str = "auto") -> Workspace:
    """Load the data and the model, and check that they fit each other."""
    import torch

    from qlp_compress.importer import load_model

    device = runtime.resolve_device(device)
    data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
    loaded = load_model(model_path, arch=model_settings.arch, trust_pickle=model_settings.trust_pickle,
                        num_classes=data.num_classes, in_channels=data.input_shape[0], mean=model_settings.mean,
                        std=model_settings.std, verify_input_shape=data.input_shape)
    check_finite(loaded.module)
    try:
        find_prunable_layers(loaded.module)
    except QLPError as e:
        raise QLPError(f"{model_path} has no prunable layer (Conv, or Linear/Gemm with a constant weight); nothing to "
                       "compress: give a model with convolutional or fully connected layers") from e
    if loaded.input_shape is not None and tuple(loaded.input_shape) != tuple(data.input_shape):
        raise UsageError(f"{model_path} takes images of shape {list(loaded.input_shape)} but {data.name} has "
                         f"{list(data.input_shape)}; pick the data set the model was trained on")
    x, _ = next(datasets.iterate_batches(data.test, 2))
    try:
        with torch.no_grad():
            logits = loaded.module.eval()(x)
    except RuntimeError as e:
        raise UsageError(f"{model_path} cannot run on {data.name} images of shape {list(data.input_shape)} "
                         f"({str(e).splitlines()[0][:120]}); pick the data set the model was trained on") from e
    if logits.ndim != 2 or logits.shape[1] != data.num_classes:
        raise UsageError(f"{model_path} outputs shape {list(logits.shape[1:])} but {data.name} has "
                         f"{data.num_classes} classes; pick the data set the model was trained on")
    if not torch.isfinite(logits).all():
        raise QLPError(f"{model_path} outputs NaN or inf on {data.name} images; re-export the model from a healthy "
                       "checkpoint (and check --mean/--std)")
    splits = datasets.make_splits(data, data_settings.reward_size, data_settings.split_seed)
    return Workspace(loaded, data, splits, device)


def check_demonstrations(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in ALLOCATORS]
    if unknown:
        raise UsageError(f"--demonstrations: unknown allocation {unknown[0]!r}; use a comma-separated list of "
                         f"{', '.join(ALLOCATORS)}, or none")


def find_policy(ws: Workspace, method: str, target: float, search: SearchSettings | None = None,
                reward_settings: RewardSettings | None = None, allocation: AllocationSettings | None = None,
                checkpoint: Path | None = None, resume: bool = False,
                on_episode: Callable[[dict], None] | None = None) -> Policy:
    """Per-layer sparsities by QLP, random search or a baseline allocator."""
    check_sparsity(target)
    layers = find_prunable_layers(ws.loaded.module)
    names, numels = [layer.name for layer in layers], [layer.numel for layer in layers]
    common = {"target": target, "layers": names, "numels": numels, "model_sha256": ws.loaded.sha256}
    weights = {layer.name: layer.weight.detach() for layer in layers}

    def baseline(name: str, goal: float) -> list[float]:
        sparsities = allocate(name, weights, goal, allocation or AllocationSettings())
        return [sparsities[n] for n in names]

    if method in ALLOCATORS:
        return Policy(method=method, sparsities=baseline(method, target), **common)
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; use one of {', '.join((*METHODS, *ALLOCATORS))}")
    search = replace(search or SearchSettings(target=target), target=target, method=method)
    check_demonstrations(search.demonstrations)
    reward = Reward(ws.loaded.module, ws.splits.reward, reward_settings or RewardSettings(device=ws.device))
    env = PruningEnv(reward.numels, reward, search.env)
    result = run_search(env, search, checkpoint=checkpoint, resume=resume, on_episode=on_episode,
                        allocation=baseline)
    if result.final.sparsities is None:
        raise QLPError(f"no episode reached sparsity {target} in {search.episodes} episodes; raise --episodes "
                       "or --passes")
    outside = result.total_seconds - result.reward_seconds
    stats = {"episodes": len(result.history), "reward_evaluations": reward.evaluations,
             "reward_engine": reward.engine, "reward_images": len(reward.y),
             "wall_seconds": round(result.total_seconds, 2), "reward_seconds": round(result.reward_seconds, 2),
             "seconds_per_episode": round(result.total_seconds / max(1, len(result.history)), 4),
             "share_outside_reward": round(outside / max(1e-9, result.total_seconds), 4),
             "rewards": [round(h["reward"], 5) for h in result.history],
             "stage_of_episode": [h["stage"] for h in result.history]}
    stages = [{"target": b.target, "reward": b.reward, "episode": b.episode, "sparsities": b.sparsities,
               "demonstration": b.demonstration} for b in result.best]
    return Policy(method=method, sparsities=result.final.sparsities, best_reward=result.final.reward,
                  stages=stages, search=stats, seed=search.seed, **common)


BN_RECALIBRATION_IMAGES = 2048  # fine-tune images used to re-estimate BatchNorm right after pruning


def prune_and_finetune(ws: Workspace, policy: Policy, settings: TrainSettings | None,
                       checkpoint: Path | None = None, resume: bool = False) -> tuple[nn.Module, nn.Module, dict]:
    """Masks from the policy → (pruned model, fine-tuned model, masks). No fine-tuning when settings is None.

    The pruned model's BatchNorm statistics are re-estimated on fine-tune images first (no weight changes):
    pruning shifts every activation, and stale statistics leave a 90 %-sparse ResNet at chance level."""
    pruned = copy.deepcopy(ws.loaded.module)
    masks = MagnitudePruner(pruned).masks(policy.by_layer())
    apply_masks(pruned, masks)
    batches = datasets.iterate_batches(ws.splits.finetune, 256, limit=BN_RECALIBRATION_IMAGES)
    recalibrate_batchnorm(pruned, (x for x, _ in batches))
    tuned = copy.deepcopy(pruned)
    if settings is not None and settings.epochs > 0:
        train_interruptible(tuned, ws.splits.finetune, settings, "fine-tune", checkpoint, resume, masks=masks)
    return pruned.cpu().eval(), tuned.cpu().eval(), masks


def export_bytes(module: nn.Module, ws: Workspace) -> bytes:
    return export.to_onnx_bytes(module, ws.input_shape, ws.loaded.input_name, ws.loaded.output_name)


def export_verified(module: nn.Module, data: bytes, ws: Workspace, path: Path, policy: Policy | None = None,
                    sparse_path: Path | None = None) -> dict:
    """Verify an export of `module` against it (outputs, zero patterns, per-layer sparsity = policy within one
    weight), write it and check that the file holds exactly what was verified; the same for sparse storage."""
    import numpy as np

    loaded = ws.loaded
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    x, _ = datasets.materialize(ws.splits.reward, limit=64)
    masks = {layer.name: (layer.weight != 0).detach().cpu() for layer in find_prunable_layers(module)}
    check = export.verify_onnx(module, data, x, masks)
    if policy is not None:
        file_weights = export.weight_initializers(onnx.load_from_string(data))
        for name, n, s in zip(policy.layers, policy.numels, policy.sparsities, strict=True):
            zeros = int((file_weights[check["onnx_weight"][name]] == 0).sum())
            if abs(zeros - pruned_count(s, n)) > 1:
                raise QLPError(f"layer {name} has {zeros} zero weights in the export but the policy prunes "
                               f"{pruned_count(s, n)}; rerun with --debug and report it")
    result = {"path": str(path), "bytes": len(data), **{k: v for k, v in check.items() if k != "onnx_weight"}}
    files = {path: data}
    if sparse_path is not None:
        sparse = export.to_sparse_storage(data)
        # no full_check: ONNX shape inference does not accept sparse tensors as Conv/Gemm weights
        onnx.checker.check_model(onnx.load_from_string(sparse))
        dense_out = runtime.open_session(data).run(None, {loaded.input_name: x.numpy()})[0]
        sparse_out = runtime.open_session(sparse).run(None, {loaded.input_name: x.numpy()})[0]
        dense_w = export.weight_initializers(onnx.load_from_string(data))
        sparse_w = export.weight_initializers(onnx.load_from_string(sparse))
        if not (np.array_equal(dense_out, sparse_out) and dense_w.keys() == sparse_w.keys()
                and all(np.array_equal(dense_w[k], sparse_w[k]) for k in dense_w)):
            raise QLPError("the sparse-storage file differs from the dense one; rerun with --debug and report it")
        files[sparse_path] = sparse
        result.update(sparse_path=str(sparse_path), sparse_bytes=len(sparse))
    write_together(files)  # both files or neither: a failure leaves the previous ones
    for written, content in files.items():
        if written.read_bytes() != content:
            raise QLPError(f"{written} does not hold what was written; check the disk and rerun")
    return result


def measure_onnx(model: Path | bytes, ws: Workspace, repeats: int = 30) -> dict:
    """Test accuracy, latency (batch 1 and 64) and sizes of an ONNX model through onnxruntime."""
    raw = model.read_bytes() if isinstance(model, Path) else model
    session = runtime.open_session(raw, ws.device)
    return {"accuracy": runtime.session_accuracy(session, ws.splits.test),
            "latency": [vars(runtime.measure_latency(session, ws.input_shape, b, repeats=repeats)) for b in (1, 64)],
            "bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6)),
            "global_sparsity": export.onnx_sparsity(onnx.load_from_string(raw))[1]}


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


def default_out_dir(model_path: Path, method: str, target: float) -> Path:
    if method not in (*METHODS, *ALLOCATORS):  # a name read from a file never becomes part of a path unchecked
        raise UsageError(f"unknown method {method!r}; use one of {', '.join((*METHODS, *ALLOCATORS))}")
    return model_path.parent / f"{model_path.stem}.{method}-{target:g}"


def compress(model_path: Path, ws: Workspace, settings: CompressSettings, out: Path, command: str,
             resume: bool = False, policy: Policy | None = None, force: bool = False) -> dict:
    """Search (or allocate) → prune → fine-tune → export → verify → report, all files under `out`, written as a
    set (qlp_compress.outputs): an existing folder is replaced only with `force`, and only when the run succeeds."""
    with OutputRun(out, force, resume) as run:
        report = _compress(model_path, ws, settings, out, run, command, resume, policy)
        run.commit()
    return report


def _compress(model_path: Path, ws: Workspace, settings: CompressSettings, out: Path, run: OutputRun, command: str,
              resume: bool, policy: Policy | None) -> dict:
    from qlp_compress.report import search_progress, write_report

    work, staged = run.work, run.staging
    started = time.perf_counter()
    if policy is None and settings.method not in METHODS:  # a baseline allocator: closed form, no search
        policy = find_policy(ws, settings.method, settings.target, allocation=settings.allocation)
    if policy is None:
        search = settings.search or SearchSettings(target=settings.target)
        with search_progress(f"{settings.method} search", search.episodes) as on_episode:
            policy = find_policy(ws, settings.method, settings.target, search, settings.reward,
                                 checkpoint=work / "search.ckpt", resume=resume, on_episode=on_episode)
    policy.save(staged / "policy.json")
    pruned, tuned, _ = prune_and_finetune(ws, policy, settings.finetune, work / "finetune.ckpt", resume)
    tuned_bytes = export_bytes(tuned, ws)
    measured = {"dense": measure_onnx(export_bytes(ws.loaded.module, ws), ws, settings.latency_repeats),
                "pruned": measure_onnx(export_bytes(pruned, ws), ws, settings.latency_repeats),
                "finetuned": measure_onnx(tuned_bytes, ws, settings.latency_repeats)}
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
    if settings.sparse_storage:
        verification["sparse_path"] = str(out / "model.sparse.onnx")
        raw = (staged / "model.sparse.onnx").read_bytes()
        measured["sparse_storage"] = {"bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6))}
    int8 = None
    if settings.quantize is not None:  # after pruning and fine-tuning, on the verified file
        int8 = quantize.quantize_beside(ws, staged / "model.onnx", settings.quantize,
                                        measured["finetuned"]["accuracy"])
        int8["path"] = str(out / "model.int8.onnx")
        measured["int8"] = measure_onnx(staged / "model.int8.onnx", ws, settings.latency_repeats)
    readback, _ = export.onnx_sparsity(onnx.load(str(staged / "model.onnx")))
    report = {
        "model": str(model_path), "model_sha256": ws.loaded.sha256, "data": ws.data.name, "device": ws.device,
        "method": policy.method, "target_sparsity": policy.target, "achieved_sparsity": policy.achieved,
        "file_global_sparsity": measured["finetuned"]["global_sparsity"],
        "test_images": len(ws.splits.test), "accuracy": {k: v["accuracy"] for k, v in measured.items()
                                                         if "accuracy" in v},
        "measured": measured, "verification": verification,
        "layers": [{"name": n, "weights": w, "sparsity": s}
                   for n, w, s in zip(policy.layers, policy.numels, policy.sparsities, strict=True)],
        "search": {k: v for k, v in policy.search.items() if k not in ("rewards", "stage_of_episode")},
        "stages": [{k: v for k, v in s.items() if k != "sparsities"} for s in policy.stages],
        "finetune": None if settings.finetune is None else {"epochs": settings.finetune.epochs,
                                                            "lr": settings.finetune.lr},
        "file_layers_read_back": len(readback), "command": command,
        "int8": int8, "cpu": quantize.cpu_capability(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(staged, report, policy)
    return report


def finetune_pruned(ws: Workspace, settings: TrainSettings, out: Path, command: str, resume: bool = False,
                    force: bool = False, int8: quantize.QuantizeSettings | None = None) -> dict:
    """Fine-tune a model that is already pruned: its zero weights are the masks, held at zero. `out` is written
    only when it does not exist or with `force`; its checkpoint (OUT.ckpt) is continued with `resume`."""
    check_can_write(out, force, out.with_suffix(".ckpt"), resume)
    lock = file_lock(out)
    lock.acquire()
    try:
        return _finetune_pruned(ws, settings, out, command, resume, int8)
    finally:
        lock.release()


def _finetune_pruned(ws: Workspace, settings: TrainSettings, out: Path, command: str, resume: bool,
                     int8: quantize.QuantizeSettings | None) -> dict:
    module = copy.deepcopy(ws.loaded.module)
    masks = {layer.name: layer.weight.detach() != 0 for layer in find_prunable_layers(module)}
    if settings.epochs > 0:
        train_interruptible(module, ws.splits.finetune, settings, "fine-tune", out.with_suffix(".ckpt"), resume,
                            masks=masks)
    module.cpu().eval()
    data = export_bytes(module, ws)
    measured = measure_onnx(data, ws, repeats=1)
    metadata = {**ws.loaded.metadata, "qlp.source_sha256": ws.loaded.sha256, "qlp.command": command,
                "qlp.finetuned_test_accuracy": f"{measured['accuracy']:.4f}"}
    export_verified(module, export.with_metadata(data, metadata), ws, out)
    if int8 is not None:
        measured["int8"] = quantize.quantize_beside(ws, out, int8, measured["accuracy"])
    out.with_suffix(".ckpt").unlink(missing_ok=True)
    return measured


def export_model(ws: Workspace, out: Path, sparse_path: Path | None = None,
                 int8: quantize.QuantizeSettings | None = None) -> dict:
    """The loaded model as a verified ONNX file (and its sparse-storage and int8 variants)."""
    metadata = {**ws.loaded.metadata, "qlp.source_sha256": ws.loaded.sha256}
    data = export.with_metadata(export_bytes(ws.loaded.module, ws), metadata)
    lock = file_lock(out)
    lock.acquire()
    try:
        result = export_verified(ws.loaded.module, data, ws, out, sparse_path=sparse_path)
        if int8 is not None:
            result["int8"] = quantize.quantize_beside(ws, out, int8)
        return result
    finally:
        lock.release()


def compare(ws: Workspace, methods: list[str], targets: list[float], search: SearchSettings,
            reward_settings: RewardSettings, allocation: AllocationSettings, finetune: TrainSettings | None,
            out: Path, command: str, force: bool = False) -> list[dict]:
    """Every method at every target: same masks rule, same fine-tuning budget, test accuracy via onnxruntime.

    compare.json and compare.md are written as a set at the end (qlp_compress.outputs); the rows measured so far
    are also kept in OUT/.work/compare.json after every cell, so an interrupted comparison keeps what it measured."""
    for method in methods:
        if method not in ALLOCATORS and method not in METHODS:
            raise UsageError(f"unknown method {method!r}; use {', '.join((*METHODS, *ALLOCATORS))}")
    with OutputRun(out, force, False, resumable=False) as run:
        rows = _compare(ws, methods, targets, search, reward_settings, allocation, finetune, run, command)
        run.commit()
    return rows


def _compare(ws: Workspace, methods: list[str], targets: list[float], search: SearchSettings,
             reward_settings: RewardSettings, allocation: AllocationSettings, finetune: TrainSettings | None,
             run: OutputRun, command: str) -> list[dict]:
    from qlp_compress.io import atomic_write_json
    from qlp_compress.report import compare_markdown, search_progress

    dense_accuracy = measure_onnx(export_bytes(ws.loaded.module, ws), ws, repeats=1)["accuracy"]
    rows = []
    for target in targets:
        for method in methods:
            started = time.perf_counter()
            if method in METHODS:
                with search_progress(f"{method} @ {target:g}", search.episodes) as on_episode:
                    policy = find_policy(ws, method, target, replace(search, target=target), reward_settings,
                                         on_episode=on_episode)
            else:
                policy = find_policy(ws, method, target, allocation=allocation)
            search_seconds = time.perf_counter() - started
            pruned, tuned, _ = prune_and_finetune(ws, policy, finetune)
            rows.append({"method": method, "target": target, "achieved": policy.achieved,
                         "dense_accuracy": dense_accuracy,
                         "pruned_accuracy": measure_onnx(export_bytes(pruned, ws), ws, repeats=1)["accuracy"],
                         "finetuned_accuracy": measure_onnx(export_bytes(tuned, ws), ws, repeats=1)["accuracy"]
                         if finetune else None,
                         "best_reward": policy.best_reward, "search_seconds": round(search_seconds, 1),
                         "sparsities": policy.sparsities})
            document = {"command": command, "model_sha256": ws.loaded.sha256, "layers": policy.layers, "rows": rows}
            atomic_write_json(run.work / "compare.json", document)
    atomic_write_json(run.staging / "compare.json", document)
    atomic_write_text(run.staging / "compare.md", compare_markdown(rows, command))
    return rows
