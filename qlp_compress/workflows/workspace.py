"""What every workflow shares: the data and model settings, the loaded model with its splits (Workspace), checks
before work starts, interruptible training, and verified export and measurement of ONNX files."""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn
from torch.utils.data import Subset

from qlp_compress import data as datasets
from qlp_compress.base.errors import Interrupted, QLPError, UsageError
from qlp_compress.base.interrupts import sigterm_as_interrupt
from qlp_compress.base.io import check_file_size, load_checkpoint
from qlp_compress.base.locks import check_unlocked, file_lock
from qlp_compress.base.outputs import check_writable, write_together
from qlp_compress.base.resume import check_same
from qlp_compress.deploy import engine, export
from qlp_compress.pruning.masks import MagnitudePruner, apply_masks, check_finite, find_prunable_layers, pruned_count
from qlp_compress.pruning.policy import Policy
from qlp_compress.report.progress import phase, training_progress
from qlp_compress.train.distributed import fit
from qlp_compress.train.finetune import TrainSettings, finetune_record
from qlp_compress.train.measure import recalibrate_batchnorm

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


def training_record(settings: TrainSettings, record: Mapping[str, object] | None = None,
                    epochs_option: str = "--finetune-epochs") -> dict[str, object]:
    """What a training checkpoint records (base.resume): the run's `record`, and the training settings under the
    options that set them (the run's record wins where both name one)."""
    return {epochs_option: settings.epochs, "--lr": settings.lr, "--batch-size": settings.batch_size,
            "--weight-decay": settings.weight_decay, "--schedule": settings.schedule, "--seed": settings.seed,
            "--device": settings.device, **(record or {})}


def train_interruptible(model: nn.Module, dataset, settings: TrainSettings, what: str,
                        checkpoint: Path | None = None, resume: bool = False, record: Mapping | None = None,
                        epochs_option: str = "--finetune-epochs", **kwargs) -> list[dict]:
    """`finetune.train` with a progress bar, in this process or on settings.nproc (train.distributed.fit), where
    Ctrl-C or SIGTERM stops with a one-line Interrupted error (exit code 130); the checkpoint of the last finished
    epoch is kept for --resume. The checkpoint records `training_record(settings, record, epochs_option)`, and
    --resume with other settings is refused, naming one (another --nproc is not: the global batches are the same)."""
    full = training_record(settings, record, epochs_option)
    if resume and checkpoint is not None and checkpoint.exists():
        check_same(load_checkpoint(checkpoint).get("run_settings"), full)
    try:
        with sigterm_as_interrupt():
            return fit(model, dataset, settings, functools.partial(training_progress, what), checkpoint=checkpoint,
                       resume=resume, run_settings=full, **kwargs)
    except KeyboardInterrupt:
        if checkpoint is None:
            raise Interrupted(f"{what} interrupted; rerun the command to start again") from None
        where = f"{checkpoint} keeps the last finished epoch" if checkpoint.exists() else "no epoch had finished yet"
        raise Interrupted(f"{what} interrupted; rerun the same command with --resume to continue ({where})") from None


REWARD_IMAGES = 1000  # the reward's default --reward-images: it measures the reward split's first images


def held_out_images(ws: Workspace, measured: int = REWARD_IMAGES):
    """The reward split after its first `measured` images (those the search's reward measured), or all of it when
    it holds no others: images fine-tuning never trains on and the reward never measured. Fine-tuning keeps its best
    state on them (train.guard); the test split never steers it."""
    reward = ws.splits.reward
    skip = measured if len(reward) > measured else 0
    if isinstance(reward, datasets.TensorImages):
        return reward.subset(torch.arange(skip, len(reward)))
    return Subset(reward, list(range(skip, len(reward))))


