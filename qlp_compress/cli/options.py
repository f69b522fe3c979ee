"""The options vocabulary: one name, one meaning and one default for each option, in every command that has it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qlp_compress.workflows.commands import Choice, RunOptions

RUN = RunOptions(model=Path("."))  # the shared defaults
HOW = Choice()

ModelArg = Annotated[Path, typer.Argument(help="Model file: ONNX, a PyTorch module or TorchScript file, or a state "
                                               "dict (with --arch).", exists=True, dir_okay=False,
                                          show_default=False)]
OnnxArg = Annotated[Path, typer.Argument(help="ONNX model file.", exists=True, dir_okay=False, show_default=False)]
OutDir = Annotated[Path | None, typer.Option("--out", help="Output FOLDER for all the run's files [default: beside "
                                                           "the model, named for the method and target].",
                                             show_default=False)]
OutFile = Annotated[Path, typer.Option("--out", help="Output FILE: the ONNX file to write.", show_default=False)]
Data = Annotated[str, typer.Option("--data", help="fashion-mnist, cifar10, a .npz file, or an image folder.")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Folder holding fashion-mnist or cifar10 "
                                                                 "(searched before the default places).")]
RewardSize = Annotated[int | None, typer.Option("--reward-size", help="Training images held out as the reward "
                                                                      "split (default: 5000, or a tenth of a smaller "
                                                                      "training split).", show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda (torch; onnxruntime uses CUDA too when "
                                                      "it can).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: search, fine-tuning and data order.")]
Arch = Annotated[str | None, typer.Option("--arch", help="Zoo architecture of a state-dict file.")]
Trust = Annotated[bool, typer.Option("--trust-pickle", help="Allow full-module pickles (runs code from the file; "
                                                            "only for files you trust).")]
Mean = Annotated[list[float] | None, typer.Option("--mean", help="Per-channel mean to fold in front of the model "
                                                                 "(repeat per channel).")]
Std = Annotated[list[float] | None, typer.Option("--std", help="Per-channel std to fold in (repeat per channel).")]
FinetuneEpochs = Annotated[float, typer.Option("--finetune-epochs", help="Fine-tuning epochs on the fine-tune split "
                                                                         "(fractions allowed; 0 = none).")]
Lr = Annotated[float, typer.Option("--lr", help="Fine-tuning peak learning rate (SGD, cosine decay); default: "
                                                 "derived from the model by a short learning-rate range test.")]
SparseStorage = Annotated[bool, typer.Option("--sparse-storage/--no-sparse-storage",
                                             help="Also write the sparse_initializer form (*.sparse.onnx).")]
Quantize = Annotated[str, typer.Option("--quantize", help="none, or int8: also write an int8 model (onnxruntime "
                                                          "static quantization, calibrated on the reward split).")]
CalibrationImages = Annotated[int, typer.Option("--calibration-images", help="Reward-split images for int8 "
                                                                             "calibration.")]
KeepFloat = Annotated[str, typer.Option("--keep-float", help="Prunable layers left in float in the int8 model: "
                                                             "first, last, first,last or none.")]
Int8MaxLoss = Annotated[float, typer.Option("--int8-max-loss", help="Warn when int8 loses more test accuracy than "
                                                                    "this many points.")]
Nproc = Annotated[int, typer.Option("--nproc", help="Fine-tune (train) on this many local processes with torch DDP "
                                                     "(gloo on CPU, one GPU each on CUDA); the same global batch. "
                                                     "Inside a torchrun job leave it out: the job's ranks are used.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint (with the "
                                                        "same settings; others are refused).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (errors and warnings still "
                                                           "show).")]

Structure = Annotated[str, typer.Option("--structure", help="weight: unstructured zeros (the paper; smaller files, "
                                                            "no speedup). channel: remove whole channels for a "
                                                            "measured onnxruntime speedup. depth: remove whole "
                                                            "residual blocks. channel,depth: both.")]
Sparsity = Annotated[float, typer.Option("--sparsity", help="weight: target global sparsity (fraction of the "
                                                            "prunable weights removed), in (0, 1).")]
Speedup = Annotated[float, typer.Option("--speedup", help="channel: target dense ÷ pruned onnxruntime latency at "
                                                          "--latency-batch.")]
Policy = Annotated[Path | None, typer.Option("--policy", help="Apply this policy.json (from an earlier run) instead "
                                                              "of a method.", dir_okay=False)]
Episodes = Annotated[int, typer.Option("--episodes", help="Search episodes over all stages.")]
Stages = Annotated[int, typer.Option("--stages", help="Curriculum stages of increasing target (1 = none).")]
Passes = Annotated[int, typer.Option("--passes", help="Visits per layer in one episode.")]
Demonstrations = Annotated[str, typer.Option("--demonstrations", help="Baselines played first in every stage: "
                                                                      "comma-separated, none, or default (all "
                                                                      "that apply).")]
NearBest = Annotated[float | None, typer.Option("--near-best", help="weight: share of each stage's episodes, after "
                                                                  "its demonstrations, that start from the stage's "
                                                                  "best allocation so far and change a few layers "
                                                                  "by relative steps (0 = none) [default: 0.5].",
                                                 show_default=False)]
Candidates = Annotated[int, typer.Option("--candidates", help="weight, qlp, with fine-tuning: the search's answer "
                                                             "and its best-scoring demonstrations, this many in "
                                                             "all, are each fine-tuned for --select-epochs; the "
                                                             "most accurate on held-out reward-split images is "
                                                             "kept (1 = keep the search's answer).")]
SelectEpochs = Annotated[float, typer.Option("--select-epochs", help="Fine-tuning epochs of each --candidates "
                                                                     "allocation (at most --finetune-epochs).")]
RewardImages = Annotated[int, typer.Option("--reward-images", help="Reward-split images per reward evaluation.")]
BnRecalibrate = Annotated[int, typer.Option("--bn-recalibrate", help="Reward images that re-estimate BatchNorm "
                                                                     "before each reward (0 = off).")]
RewardFinetuneSteps = Annotated[int, typer.Option("--reward-finetune-steps", help="SGD steps each candidate is "
                                                                                  "fine-tuned before it is scored, "
                                                                                  "at targets from "
                                                                                  "--reward-finetune-from (0 = "
                                                                                  "never).")]
RewardFinetuneFrom = Annotated[float, typer.Option("--reward-finetune-from", help="Global sparsity from which the "
                                                                                  "reward fine-tunes briefly.")]
RewardEngine = Annotated[str, typer.Option("--reward-engine", help="auto, onnxruntime or torch.")]
Workers = Annotated[int, typer.Option("--workers", help="Score the search's rewards, and fine-tune the answer's "
                                                        "--candidates, on this many Ray worker processes (0 = in "
                                                        "this process; needs qlp-compress[distributed]).")]
CompareWorkers = Annotated[int, typer.Option("--workers", help="weight: run the cells (method × target) on this many "
                                                               "Ray worker processes, each cell as in this process "
                                                               "(0 = one after another here; needs "
                                                               "qlp-compress[distributed]).")]
BatchEpisodes = Annotated[int | None, typer.Option("--batch-episodes", help="Episodes the agent plays with one network "
                                                                            "before they are scored (in parallel) and "
                                                                            "learnt from; the result depends on it, "
                                                                            "not on --workers [default: --workers, "
                                                                            "or 1].", show_default=False)]
WorkerThreads = Annotated[int, typer.Option("--worker-threads", help="torch and onnxruntime threads of each Ray "
                                                                     "worker.")]
RayAddress = Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster (HOST:PORT, or auto) "
                                                                      "instead of starting workers here [default: "
                                                                      "$RAY_ADDRESS].", show_default=False)]
MinDensity = Annotated[float, typer.Option("--min-density", help="weight baselines: keep at least this fraction of "
                                                                 "every layer.")]
LatencyBatch = Annotated[int, typer.Option("--latency-batch", help="channel: batch size the speedup target holds at "
                                                                   "(64: throughput serving; at batch 1 per-op "
                                                                   "overhead dominates small models).")]
Threads = Annotated[int, typer.Option("--threads", help="channel: onnxruntime threads for every latency "
                                                        "measurement.")]
RoundTo = Annotated[int, typer.Option("--round-to", help="channel: widths are multiples of this (or the full width); "
                                                         "1 = any width.")]
Distill = Annotated[bool, typer.Option("--distill/--no-distill", help="channel: fine-tune with KL to the dense "
                                                                      "model's logits as well as the labels.")]

# old spellings, accepted for one release with a one-line note: {command: {old: new}} ("" = every command)
RENAMED = {
    "finetune": {"--epochs": "--finetune-epochs"},
    "compare": {"--methods": "--method"},
    "": {"--no-finetune": "--finetune-epochs 0", "--finetune": ""},
}
