"""The PyTorch training loop: trains a dense model (`train`) or fine-tunes a pruned one with its masks held, in one
process or as one rank of several (train.ranks, train.distributed).

Masked weights stay exactly zero: their gradients are zeroed before each step and the weights and the
momentum buffers are re-masked after it, so neither weight decay nor momentum can regrow them. Under DDP the
gradients are masked after they are averaged, so every rank takes the same step and holds the same zeros.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from qlp_compress.base.io import atomic_torch_save, load_checkpoint
from qlp_compress.data import iterate_shares
from qlp_compress.train import ranks
from qlp_compress.train.guard import RANGE_STEPS, Guard, GuardSettings, find_lr, first_batches, loss_on

RECORD = "qlp_finetune"  # the attribute `train` leaves its record in (see finetune_record)


@dataclass(frozen=True)
class TrainSettings:
    """How to train or fine-tune."""

    epochs: float = 15.0  # passes over the data; a fraction (0.05) trains on part of one epoch
    batch_size: int = 128  # images per step, all ranks together (each rank takes about batch_size / nproc of them)
    lr: float | None = 0.1  # peak learning rate of SGD; None: from a range test on the first batches (guard.find_lr)
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # L2 penalty on all parameters
    schedule: str = "cosine"  # "cosine" (linear warm-up then cosine to 0) or "onecycle"
    warmup_epochs: float = 1.0  # linear warm-up length for "cosine"
    augment: bool = True  # random crop (padding 1/8 of the side) and horizontal flip
    seed: int = 0  # shuffling, augmentation and initialisation
    device: str = "cpu"  # torch device to train on ("cuda": one GPU per rank)
    nproc: int = 1  # processes training together with torch DDP (train.distributed); 1: this process alone


def _cosine(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


SCHEDULES = {
    "cosine": lambda opt, s, total, per_epoch: torch.optim.lr_scheduler.LambdaLR(
        opt, _cosine(total, min(total // 2, int(s.warmup_epochs * per_epoch)))),
    "onecycle": lambda opt, s, total, per_epoch: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=s.lr, total_steps=total),
}


def augment(x: torch.Tensor, generator: torch.Generator, rows: slice = slice(None),
            batch: int | None = None) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding, each image drawn independently. `x` may be the
    `rows` of a batch of `batch` images (a rank's share): the draws are made for the whole batch and the share takes
    its rows, so that ranks drawing from equal generators augment their images as one process would."""
    n, c, h, w = x.shape
    drawn = n if batch is None else batch
    pad = max(1, h // 8)
    flip = (torch.rand(drawn, generator=generator) < 0.5)[rows].to(x.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (drawn,), generator=generator)[rows].to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (drawn,), generator=generator)[rows].to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


class MaskHolder:
    """Keeps pruned weights at exactly zero during training."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], device: torch.device):
        modules = dict(model.named_modules())
        self.pairs = [(modules[name].weight, keep.to(device)) for name, keep in masks.items()]

    @torch.no_grad()
    def before_step(self) -> None:
        for w, keep in self.pairs:
            if w.grad is not None:
                w.grad.mul_(keep)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for w, keep in self.pairs:
            w.mul_(keep)
            buf = optimizer.state.get(w, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(keep)

    @torch.no_grad()
    def remask(self) -> None:
        for w, keep in self.pairs:
            w.mul_(keep)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from the teacher's softened logits to the student's, × T² (Hinton et al. 2015). A teacher with large
    logits (a network without BatchNorm) makes this term steeper; the learning rate found by the range test
    (guard.find_lr) measures the whole objective, distillation included, and so comes out smaller for it (docs/
    method.md: dividing the logits by the teacher's scale instead cost 1 to 5 points)."""
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                  log_target=True, reduction="batchmean")
    return kl * temperature**2


