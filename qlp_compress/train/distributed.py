"""Training on several processes with torch DDP: `fit` runs `finetune.train` in this process, as this rank of a
torchrun job (its environment variables set), or on `settings.nproc` local processes started through torch's
elastic launcher. The loop is the same in every case (finetune.train with train.ranks).

- Backends: gloo on CPU; NCCL on CUDA with one GPU per process (LOCAL_RANK), BatchNorm made SyncBatchNorm. gloo
  has no SyncBatchNorm: on CPU each rank normalises with the statistics of its own share of the batch (128 / N
  images), and DDP broadcasts rank 0's running statistics before each forward. With small shares (16 images or
  fewer) those batch statistics are noisy and accuracy can drop: keep the per-rank share large, or train on GPUs.
- Nothing hangs: the process group times out after `timeout()` (gloo's default is 30 minutes); the launcher stops
  every rank as soon as one fails; the failure that came first is raised here as one line naming its rank (the
  rank's traceback is attached as a note, which --debug prints).
- Only rank 0 writes (checkpoints in the loop, everything else in the workflows: ranks.is_main), int8 calibration
  included; a distillation teacher is passed to every rank.
- Ctrl-C or SIGTERM: the launcher stops every rank and `fit` raises KeyboardInterrupt; rank 0's checkpoint of the
  last finished epoch stays (it is written atomically) for --resume.
- search, prune and compare in a torchrun job (`as_job`): rank 0 runs the command alone and every `fit` it makes is
  shared with the other ranks, which wait for it on the job's store (train.job).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from qlp_compress.base import messages
from qlp_compress.base.errors import QLPError, UsageError, first_line
from qlp_compress.train import job, ranks
from qlp_compress.train.finetune import RECORD, TrainSettings, finetune_record, train

TIMEOUT_SECONDS = 30.0  # a collective waits at most this long (QLP_DDP_TIMEOUT overrides it)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def timeout() -> timedelta:
    """How long a collective may wait for the other ranks before the job fails: 30 s, or QLP_DDP_TIMEOUT seconds
    (for a model whose checkpoint takes longer to write). gloo's own default, 30 minutes, is what a hang would cost."""
    text = os.environ.get("QLP_DDP_TIMEOUT", str(TIMEOUT_SECONDS))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise UsageError(f"QLP_DDP_TIMEOUT={text} is not a number of seconds between 0 and 86400; e.g. "
                         "QLP_DDP_TIMEOUT=120, or unset it for 30")
    return timedelta(seconds=seconds)


def in_torchrun_job() -> bool:
    """Whether this process is one rank of a job torchrun (or another launcher) started: its variables are set. A Ray
    worker is never one: variables it has were inherited from the driver (a rank of a torchrun job that started Ray)
    and describe the driver, so --nproc N in a worker starts N local ranks of its own."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and not _in_ray_worker()


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else is imported to find out
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE)
    except Exception:  # another Ray's API: not known to be a worker
        return False


def check_nproc(nproc: int, device: str) -> None:
    """Refuse, before any work, a process count that cannot run: below 1, more GPUs than are visible, or --nproc
    inside a torchrun job (torchrun's --nproc-per-node starts the processes there)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"--nproc must be a whole number of processes of at least 1, got {nproc}; e.g. --nproc 2")
    if nproc > 1 and in_torchrun_job():
        raise UsageError("--nproc starts local processes, but this command runs inside a torchrun job already; leave "
                         "--nproc out (torchrun's --nproc-per-node sets the processes)")
    if nproc > 1 or in_torchrun_job():
        timeout()  # a bad QLP_DDP_TIMEOUT is refused before any work
    if nproc > 1 and torch.device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc} asks for one GPU per process but {torch.cuda.device_count()} are visible; "
                         f"use --nproc {torch.cuda.device_count()} or --device cpu")


