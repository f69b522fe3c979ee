"""The `qlp-compress optimize` command (registered on the app of cli.commands): options in, one workflow call, the
result out."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from qlp_compress.cli import options as o
from qlp_compress.cli.commands import _run, app
from qlp_compress.cli.output import emit, set_quiet
from qlp_compress.workflows import commands as run_command
from qlp_compress.workflows.commands import Choice, OptimizeSettings


@app.command("optimize")
def optimize_cmd(
    model: o.ModelArg,
    max_loss: Annotated[float, typer.Option("--max-loss", help="Accuracy points the answer may lose against the "
                                                               "dense model (judged on held-out reward-split "
                                                               "images).")],
    objective: Annotated[str, typer.Option("--objective", help="speed: the fastest model at --batch; size: the "
                                                               "smallest file (weight sparsity, int8, sparse "
                                                               "storage).")] = "speed",
    batch: Annotated[int, typer.Option("--batch", help="The batch the speed is for.")] = 64,
    time_budget: Annotated[float | None, typer.Option("--time-budget", help="Seconds of wall time; the best model "
                                                                            "found so far is returned when they are "
                                                                            "spent.", show_default=False)] = None,
    structure: Annotated[str, typer.Option("--structure", help="speed: channel,depth (narrow layers and drop "
                                                               "residual blocks) or channel.")] = "channel,depth",
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Write and measure int8 beside every candidate; it "
                                                                "is chosen only where it is faster (smaller) and "
                                                                "within the budget.")] = True,
    out: o.OutDir = None,
    data: o.Data = o.RUN.data,
    data_dir: o.DataDir = None,
    reward_size: o.RewardSize = None,
    episodes: Annotated[int, typer.Option("--episodes", help="Search episodes per candidate.")] = 160,
    stages: o.Stages = 2,
    reward_images: o.RewardImages = o.HOW.reward_images,
    finetune_epochs: Annotated[float, typer.Option("--finetune-epochs", help="Fine-tuning epochs per "
                                                                             "candidate.")] = 5.0,
    lr: o.Lr = o.RUN.lr,
    nproc: o.Nproc = 1,
    threads: o.Threads = o.HOW.threads,
    round_to: o.RoundTo = o.HOW.round_to,
    seed: o.Seed = 0,
    device: o.Device = "auto",
    arch: o.Arch = None,
    trust_pickle: o.Trust = False,
    mean: o.Mean = None,
    std: o.Std = None,
    resume: o.Resume = False,
    force: o.Force = False,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
) -> None:
    """The fastest verified model within an accuracy budget: QLP over widths and residual blocks at rising speedup
    targets, distillation and fine-tuning, int8 where it is faster here; a Pareto front of every candidate.

    Example: qlp-compress optimize model.onnx --max-loss 1 --batch 64 --time-budget 7200"""
    set_quiet(quiet)
    run = _run(model=model, out=out, data=data, data_dir=data_dir, device=device, seed=seed, arch=arch,
               trust_pickle=trust_pickle, mean=mean, std=std, reward_size=reward_size, finetune_epochs=finetune_epochs,
               lr=lr, quantize="int8" if int8 else "none", resume=resume, force=force, nproc=nproc)
    how = Choice(structure=structure, episodes=episodes, stages=stages, reward_images=reward_images, threads=threads,
                 round_to=round_to, latency_batch=batch)
    goal = OptimizeSettings(max_loss=max_loss, objective=objective, batch=batch, time_budget=time_budget)
    result = run_command.optimize_model(run, how, goal)
    emit(result, as_json, lambda: (Text(f"wrote {result['out']}: model.onnx is {result['chosen']} "
                                        f"({result['chosen_form']}), test accuracy "
                                        f"{result['test_accuracy']['chosen']:.2%} (dense "
                                        f"{result['test_accuracy']['dense']:.2%}); report.md and pareto.png show "
                                        "every candidate"),))
