"""The ranks of a distributed fine-tuning, as the training loop sees them (torch.distributed).

Without a process group every function here is the single-process case (world 1, rank 0, no communication), so
`finetune.train` is one loop, local or distributed. With one, every decision the loop takes (the guard's divergence
and best-state choices, the learning rate, what a resumed run starts from) is taken on numbers that are the same on
every rank: sums over the ranks, or rank 0's value broadcast. Only rank 0 writes.

Rank 0 of a search, prune or compare torchrun job works `alone` (train.job) between the fine-tunings it shares with
the other ranks: there it is the single-process case too, so that the search's own brief fine-tunings (the reward)
never wait for ranks that are not training.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from qlp_compress.base.errors import QLPError

_alone = False  # rank 0 of a torchrun job working on its own (train.job): world() is 1


def world() -> int:
    """The number of ranks training together (1 without a process group, or while this rank works alone)."""
    return dist.get_world_size() if not _alone and dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def alone(value: bool = True) -> Iterator[None]:
    """Within it this rank works on its own (value True: world() is 1) or with the others again (False)."""
    global _alone
    before, _alone = _alone, value
    try:
        yield
    finally:
        _alone = before


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    """Whether this process writes checkpoints, outputs and reports: rank 0 of the job (a torchrun job's rank 0 also
    before it has joined its process group), or a lone process."""
    return rank() == 0 and int(os.environ.get("RANK", "0")) == 0


def device(name: str) -> torch.device:
    """The torch device this rank trains on: one GPU per process (the current CUDA device, set from LOCAL_RANK when
    the group was joined), else `name`."""
    if world() > 1 and torch.device(name).type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _tensor_device() -> torch.device:
    """Where collective tensors live: NCCL moves only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def total(*values: float) -> list[float]:
    """Each value summed over the ranks (the values themselves on one process)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(t)
    return t.tolist()


def from_main(obj: object) -> object:
    """Rank 0's `obj` on every rank (a picklable object)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_tensor_device())
    return box[0]


@torch.no_grad()
def sync_states(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (state_dict tensors share storage with the module's)."""
    if world() > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does before each forward: before a
    held-out check and at the end, so that every rank measures and keeps the same model."""
    if world() > 1:
        for t in module.buffers():
            dist.broadcast(t, 0)


def shard(i: int) -> bool:
    """Whether batch `i` of a measurement is this rank's (batches dealt round-robin; the counts are then summed)."""
    return i % world() == rank()


def masks_digest(masks: Mapping[str, torch.Tensor] | None) -> str:
    h = hashlib.sha256()
    for name in sorted(masks or {}):
        h.update(name.encode())
        h.update(masks[name].detach().to("cpu", torch.bool).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def state_digest(module: nn.Module) -> str:
    """A digest of every parameter and buffer: equal on two ranks only when their models are bit for bit the same."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_model(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
    """Every rank must hold a model of the same tensor names and shapes, and the same masks: each rank's description
    is all-gathered and a rank that differs from rank 0 ends the job on every rank with one line naming it (rather
    than DDP's size mismatch or a collective that waits for the timeout)."""
    if world() == 1:
        return
    mine = ([(k, tuple(v.shape)) for k, v in model.state_dict().items()], masks_digest(masks))
    everyone: list = [None] * world()
    dist.all_gather_object(everyone, mine)
    shapes0, masks0 = everyone[0]
    for r, (shapes, digest) in enumerate(everyone[1:], start=1):
        if shapes != shapes0:
            theirs, ours = dict(shapes), dict(shapes0)
            name = next((k for k in ours if theirs.get(k) != ours[k]), None) or next(k for k in theirs if k not in ours)
            raise QLPError(f"rank {r} holds a model of other shapes than rank 0 ({name}: "
                           f"{list(theirs[name]) if name in theirs else 'missing'} on rank {r}, "
                           f"{list(ours[name]) if name in ours else 'missing'} on rank 0); every rank must load the "
                           "same (pruned) model")
        if digest != masks0:
            raise QLPError(f"rank {r} holds other masks than rank 0 (masks digest {digest} against {masks0}); every "
                           "rank must prune the same way: load the same pruned model or policy on every rank")


def wrap(model: nn.Module) -> nn.Module:
    """What the training steps run: the model itself on one process, DistributedDataParallel around it on several
    (gradients averaged over the ranks in the backward pass; rank 0's buffers broadcast before each forward). The
    wrapper lives only inside the training loop and is never returned: pruning happens before it (the pruning
    functions refuse a wrapped module), and the loop masks, measures and saves the inner module."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    cuda = next(model.parameters()).device.type == "cuda"
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if cuda else None)
