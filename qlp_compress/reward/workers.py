"""Rewards on Ray workers: N actors, each building its scorer once from the reward description (reward.spec), score
a batch's allocations in parallel, and the batch's scores come back in allocation order, whoever finished first.

- `workers` local worker processes (`ray.init` on this machine, `num_cpus = workers × threads`), or actors on an
  existing cluster (`address`, or RAY_ADDRESS). A cluster that cannot be reached fails at once, in one line.
- The description (network bytes and reward images included) goes into Ray's object store once (`ray.put`): a
  worker needs neither the user's files nor the data set on its disk.
- Each worker sets its own torch and onnxruntime threads (`threads`; onnxruntime ignores OMP_NUM_THREADS). On
  CUDA each worker asks Ray for one GPU.
- A worker that dies (killed, out of memory, its node lost) is replaced, and the allocation it held is scored again
  on another worker: the same description scores it alike, so the result is what an undisturbed run gives.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from qlp_compress.base import messages
from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.messages import console
from qlp_compress.deploy import engine
from qlp_compress.reward.spec import RewardSpec, build_scorer

RAY_EXTRA = "pip install 'qlp-compress[distributed]'"
MAX_LOSSES_PER_WORKER = 3  # workers lost per worker asked for before the search gives up
CONNECT_TIMEOUT_S = 5.0  # how long a cluster's address may take to answer before the run fails
START_TIMEOUT_S = 300.0  # how long the workers may take to start (import torch, build the scorer) before it fails


@dataclass(frozen=True)
class ScaleSettings:
    """Where the search's rewards are scored."""

    workers: int = 0  # Ray worker processes (0: in this process)
    threads: int = 1  # torch and onnxruntime threads per worker
    address: str | None = None  # an existing Ray cluster to join (None: RAY_ADDRESS, else start one here)


def import_ray():
    """Ray, or a one-line usage error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--workers needs Ray, which is not installed; install it with {RAY_EXTRA}") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail at once, in one line, when a cluster's host:port does not answer ("auto" and "local" are Ray's own)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address must be HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise QLPError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}); start it "
                       "with `ray start --head`, or check --ray-address / RAY_ADDRESS") from None


def start_ray(ray, address: str | None, cpus: int) -> None:
    """Start Ray on this machine with `cpus` CPUs (address None), or join the cluster at `address`."""
    options = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
               "configure_logging": True}
    try:
        if address is None:
            ray.init(address="local", num_cpus=cpus, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise QLPError(f"cannot start Ray ({first}); check --ray-address / RAY_ADDRESS") from None


def errors_to_stderr(ray) -> None:
    """Ray's driver echoes the cluster's messages on stdout, where the CLI's results go (--json): they go to stderr
    instead, and the raylet's (a worker's death, at length) are dropped, since the pool says that itself in one
    line."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    echo = getattr(worker, "print_to_stdstream", None)
    if echo is not None and not getattr(echo, "qlp_quiet", False):
        def quiet(data: dict, ignore_prefix: bool) -> None:
            if data.get("pid") != "raylet":
                echo({**data, "is_err": True}, ignore_prefix)

        quiet.qlp_quiet = True
        worker.print_to_stdstream = quiet


class RewardWorker:
    """One worker: the scorer built once from the description, then one allocation per call."""

    def __init__(self, spec: RewardSpec, threads: int, device: str | None = None):
        engine.use_threads(threads)
        self.scorer = build_scorer(spec, device)

    def info(self) -> dict:
        import qlp_compress

        return {"pid": os.getpid(), "host": socket.gethostname(), "engine": getattr(self.scorer, "engine", "torch"),
                "package": os.path.dirname(qlp_compress.__file__)}

    def score(self, allocation: np.ndarray) -> tuple[float, float]:
        started = time.perf_counter()
        value = float(self.scorer(np.asarray(allocation, dtype=np.float64)))
        return value, time.perf_counter() - started


