"""Independent units of a workflow on Ray workers (issue 28): the answer's candidates (each pruned, fine-tuned and
measured on its own worker: workflows.selection) and compare's cells (one method at one target: workflows.compare).

- The workspace goes into Ray's object store once (`ray.put`) as a `PortableWorkspace`: the network as torch.save
  bytes with their SHA-256, checked before they are unpickled (as reward.spec does for the reward), and the splits'
  images in their stored dtype, so a worker node needs neither the model file nor the data set on its disk (an image
  folder's splits travel as lists of files: there a node needs the folder at the same path).
- Each unit is one Ray task with `threads` torch and onnxruntime threads, set in the worker (onnxruntime ignores
  OMP_NUM_THREADS); at most `workers` run at once, each on its own worker process (on CUDA each asks for a GPU).
- A unit runs the very function the serial path runs in this process. torch's float sums depend on the thread
  count, so a unit's result is the serial run's bit for bit when the serial process runs with the same threads
  (--worker-threads); a worker always fine-tunes in its own process (--nproc is for the serial path).
- A unit whose worker died is run again on another worker; its result is then what an undisturbed run gives.
- Results are handed to `on_done` as they finish (the caller's record keeps them at once) and returned in the units'
  order. Ctrl-C or SIGTERM stops every worker and raises Interrupted; what finished stays in the caller's record and
  --resume runs the rest.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from qlp_compress.base import messages
from qlp_compress.base.errors import Interrupted, QLPError, first_line
from qlp_compress.base.interrupts import sigterm_as_interrupt
from qlp_compress.base.messages import console
from qlp_compress.data.images import ImageData, Splits
from qlp_compress.deploy import engine
from qlp_compress.reward.spec import from_bytes, to_bytes
from qlp_compress.reward.workers import (
    MAX_LOSSES_PER_WORKER,
    ScaleSettings,
    check_reachable,
    errors_to_stderr,
    import_ray,
    start_ray,
)
from qlp_compress.workflows.workspace import Workspace


@dataclass(frozen=True)
class PortableWorkspace:
    """A Workspace as it travels to a Ray worker."""

    model: bytes  # torch.save of the loaded network (normalisation folded in)
    model_digest: str  # SHA-256 of `model`, checked before it is unpickled
    loaded: object  # the LoadedModel, without its module
    data: ImageData  # the data set's facts and test split, without its training split (the splits hold it)
    splits: Splits  # reward and fine-tune splits (and the test split, when the units measure on it)
    device: str
    split_seed: int
    record: dict


def to_portable(ws: Workspace, test: bool = True) -> PortableWorkspace:
    """`ws` ready for the object store; without the test split when the units never read it (`test` False)."""
    model, digest = to_bytes(ws.loaded.module)
    splits = ws.splits if test else replace(ws.splits, test=None)
    data = replace(ws.data, train=None, test=ws.data.test if test else None)
    return PortableWorkspace(model, digest, replace(ws.loaded, module=None), data, splits, ws.device, ws.split_seed,
                             dict(ws.record))


def from_portable(p: PortableWorkspace) -> Workspace:
    """The Workspace `to_portable` packed, its network checked against its digest."""
    module = from_bytes(p.model, p.model_digest, "the workspace's network")
    return Workspace(replace(p.loaded, module=module), p.data, p.splits, p.device, p.split_seed, p.record)


def _unit(fn: Callable, shared: object, item: object, threads: int) -> tuple[object, int, str, float]:
    """One unit in a worker: its threads set here, no progress of its own (this process reports)."""
    engine.use_threads(threads)
    messages.quiet = True
    started = time.perf_counter()
    result = fn(shared, item)
    return result, os.getpid(), socket.gethostname(), time.perf_counter() - started


@dataclass
class UnitsRecord:
    """What a run of units on workers cost, for the report."""

    workers: int
    worker_threads: int
    units: int = 0
    worker_seconds: float = 0.0  # time inside the units, all workers together
    wall_seconds: float = 0.0
    workers_lost: int = 0

    def as_dict(self) -> dict:
        return {"workers": self.workers, "worker_threads": self.worker_threads, "units": self.units,
                "worker_seconds": round(self.worker_seconds, 2), "wall_seconds": round(self.wall_seconds, 2),
                "workers_lost": self.workers_lost}


def run_units(scale: ScaleSettings, fn: Callable, shared: object, items: Sequence, what: str,
              labels: Sequence[str], on_done: Callable[[int, object], None], gpus: int = 0) -> UnitsRecord:
    """`fn(shared, item)` for every item, each on one of `scale.workers` Ray workers; `on_done(index, result)` as each
    finishes (in finishing order). `what` and `labels` name the run and its units in progress and errors."""
    ray = import_ray()
    address = scale.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    record = UnitsRecord(scale.workers, scale.threads)
    owns = not ray.is_initialized()  # a caller's own Ray session is used as it is, and left running
    started = time.perf_counter()
    running: dict = {}  # object ref → item index
    try:
        with sigterm_as_interrupt():
            if owns:
                start_ray(ray, address, scale.workers * scale.threads)
            errors_to_stderr(ray)
            task = ray.remote(_unit).options(num_cpus=scale.threads, num_gpus=gpus, max_retries=0)
            shared_ref = ray.put(shared)
            if not messages.quiet:
                console.print(f"{what}: {len(items)} unit(s) on {scale.workers} Ray worker(s), {scale.threads} "
                              "thread(s) each", highlight=False, soft_wrap=True)
            waiting = deque(range(len(items)))
            while waiting or running:
                while waiting and len(running) < scale.workers:
                    i = waiting.popleft()
                    running[task.remote(fn, shared_ref, items[i], scale.threads)] = i
                done, _ = ray.wait(list(running), num_returns=1)
                i = running.pop(done[0])
                try:
                    result, pid, host, seconds = ray.get(done[0])
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.OutOfMemoryError) as e:
                    record.workers_lost += 1
                    if record.workers_lost > MAX_LOSSES_PER_WORKER * scale.workers:
                        raise QLPError(f"{what}: {record.workers_lost} workers were lost, the last one running "
                                       f"{labels[i]} ({type(e).__name__}); check the workers' memory and the "
                                       "cluster's nodes") from None
                    if not messages.quiet:
                        console.print(f"{what}: the worker running {labels[i]} was lost; it runs again on another "
                                      "worker", highlight=False, soft_wrap=True)
                    waiting.appendleft(i)
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, KeyboardInterrupt):  # the terminal's Ctrl-C reached the worker too
                        raise KeyboardInterrupt from None
                    if isinstance(cause, QLPError):
                        raise cause from None
                    raise QLPError(f"{what}: {labels[i]} failed on a worker: {first_line(cause or e)}") from e
                record.units += 1
                record.worker_seconds += seconds
                on_done(i, result)
                if not messages.quiet:
                    console.print(f"{what}: {labels[i]} done on pid {pid}@{host} in {seconds:.1f} s ({record.units} "
                                  f"of {len(items)}, {record.units / (time.perf_counter() - started) * 60:.2f} per "
                                  "minute)", highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        raise Interrupted(f"{what} interrupted with {record.units} of {len(items)} finished (kept); rerun the same "
                          "command with --resume to run the rest") from None
    finally:
        if owns:
            ray.shutdown()  # stops every worker (cancelling a task as it completes can abort Ray's core worker)
        else:
            for ref in running:  # a caller's session stays: only this run's tasks are stopped
                ray.cancel(ref)
        record.wall_seconds = time.perf_counter() - started
    return record