def join(device: str) -> None:
    """Join the job's process group from the environment (torchrun's variables): NCCL and this rank's GPU on CUDA,
    gloo on CPU, with the short timeout()."""
    if dist.is_initialized():
        return
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise UsageError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not; start the command with torchrun, "
                         "which sets them all, or unset RANK and WORLD_SIZE")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout())


def as_job(device: str, command: Callable[[], dict]) -> dict:
    """`command()`, a command that runs as one process (search, prune, compare; its fine-tunings on --nproc local
    ones). As a rank of a torchrun job: rank 0 runs `command()` alone and returns its result; the other ranks join
    each of its fine-tunings (train.job) and return {"rank": R}, for which the CLI prints nothing."""
    if not in_torchrun_job():
        return command()
    join(device)
    silence = 2 * timeout().total_seconds()
    if not ranks.is_main():
        job.follow(_train_rank, silence)
        return {"rank": ranks.rank()}
    with job.lead(silence):
        return command()


def fit(model: nn.Module, dataset: Dataset, settings: TrainSettings,
        progress: Callable[[], contextlib.AbstractContextManager] | None = None, **kwargs) -> list[dict]:
    """`finetune.train(model, dataset, settings, **kwargs)` here, as a rank of a torchrun job, or on settings.nproc
    local processes; `model` ends trained in place (rank 0's) and `finetune_record(model)` is rank 0's record.
    `progress()` is a context giving train's on_step; only rank 0 shows it (it must be picklable to reach it)."""
    check_nproc(settings.nproc, settings.device)
    if in_torchrun_job():
        join(settings.device)
        if job.leading():  # rank 0 of a search, prune or compare job: the other ranks train with it
            with job.together((model, dataset, settings, None, kwargs)):
                return _train_rank(model, dataset, settings, progress, kwargs)
        return _train_rank(model, dataset, settings, progress, kwargs)
    if settings.nproc == 1:
        with progress() if progress else contextlib.nullcontext() as on_step:
            return train(model, dataset, settings, on_step=on_step, **kwargs)
    main = launch(settings.nproc, _rank_main, (model, dataset, settings, progress, kwargs))[0]
    model.load_state_dict(main["state"])
    setattr(model, RECORD, main["record"])
    return main["history"]


def _train_rank(model: nn.Module, dataset: Dataset, settings: TrainSettings, progress, kwargs: dict) -> list[dict]:
    """One rank's training. On CUDA a copy with SyncBatchNorm trains (the same tensors by name) and `model` gets its
    state, so that what is exported keeps plain BatchNorm."""
    work = model
    if torch.device(settings.device).type == "cuda":
        work = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    with progress() if progress and ranks.is_main() else contextlib.nullcontext() as on_step:
        history = train(work, dataset, settings, on_step=on_step, **kwargs)
    if work is not model:
        model.load_state_dict(work.state_dict())
        setattr(model, RECORD, finetune_record(work))
    return history