def _objective(weight: float, temperature: float) -> Callable:
    def objective(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        if teacher_logits is None:
            return loss
        return (1.0 - weight) * loss + weight * distillation_loss(logits, teacher_logits, temperature)

    return objective


def _sgd(model: nn.Module, settings: TrainSettings, lr: float, weight_decay: float | None = None) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # fixed parameters (channel-mode shortcut maps) are never trained
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BatchNorm and biases
    wd = settings.weight_decay if weight_decay is None else weight_decay
    return torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=settings.momentum, nesterov=settings.momentum > 0)


def train(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    masks: Mapping[str, torch.Tensor] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 4.0,
    held_out: Dataset | None = None,
    guard: GuardSettings | None = GuardSettings(),
    run_settings: Mapping[str, object] | None = None,
) -> list[dict]:
    """Train `model` in place; returns one record per epoch (loss, accuracy on the training batches).

    With `checkpoint`, the state is saved atomically after every epoch; with `resume`, training continues
    from it and ends where an uninterrupted run would have ended. `settings.lr` None: the learning rate comes from
    a range test on the first batches (guard.find_lr). With `held_out` images (and `guard`), the run is guarded
    (qlp_compress.train.guard): divergence is undone, training ends on the best held-out state, and
    `finetune_record(model)` tells what happened (also when `settings.lr` is None). `run_settings` (base.resume)
    is kept in the checkpoint for the caller to compare on resume.

    In a process group (train.distributed) this is one rank: the ranks must hold the same model shapes and masks
    (checked first); every rank draws the order and the augmentation from the same generator and trains on its slice
    of each of one process's batches (data.iterate_shares), its loss weighted by its share; DistributedDataParallel
    averages the gradients, so the step is one process's step. Only rank 0 saves the checkpoint, and `resume`
    restores every rank from it.
    """
    device = ranks.device(settings.device)
    model.to(device)
    ranks.check_same_model(model, masks)
    ranks.sync_states(model)
    steps_per_epoch = math.ceil(len(dataset) / settings.batch_size)
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)  # the same on every rank: order and augmentation
    holder = MaskHolder(model, masks, device) if masks else None
    if teacher is not None:
        teacher = teacher.to(device).eval()
    objective = _objective(distill_weight, distill_temperature)
    history: list[dict] = []
    start_epoch = 0
    state = ranks.from_main(_load(checkpoint, settings) if resume and checkpoint is not None and ranks.is_main()
                            and checkpoint.exists() else None)
    watch = None if held_out is None or guard is None or len(held_out) == 0 else \
        Guard(held_out, guard, total_steps, steps_per_epoch, device, state.get("guard") if state else None)
    record = watch.record if watch is not None else {}
    if state is not None:
        lr = state.get("lr", settings.lr)
    else:
        lr, record = _first_lr(model, dataset, settings, objective, teacher, holder, device, watch, record)
    optimizer = _sgd(model, settings, lr)
    scheduler = SCHEDULES[settings.schedule](optimizer, replace(settings, lr=lr), total_steps, steps_per_epoch)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
            history, start_epoch = state["history"], state["epoch"] + 1
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            from qlp_compress.base.errors import QLPError

            raise QLPError(f"checkpoint {checkpoint} is damaged ({type(e).__name__}); pass --force instead of "
                           "--resume to start over") from e

    step = start_epoch * steps_per_epoch
    stopped = False
    net = ranks.wrap(model)  # DDP on several ranks; the loop masks, measures and saves `model`
    for epoch in range(start_epoch, n_epochs):
        epoch_started = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        order = torch.randperm(len(dataset), generator=generator)
        for share in iterate_shares(dataset, order, settings.batch_size, ranks.world(), ranks.rank()):
            if step >= total_steps or stopped:
                break
            x, y = share.x, share.y
            if settings.augment:
                x = augment(x, generator, share.rows, share.batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = net(x)
            with torch.no_grad():
                target = teacher(x) if teacher is not None else None
            loss = objective(logits, y, target)
            optimizer.zero_grad(set_to_none=True)
            # on every rank, always: DDP averages the ranks' gradients, so each is weighted by its share of the batch
            (loss * (share.weight * ranks.world())).backward()
            # the batch's mean loss, the same on every rank, so that every rank takes the same decision
            reason = watch.diverged(ranks.total(float(loss.detach()) * share.weight)[0]) if watch is not None else None
            if reason is not None:
                stopped = not watch.restore(model, optimizer, step + 1, reason, holder.remask if holder else None)
            else:
                if holder:
                    holder.before_step()
                optimizer.step()
                if holder:
                    holder.after_step(optimizer)
            scheduler.step()
            if watch is not None:
                watch.scale_lr(optimizer)
            step += 1
            if reason is None and share.weight > 0:  # not a stand-in image (data.iterate_shares)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            if watch is not None and reason is None and watch.due(step):  # not right after a restore
                ranks.sync_buffers(model)
                watch.check(model, step)
                model.train()
            if on_step:
                on_step({"epoch": epoch + 1, "epochs": n_epochs, "step": step, "steps": total_steps,
                         "loss": loss_sum / max(1, seen), "accuracy": correct / max(1, seen)})
        loss_sum, correct, seen = ranks.total(loss_sum, correct, seen)
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "accuracy": correct / max(1, seen),
                        "seconds": round(time.perf_counter() - epoch_started, 2)})
        if checkpoint is not None and not stopped and ranks.is_main():
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "history": history, "epoch": epoch, "settings": asdict(settings), "lr": lr,
                "guard": watch.state() if watch is not None else None, "finetune_record": record,
                "run_settings": dict(run_settings or {}),
            }, checkpoint)
        if stopped:
            break
    ranks.sync_buffers(model)  # every rank ends on rank 0's BatchNorm statistics
    if state is not None and watch is None:
        record = state.get("finetune_record") or {}
    if watch is not None:
        record = watch.finish(model)
    model.eval()
    if record:
        setattr(model, RECORD, record)
    return history


