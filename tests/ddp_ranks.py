"""What the ranks of tests/test_ddp.py run, in a module of its own: each launched process imports it, so it imports
no more than a rank needs (torch and the training code; not onnx, torchvision or the test module)."""

from __future__ import annotations

import contextlib
import os
import signal

import torch
from torch import nn

from qlp_compress.data import TensorImages
from qlp_compress.train import distributed


class FrozenBatchNorm(nn.BatchNorm2d):
    """BatchNorm that normalises with its running statistics in training too (frozen statistics)."""

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        return super().train(False)


def frozen_bn_model(width: int = 6) -> nn.Module:
    """A small CNN whose BatchNorm statistics are frozen (FrozenBatchNorm normalises with its running statistics
    in training too): then 2 ranks of 8 images and 1 process of 16 compute the same gradients."""
    torch.manual_seed(0)
    bn = FrozenBatchNorm(width)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


def tiny_data(n: int = 320) -> TensorImages:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    x[:, :, :, :3] += (90 * y).to(torch.uint8).view(n, 1, 1, 1)
    return TensorImages(x, y)


def other_width_on_rank_1(model, data, settings, progress, kwargs, errors):
    """Rank 1 loads a model of other shapes (as a rank that read another file would)."""
    if os.environ["RANK"] == "1":
        model = frozen_bn_model(width=4)
    return distributed._rank_main(model, data, settings, progress, kwargs, errors)


def rank_1_dies(model, data, settings, progress, kwargs, errors):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return distributed._rank_main(model, data, settings, progress, kwargs, errors)


@contextlib.contextmanager
def stop_in_the_second_epoch():
    """A progress display (rank 0's) that fails at the second epoch's first step: the first epoch's checkpoint is
    written by then."""

    def on_step(record: dict) -> None:
        if record["epoch"] == 2:
            raise RuntimeError("stopped in the second epoch")

    yield on_step


def silent_rank(silent: int, model, data, settings, errors):
    """A search-like job (distributed.as_job) of which rank `silent` joins the process group and then hangs without
    a heartbeat: rank 0 "searches" for 3 collective timeouts and then fine-tunes (rank 1 waits for it)."""
    import time
    from pathlib import Path

    try:
        distributed.join("cpu")
        if int(os.environ["RANK"]) == silent:
            time.sleep(300)

        def command() -> dict:
            time.sleep(3 * float(os.environ["QLP_DDP_TIMEOUT"]))
            distributed.fit(model, data, settings)
            return {}

        return distributed.as_job("cpu", command)
    except Exception as e:
        distributed._write_error(Path(errors), e)
        raise


def fine_tune_in_a_ray_worker(settings) -> tuple[dict, bool, int]:
    """What a Ray task runs: fit on settings.nproc ranks launched inside this worker; (the weights, whether the
    worker took itself for a torchrun rank, the threads each rank would take)."""
    model = frozen_bn_model()
    distributed.fit(model, tiny_data(), settings)
    os.environ["LOCAL_WORLD_SIZE"] = str(settings.nproc)  # as a launched rank sees it
    return model.state_dict(), distributed.in_torchrun_job(), distributed._threads_per_rank()