class RewardPool:
    """N Ray actors scoring allocations; `score(allocations)` → [(score, worker seconds)] in their order."""

    def __init__(self, spec: RewardSpec, settings: ScaleSettings):
        if settings.workers < 1 or settings.threads < 1:
            raise UsageError(f"--workers and --worker-threads must be at least 1, got {settings.workers} and "
                             f"{settings.threads}")
        self.ray = ray = import_ray()
        self.settings = settings
        self.gpus = 1 if spec.settings.device == "cuda" else 0
        address = settings.address or os.environ.get("RAY_ADDRESS") or None
        self.local = address is None
        if address is not None:
            check_reachable(address)
        if self.gpus and address is None and settings.workers > torch.cuda.device_count():
            raise UsageError(f"--workers {settings.workers} with --device cuda needs one GPU per worker, and this "
                             f"machine has {torch.cuda.device_count()}; give --workers {torch.cuda.device_count()}")
        self.owns_ray = not ray.is_initialized()  # a caller's own Ray session is used as it is, and left running
        if self.owns_ray:
            start_ray(ray, address, settings.workers * settings.threads)
        errors_to_stderr(ray)
        self.actors = []
        try:
            self.actor_class = ray.remote(RewardWorker).options(num_cpus=settings.threads, num_gpus=self.gpus,
                                                                max_restarts=0)
            self.spec_ref = ray.put(spec)
            self.actors = [self._start() for _ in range(settings.workers)]
            self.infos = ray.get([a.info.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except Exception as e:
            self.close()
            if isinstance(e, QLPError):
                raise
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise QLPError(f"the {settings.workers} reward worker(s) did not start within {START_TIMEOUT_S:.0f} s; "
                               f"the Ray cluster may lack {settings.threads} free CPU(s) per worker"
                               + (" and a GPU per worker" if self.gpus else "")) from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            raise QLPError(f"a reward worker could not start: {first}") from e
        self.engine = self.infos[0]["engine"]
        self.losses = 0  # workers lost and replaced
        self.rescored = 0  # allocations scored again after their worker was lost
        self.worker_seconds = 0.0  # time inside the workers' scorers
        self.dispatch_seconds = 0.0  # a batch's wall time beyond its scoring rounds: Ray's dispatch and transfers
        self.batches = 0

    def _start(self):
        return self.actor_class.remote(self.spec_ref, self.settings.threads)

    def _name(self, actor) -> str:
        i = self.infos[self.actors.index(actor)]
        return f"pid {i['pid']}@{i['host']}"

    def describe(self) -> str:
        where = "this machine" if self.local else "the Ray cluster"
        names = ", ".join(f"pid {i['pid']}@{i['host']}" for i in self.infos)
        return (f"{len(self.actors)} Ray reward worker(s) on {where} ({names}), {self.settings.threads} thread(s) "
                f"each, {self.engine} engine")

    def score(self, allocations: list[np.ndarray]) -> list[tuple[float, float]]:
        ray = self.ray
        started = time.perf_counter()
        results: list[tuple[float, float] | None] = [None] * len(allocations)
        waiting = deque(range(len(allocations)))
        idle = deque(self.actors)
        running = {}  # object ref → (allocation index, actor)
        while waiting or running:
            while waiting and idle:
                i, actor = waiting.popleft(), idle.popleft()
                running[actor.score.remote(allocations[i])] = (i, actor)
            done, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(done[0])
            try:
                results[i] = ray.get(done[0])
                idle.append(actor)
            except ray.exceptions.RayActorError:  # the worker died: score its allocation again on another
                if not messages.quiet:
                    console.print(f"a reward worker was lost ({self._name(actor)}); its allocation is scored again on "
                                  "another worker", highlight=False, soft_wrap=True)
                self._replace(actor)
                idle.append(self.actors[-1])
                waiting.appendleft(i)
                self.rescored += 1
        self.worker_seconds += sum(r[1] for r in results)
        rounds = -(-len(allocations) // len(self.actors))  # scoring rounds the batch needs at best
        longest = sorted((r[1] for r in results), reverse=True)[:rounds]
        self.dispatch_seconds += max(0.0, time.perf_counter() - started - sum(longest) / len(longest) * rounds) \
            if results else 0.0
        self.batches += 1
        return results

    def _replace(self, actor) -> None:
        self.losses += 1
        if self.losses > MAX_LOSSES_PER_WORKER * self.settings.workers:
            raise QLPError(f"{self.losses} reward workers were lost; the last one ended without a result; check "
                           "the workers' memory and the cluster's nodes")
        i = self.actors.index(actor)
        del self.actors[i], self.infos[i]
        new = self._start()
        self.infos.append(self.ray.get(new.info.remote()))
        self.actors.append(new)

    def close(self) -> None:
        """Stop the workers (and Ray itself, or the connection to the cluster, when this pool opened it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