def finetune_record(model: nn.Module) -> dict:
    """What `train` recorded about a guarded run or a derived learning rate: the learning rate and where it came
    from, the held-out accuracy before and at the end, the checks and every divergence undone ({} when none)."""
    return dict(getattr(model, RECORD, None) or {})


def _load(checkpoint: Path, settings: TrainSettings) -> dict:
    state = load_checkpoint(checkpoint)
    same = {k: v for k, v in asdict(settings).items() if k != "nproc"}  # another process count trains the same
    if {k: v for k, v in (state.get("settings") or {}).items() if k != "nproc"} != same:
        from qlp_compress.base.errors import UsageError

        raise UsageError(f"{checkpoint} was written with other settings; rerun with the same options, or pass "
                         "--force instead of --resume to start over")
    return state


def _first_lr(model: nn.Module, dataset: Dataset, settings: TrainSettings, objective: Callable,
              teacher: nn.Module | None, holder: MaskHolder | None, device: torch.device, watch: Guard | None,
              record: dict) -> tuple[float, dict]:
    """The learning rate (the range test's when settings.lr is None) and the guard's start: the loss level on the
    range test's batches and the held-out accuracy before any step."""
    if settings.lr is not None and watch is None:
        return settings.lr, record
    record["distill"] = teacher is not None
    batches = []
    for x, y in first_batches(dataset, settings.batch_size, RANGE_STEPS, settings.seed,
                              augment if settings.augment else None):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            batches.append((x, y, teacher(x) if teacher is not None else None))

    def after_step(optimizer: torch.optim.Optimizer) -> None:
        if holder:
            holder.before_step()
        optimizer.step()
        if holder:
            holder.after_step(optimizer)

    if settings.lr is None:
        found = find_lr(model, batches, objective, lambda lr: _sgd(model, settings, lr, weight_decay=0.0), after_step)
        lr, start_loss = found["lr"], found["start_loss"]
        record.update(lr=lr, lr_from="range test", range_test=found)
    else:
        lr = settings.lr
        start_loss = loss_on(model, batches, objective)
        record.update(lr=lr, lr_from="--lr")
    lr, start_loss, main_record = ranks.from_main((lr, start_loss, dict(record)))  # rank 0's, on every rank
    record.update(main_record)
    if watch is not None:
        watch.start(model, start_loss)
    return lr, record
