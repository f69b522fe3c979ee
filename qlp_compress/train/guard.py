"""What keeps fine-tuning from silently ruining a model (issue 25): a learning rate that fits the model, divergence
caught and undone, and the best state on held-out images kept.

- `find_lr`: the default learning rate, from a short range test on a few fine-tune batches: from the same start,
  each learning rate of a grid (steps of √10) takes `RANGE_STEPS` SGD steps on the same batches; the one after
  which the loss on those batches is lowest is the learning rate (docs/method.md, with the alternatives measured).
- `Guard`: watches the training loss. A non-finite loss, or a smoothed loss above `factor` × its starting level +
  `margin` for `patience` steps in a row, is divergence: the model goes back to the best state so far, the momentum
  is dropped and training goes on at a learning rate `lr_drop` times lower (at most `max_drops` times, then it
  stops). Every `1 / checks_per_epoch` epoch it measures the accuracy on held-out images (never the test split) and
  keeps the best state; training ends on it (on the model as it started when no trained state did better). When
  every trained state is below the accuracy before fine-tuning, measured the same way, by more than the sampling
  noise of the held-out images (`Guard.noise`), `FinetuneFailed` says so in one line; within the noise, a warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from qlp_compress.base.errors import QLPError
from qlp_compress.base.messages import console
from qlp_compress.data import iterate_batches
from qlp_compress.train import ranks

RANGE_STEPS = 5  # SGD steps per learning rate in the range test (on the same RANGE_STEPS batches)
# the learning rates tried are 10^(e/2) for whole e (…, 0.001, 0.00316, 0.01, 0.0316, …): from e = RANGE_FIRST
# towards the lower loss, within RANGE_LIMITS
RANGE_FIRST = -6  # 0.001
RANGE_LIMITS = (-12, 0)  # 1e-6 … 1


class FinetuneFailed(QLPError):
    """Fine-tuning ended below the held-out accuracy it started from, even after lowering its learning rate."""


@dataclass(frozen=True)
class GuardSettings:
    """How fine-tuning is watched."""

    checks_per_epoch: float = 4.0  # held-out measurements per epoch (at least 2 per run, plus one before it)
    images: int = 2000  # held-out images measured at each check (always the same ones)
    factor: float = 1.5  # divergence: a smoothed loss above factor × its starting level + margin ...
    margin: float = 0.25
    patience: int = 20  # ... for this many steps in a row (fewer in a run that short), or a non-finite loss
    smoothing: float = 0.1  # weight of each new step's loss in the smoothed loss
    lr_drop: float = 10.0  # the learning rate is divided by this at each divergence ...
    max_drops: int = 3  # ... at most this many times; one more divergence stops training
    fail_below_start: bool = True  # raise FinetuneFailed when the best state is below the start


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loss_on(model: nn.Module, batches: list, objective: Callable) -> float:
    """The mean objective over the batches, in training mode (as training sees it), leaving the model's buffers
    (BatchNorm statistics) as they were."""
    kept = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    total = 0.0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same dropout masks at every measurement
        for x, y, t in batches:
            total += float(objective(model(x), y, t))
    model.train(was_training)
    buffers = dict(model.named_buffers())
    for k, v in kept.items():
        buffers[k].copy_(v)
    return total / len(batches)


def find_lr(model: nn.Module, batches: list, objective: Callable, make_optimizer: Callable[[float], object],
            after_step: Callable[[object], None]) -> dict:
    """The range test (see the module's docstring) on `batches` [(x, y, teacher logits or None)]. Leaves the model
    as it was. Returns {"lr", "start_loss", "lowered", "steps", "tried": [[lr, loss after its steps], ...]}."""
    start = snapshot(model)
    tried: dict[int, float] = {}  # exponent e (learning rate 10^(e/2)) → the loss after its steps

    def loss_after(e: int) -> float:
        if e not in tried:
            model.load_state_dict(start)
            optimizer = make_optimizer(10 ** (e / 2))
            model.train()
            torch.manual_seed(1)
            tried[e] = math.inf
            for x, y, t in batches:
                loss = objective(model(x), y, t)
                if not torch.isfinite(loss):
                    return math.inf
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                after_step(optimizer)
            after = loss_on(model, batches, objective)
            tried[e] = after if math.isfinite(after) else math.inf
        return tried[e]

    with torch.random.fork_rng(devices=[]):
        before = loss_on(model, batches, objective)
        e = RANGE_FIRST
        step = 1 if loss_after(e + 1) < loss_after(e) else -1  # walk towards the lower loss while it keeps falling
        while RANGE_LIMITS[0] <= e + step <= RANGE_LIMITS[1] and loss_after(e + step) < loss_after(e):
            e += step
        lowered = loss_after(e) < before
        if not lowered:  # no learning rate lowered the loss (a model at a minimum of it): the smallest tried
            e = min(tried)
    model.load_state_dict(start)
    return {"lr": float(f"{10 ** (e / 2):.3g}"), "start_loss": before, "lowered": lowered, "steps": len(batches),
            "tried": [[float(f"{10 ** (k / 2):.3g}"), v] for k, v in sorted(tried.items())]}


class Guard:
    """The watch over one fine-tuning run (see the module's docstring). Its `state()` goes into the training
    checkpoint, and `Guard(..., state=...)` continues from it."""

    def __init__(self, held_out: Dataset, settings: GuardSettings, total_steps: int, steps_per_epoch: int,
                 device: torch.device, state: dict | None = None):
        self.settings = settings
        self.held_out, self.device = held_out, device
        checks = max(2, math.ceil(settings.checks_per_epoch * total_steps / steps_per_epoch))
        self.every = max(1, total_steps // checks)
        self.total_steps = total_steps
        self.patience = max(3, min(settings.patience, total_steps // 10))
        self.record: dict = {"held_out_images": min(settings.images, len(held_out)), "checks": [], "restores": [],
                             "stopped_early": False}
        self.best: dict[str, torch.Tensor] | None = None  # the best state so far, the start included
        self.best_accuracy = -1.0
        self.best_step = 0
        self.level = math.nan  # the starting loss
        self.smoothed = math.nan
        self.above = 0  # steps in a row above the limit
        self.scale = 1.0  # learning-rate factor from divergences
        if state is not None:
            self.record, self.best = state["record"], state["best"]
            self.best_accuracy, self.best_step = state["best_accuracy"], state["best_step"]
            self.level, self.smoothed, self.above = state["level"], state["smoothed"], state["above"]
            self.scale = state["scale"]

    def state(self) -> dict:
        return {"record": self.record, "best": self.best, "best_accuracy": self.best_accuracy,
                "best_step": self.best_step, "level": self.level, "smoothed": self.smoothed, "above": self.above,
                "scale": self.scale}

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        correct = seen = 0
        for i, (x, y) in enumerate(iterate_batches(self.held_out, 500, limit=self.settings.images)):
            if ranks.shard(i):  # under DDP each rank measures its share of the batches, and the counts are summed
                correct += int((model(x.to(self.device)).argmax(1).cpu() == y).sum())
                seen += len(y)
        model.train(was_training)
        correct, seen = ranks.total(correct, seen)
        return correct / max(1, seen)

    def start(self, model: nn.Module, start_loss: float) -> None:
        """Before the first step: the starting loss level and the held-out accuracy of the model as it is."""
        self.level = start_loss
        self.best = snapshot(model)
        self.record["start_held_out_accuracy"] = self.accuracy(model)
        self.best_accuracy, self.best_step = self.record["start_held_out_accuracy"], 0

    @property
    def limit(self) -> float:
        return self.settings.factor * self.level + self.settings.margin

    def diverged(self, loss: float) -> str | None:
        """Call with every step's loss, before the step; a reason when training has diverged."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        a = self.settings.smoothing
        self.smoothed = loss if math.isnan(self.smoothed) else (1 - a) * self.smoothed + a * loss
        self.above = self.above + 1 if self.smoothed > self.limit else 0
        if self.above >= self.patience:
            return (f"the smoothed loss stayed above {self.limit:.3g} ({self.settings.factor:g}× its start "
                    f"{self.level:.3g} + {self.settings.margin:g}) for {self.above} steps")
        return None

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, reason: str,
                remask: Callable[[], None] | None) -> bool:
        """Back to the best state, momentum dropped, learning rate lowered; False when training should stop."""
        model.load_state_dict(self.best)
        if remask is not None:
            remask()
        optimizer.state.clear()
        self.smoothed, self.above = math.nan, 0
        drops = len(self.record["restores"])
        stop = drops >= self.settings.max_drops
        if not stop:
            self.scale /= self.settings.lr_drop
            for group in optimizer.param_groups:
                group["lr"] /= self.settings.lr_drop
        lr = self.record.get("lr", math.nan) * self.scale
        self.record["restores"].append({"step": step, "reason": reason, "back_to_step": self.best_step,
                                        "lr": None if stop else lr})
        then = "stops there" if stop else f"goes on with learning rate {lr:.3g}"
        console.print(f"note: fine-tuning diverged at step {step} ({reason}); it went back to step {self.best_step} "
                      f"(held-out accuracy {self.best_accuracy:.2%}) and {then}", highlight=False, soft_wrap=True)
        if stop:
            self.record["stopped_early"] = True
        return not stop

    def scale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """After each scheduler step: the schedule's learning rate times the divergences' factor."""
        if self.scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= self.scale

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def check(self, model: nn.Module, step: int) -> None:
        """Measure the held-out accuracy; keep the state when it is better than the best so far."""
        acc = self.accuracy(model)
        self.record["checks"].append([step, acc])
        if acc > self.best_accuracy:
            self.best, self.best_accuracy, self.best_step = snapshot(model), acc, step

    def finish(self, model: nn.Module) -> dict:
        """End on the best state (the start when no trained state beat it). When every trained state is below the
        start, raise FinetuneFailed (unless not `fail_below_start`)."""
        if self.best is not None:
            model.load_state_dict(self.best)
        self.record.update(held_out_accuracy=self.best_accuracy, ended_at_step=self.best_step)
        trained = [acc for _, acc in self.record["checks"]]
        start = self.record["start_held_out_accuracy"]
        if self.settings.fail_below_start and (not trained or max(trained) < start - self.noise()):
            raise FinetuneFailed(self.failure())
        if trained and max(trained) < start:
            console.print(f"warning: fine-tuning did not beat the accuracy it started from on "
                          f"{self.record['held_out_images']} held-out images ({start:.2%} before, at best "
                          f"{max(trained):.2%} after, within their sampling noise); the model is kept as it was "
                          "before fine-tuning", highlight=False, soft_wrap=True)
        return self.record

    def noise(self) -> float:
        """Two standard errors of the start accuracy on the held-out images (at least one image): a best state
        less than this below the start is not evidence that fine-tuning hurt (60 images: 2 images either way
        are 3.3 points), so it warns instead of failing; the model then ends as it started."""
        n = self.record.get("held_out_images") or 0
        p = self.record["start_held_out_accuracy"]
        return max(1 / n, 2 * math.sqrt(p * (1 - p) / n)) if n else 0.0

    def failure(self) -> str:
        r = self.record
        trained = [acc for _, acc in r["checks"]]
        best = f"at best {max(trained):.2%}" if trained else "no state measured"
        lowered = (f"; the loss diverged {len(r['restores'])} times and the learning rate was lowered to "
                   f"{r.get('lr', math.nan) * self.scale:.3g}") if r["restores"] else ""
        return (f"fine-tuning ended below the accuracy it started from on {r['held_out_images']} held-out images "
                f"({r['start_held_out_accuracy']:.2%} before, {best} after{lowered}); try a smaller --lr (e.g. "
                f"{r.get('lr', 0.01) * self.scale / 10:.2g}){', --no-distill,' if r.get('distill') else ''} or "
                f"--finetune-epochs 0 to keep the pruned model")


def first_batches(dataset: Dataset, batch_size: int, count: int, seed: int,
                  augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None) -> Iterable:
    """`count` fine-tune batches, shuffled by `seed` (not the training's own order), augmented like training's."""
    generator = torch.Generator().manual_seed(seed + 7919)
    for i, (x, y) in enumerate(iterate_batches(dataset, batch_size, shuffle=True, generator=generator)):
        if i >= count:
            return
        yield (augment(x, generator) if augment is not None else x), y