def finetune_guarded(model: nn.Module, ws: Workspace, settings: TrainSettings, what: str,
                     checkpoint: Path | None = None, resume: bool = False, measured: int | None = None,
                     **kwargs) -> list[dict]:
    """`train_interruptible` on the fine-tune split, guarded on `held_out_images(ws, measured)` (train.guard;
    None: the reward's default count); its checkpoint records ws.record unless `record` says otherwise."""
    held_out = held_out_images(ws, REWARD_IMAGES if measured is None else measured)
    kwargs.setdefault("record", ws.record)
    return train_interruptible(model, ws.splits.finetune, settings, what, checkpoint, resume, held_out=held_out,
                               **kwargs)


def finetune_report(settings: TrainSettings | None, tuned: nn.Module, **extra) -> dict | None:
    """report.json's `finetune`: the settings, `extra`, and what fine-tuning recorded (finetune_record: the
    learning rate it used, the held-out accuracy before and after, every divergence undone)."""
    if settings is None:
        return None
    return {"epochs": settings.epochs, "lr": settings.lr, **extra, **finetune_record(tuned)}




def load_onnx_file(path: Path) -> onnx.ModelProto:
    """An ONNX file, parsed and checked by onnx.checker, with its external data (read relative to the file, and
    only from its folder)."""
    from qlp_compress.importer import graph_io as _graph_io
    from qlp_compress.importer import read_onnx

    check_file_size(path, "model")
    proto = read_onnx(path)
    _graph_io(proto, path)  # one image input, one logits output, both float
    return proto



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
    split_seed: int = 0  # which training images form the reward split
    # what every partial result of a run on it records, and --resume must match (base.resume): the model, the data
    # and its reward split from open_workspace, and the run's options from with_record
    record: Mapping[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape


def open_workspace(model_path: Path, model_settings: ModelSettings, data_settings: DataSettings,
                   device: str = "auto") -> Workspace:
    """Load the data and the model, and check that they fit each other."""
    import torch

    from qlp_compress.importer import load_model

    device = engine.resolve_device(device)
    with phase(f"load {data_settings.data}"):
        data = datasets.load_dataset(data_settings.data, data_settings.data_dir)
    with phase(f"import {model_path.name} (convert and check against the original)"):
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
    return Workspace(loaded, data, splits, device, data_settings.split_seed,
                     {"model": loaded.sha256, "--data": data.name, "--reward-size": len(splits.reward)})


def with_record(ws: Workspace, options: Mapping[str, object]) -> Workspace:
    """`ws` whose partial results also record `options` (option → value: what shapes the run's results)."""
    return replace(ws, record={**ws.record, **options})


def digest(value: object) -> str:
    """A SHA-256 of a JSON-able value (a record of a long list, such as per-layer sparsities)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()




BN_RECALIBRATION_IMAGES = 2048  # fine-tune images used to re-estimate BatchNorm right after pruning



def export_bytes(module: nn.Module, ws: Workspace) -> bytes:
    """`module` as ONNX, each prunable weight named `<the layer's readable name>.weight` (base.names), so that
    `evaluate` on the file shows the names the run's reports and policy.json show."""
    data = export.to_onnx_bytes(module, ws.input_shape, ws.loaded.input_name, ws.loaded.output_name)
    paths = [layer.name for layer in find_prunable_layers(module)]
    return export.name_weights(data, {f"{p}.weight": f"{n}.weight"
                                      for p, n in zip(paths, ws.loaded.names_of(paths), strict=True)})


def export_verified(module: nn.Module, data: bytes, ws: Workspace, path: Path, policy: Policy | None = None,
                    sparse_path: Path | None = None) -> dict:
    """Verify an export of `module` against it (outputs, zero patterns, per-layer sparsity = policy within one
    weight), write it and check that the file holds exactly what was verified; the same for sparse storage."""
    with phase(f"verify and write {path.name}" + (f" and {sparse_path.name}" if sparse_path is not None else "")):
        return _export_verified(module, data, ws, path, policy, sparse_path)


def _export_verified(module: nn.Module, data: bytes, ws: Workspace, path: Path, policy: Policy | None,
                     sparse_path: Path | None) -> dict:
    import numpy as np

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
        dense_out = engine.outputs(engine.open_session(data), x.numpy())
        sparse_out = engine.outputs(engine.open_session(sparse), x.numpy())
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


def measure_onnx(model: Path | bytes, ws: Workspace, repeats: int = 30, what: str = "the model") -> dict:
    """Test accuracy, latency (batch 1 and 64) and sizes of an ONNX model through onnxruntime."""
    raw = model.read_bytes() if isinstance(model, Path) else model
    with phase(f"measure {what} (onnxruntime: test accuracy, latency)"):
        session = engine.open_session(raw, ws.device)
        return {"accuracy": engine.session_accuracy(session, ws.splits.test),
                "latency": [vars(engine.measure_latency(session, ws.input_shape, b, repeats=repeats))
                            for b in (1, 64)],
                "bytes": len(raw), "gzip_bytes": len(gzip.compress(raw, 6)),
                "global_sparsity": export.onnx_sparsity(onnx.load_from_string(raw))[1]}


def recalibrate_and_finetune(ws: Workspace, pruned: nn.Module, settings: TrainSettings | None, *,
                             what: str = "fine-tune", checkpoint: Path | None = None, resume: bool = False,
                             record: Mapping[str, object] | None = None, epochs_option: str = "--finetune-epochs",
                             held_out=None, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The step every structure shares once it has pruned: (pruned network, fine-tuned copy), both on the CPU in
    eval mode. No fine-tuning when settings is None or its epochs are 0. `what` names the fine-tuning in its
    progress and its interruption message; its checkpoint records `record` (ws.record when None); with `held_out`
    images fine-tuning is guarded on them (train.guard); `kwargs` reach finetune.train (masks held, a teacher).

    The pruned network's BatchNorm statistics are re-estimated on fine-tune images first (no weight changes):
    pruning shifts every activation, and stale statistics leave a 90 %-sparse ResNet at chance level."""
    batches = datasets.iterate_batches(ws.splits.finetune, 256, limit=BN_RECALIBRATION_IMAGES)
    recalibrate_batchnorm(pruned, (x for x, _ in batches))
    tuned = copy.deepcopy(pruned)
    if settings is not None and settings.epochs > 0:
        train_interruptible(tuned, ws.splits.finetune, settings, what, checkpoint, resume,
                            ws.record if record is None else record, epochs_option, held_out=held_out, **kwargs)
    return pruned.cpu().eval(), tuned.cpu().eval()


def policy_masks(ws: Workspace, policy: Policy) -> dict[str, torch.Tensor]:
    """Weight mode: the policy's magnitude masks on the workspace's dense model (1 = kept), by layer name."""
    return MagnitudePruner(ws.loaded.module).masks(policy.by_layer())


def prune_weights_and_finetune(ws: Workspace, policy: Policy, settings: TrainSettings | None,
                               checkpoint: Path | None = None, resume: bool = False, what: str = "fine-tune",
                               epochs_option: str = "--finetune-epochs",
                               measured: int | None = None) -> tuple[nn.Module, nn.Module]:
    """Weight mode: the policy's magnitude masks, then `recalibrate_and_finetune` with the masks held (the
    checkpoint also records the allocation). With `measured` (the reward's image count), fine-tuning is guarded on
    held_out_images(ws, measured); without, as for the candidates of workflows.selection, it is not."""
    pruned = copy.deepcopy(ws.loaded.module)
    masks = policy_masks(ws, policy)
    apply_masks(pruned, masks)
    return recalibrate_and_finetune(ws, pruned, settings, what=what, checkpoint=checkpoint, resume=resume,
                                    record={**ws.record, "allocation": digest(list(policy.sparsities))},
                                    epochs_option=epochs_option, masks=masks,
                                    held_out=None if measured is None else held_out_images(ws, measured))