def _threads_per_rank() -> int:
    """The threads the launching process was given, shared out among the local ranks: OMP_NUM_THREADS where it is
    set (a Ray worker's CPUs: Ray sets it), else the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    given = os.environ.get("OMP_NUM_THREADS", "")
    budget = int(given) if given.isdigit() and int(given) > 0 else cores
    return max(1, budget // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _rank_main(model: nn.Module, dataset: Dataset, settings: TrainSettings, progress, kwargs: dict,
               errors: str) -> dict:
    """What each launched process runs: join, train, and return its model's digest (rank 0 also its state, history
    and record). A failure is written to `errors` (time, rank, the exception, its traceback) for `launch` to raise.
    The arguments arrive in shared memory, the same tensors in every rank: the model is copied before it trains
    (the data, the masks and a teacher are only read)."""
    model = copy.deepcopy(model)
    try:
        if torch.device(settings.device).type == "cpu":
            torch.set_num_threads(_threads_per_rank())
        join(settings.device)
        history = _train_rank(model, dataset, settings, progress, kwargs)
        result = {"digest": ranks.state_digest(model), "masks": ranks.masks_digest(kwargs.get("masks"))}
        if ranks.is_main():
            result.update(state=model.cpu().state_dict(), history=history, record=finetune_record(model))
        dist.destroy_process_group()
        return result
    except KeyboardInterrupt:  # the launcher stops the ranks: a second SIGINT (the terminal's, forwarded again)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # must not print a traceback from an exit handler
        raise
    except Exception as e:
        _write_error(Path(errors), e)
        raise


def _write_error(folder: Path, e: Exception) -> None:
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)
    except Exception:  # an exception that does not survive pickling: its first line
        blob = pickle.dumps(QLPError(f"{type(e).__name__}: {first_line(e)}"))
    rank = int(os.environ.get("RANK", "0"))
    record = {"time": time.time(), "rank": rank, "error": blob, "traceback": traceback.format_exc()}
    (folder / f"rank{rank}.pickle").write_bytes(pickle.dumps(record))


def launch(nproc: int, fn: Callable, args: tuple) -> dict[int, object]:
    """fn(*args, errors_folder) on `nproc` local processes (torch's elastic launcher, a rendezvous on a free local
    port, no restarts); {rank: what it returned}. A failed rank stops them all and is raised as one line naming it;
    Ctrl-C or SIGTERM stops them all and raises KeyboardInterrupt."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"qlp-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", rdzv_configs={"timeout": max(1, int(timeout().total_seconds()))})
    # the launcher's warnings ("Received 2 death signal", "Terminating process") and failure tables would bury the
    # one line
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.startswith(("torch.distributed", "torch.multiprocessing"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="qlp-ddp-") as errors:
        try:
            return elastic_launch(config, _entry)(fn, (list(warnings.filters), messages.quiet), *args, errors)
        except ChildFailedError as e:
            raise _first_failure(Path(errors), e) from None
        except SignalException as e:
            raise KeyboardInterrupt(signal.Signals(e.sigval).name) from None
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _entry(fn: Callable, caller: tuple[list, bool], *args) -> object:
    """A launched process: the caller's warning filters (its modules' imports set some) and --quiet, then
    fn(*args)."""
    warnings.filters[:], quiet = caller
    messages.set_quiet(quiet)
    return fn(*args)


def _first_failure(folder: Path, failed) -> Exception:
    """The failure to report: a rank killed by a signal the launcher did not send (it stops the others with
    SIGTERM), else the first error a rank wrote, else a rank's abort, else the first exit code; prefixed with the
    rank. An abort (SIGABRT) comes after the error it follows from: gloo aborts a rank whose peer left, as when
    rank 0 refuses a model of other shapes and exits, so the written error names the cause."""
    killed = {r: f for r, f in failed.failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
    records = sorted((pickle.loads(p.read_bytes()) for p in folder.glob("rank*.pickle")), key=lambda r: r["time"])
    first_killed = sorted(killed, key=lambda r: (killed[r].exitcode == -signal.SIGABRT, killed[r].timestamp))
    if first_killed and (killed[first_killed[0]].exitcode != -signal.SIGABRT or not records):
        r = first_killed[0]
        name = signal.Signals(-killed[r].exitcode).name
        return QLPError(f"rank {r} died ({name}) and the job stopped; rerun (with --resume to continue from the last "
                        "finished epoch), and check the machine's memory (dmesg) if it was killed")
    if not records:
        r, f = failed.get_first_failure()
        return QLPError(f"rank {r} exited with code {f.exitcode} and the job stopped; rerun with --debug")
    first = records[0]
    error = pickle.loads(first["error"])
    who = "" if str(error).startswith("rank ") else f"rank {first['rank']}: "  # ranks.check_same_model names it
    try:
        raised = type(error)(f"{who}{error}") if isinstance(error, QLPError) else \
            RuntimeError(f"{who}{type(error).__name__}: {first_line(error)}")
    except TypeError:  # an error class that takes other arguments
        raised = QLPError(f"{who}{first_line(error)}")
    raised.add_note(f"rank {first['rank']}'s traceback:\n{first['traceback']}")
    return raised
