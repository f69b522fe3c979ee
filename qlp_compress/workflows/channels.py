"""The structured workflows (channel, depth, or both): units (QLP, random search or a baseline) → smaller dense
network → fine-tune → verified ONNX export → report with measured speedups. An allocation is a list of units:
a width per channel group, then a keep flag per removable residual block (pruning.channel_groups.ChannelSpace)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from qlp_compress import data as datasets
from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.base.machine import cpu_capability
from qlp_compress.base.names import structure_parts
from qlp_compress.base.outputs import OutputRun
from qlp_compress.deploy import export
from qlp_compress.deploy.engine import open_session, session_accuracy
from qlp_compress.deploy.quantize import QuantizeSettings
from qlp_compress.pruning.channel_groups import ChannelSpace, count_macs_params
from qlp_compress.pruning.latency import LatencySettings, LatencyTable, check_latency_settings, measure_speedup
from qlp_compress.pruning.widths import (
    BASELINES,
    CRITERION_OF,
    allocate_widths,
    default_demonstrations,
    demonstration_allocator,
    speedup_to_target,
)
from qlp_compress.report.progress import phase
from qlp_compress.report.provenance import jsonable, versions
from qlp_compress.report.structured import report_markdown
from qlp_compress.reward.channels import ChannelReward, ChannelRewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.channel_env import ChannelEnv
from qlp_compress.search.curriculum import SearchSettings, run_search
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows.advice import budget_warning, busy_table_warning, signal_warning, speedup_warning
from qlp_compress.workflows.channel_checks import POLICY_FORMAT, check_channel_policy, check_reach, read_channel_policy
from qlp_compress.workflows.quantize import quantize_beside
from qlp_compress.workflows.scale import scale_record, scoring
from qlp_compress.workflows.workspace import (
    REWARD_IMAGES,
    Workspace,
    export_bytes,
    export_verified,
    finetune_report,
    held_out_images,
    recalibrate_and_finetune,
    with_record,
)

SPEEDUP_BATCHES = (1, 64)  # every report gives the measured speedup at these batch sizes


@dataclass(frozen=True)
class ChannelSettings:
    """One structured run."""

    structure: str = "channel"  # channel, depth or channel,depth (base.names.STRUCTURES)
    method: str = "qlp"  # qlp, random, uniform, l1 (global filter norm), bn-slimming or depth (uniform depth)
    speedup: float = 2.0  # target: dense ÷ pruned onnxruntime latency at latency.batch, predicted by the table
    latency: LatencySettings = field(default_factory=LatencySettings)  # how latency is measured
    search: SearchSettings | None = None  # for qlp/random (target and method are filled in)
    reward: ChannelRewardSettings = field(default_factory=ChannelRewardSettings)  # how the search scores widths
    demonstrations: tuple[str, ...] | None = None  # baselines played first in every stage (None: all that apply)
    finetune: TrainSettings | None = None  # None = no fine-tuning
    distill: bool = True  # fine-tune with KL to the dense model's logits too (+0.23 / +0.32 points at 1.5× / 2×,
    #                       same widths, 0.1 epoch, ResNet-20 seed 0; docs/benchmarks_channel.md)
    speed_rounds: int = 15  # interleaved rounds per measured speedup
    quantize: QuantizeSettings | None = None  # also write model.int8.onnx (None = no int8)
    scale: ScaleSettings = field(default_factory=ScaleSettings)  # where the search's rewards are scored


@dataclass
class ChannelContext:
    """The groups and the latency table of the loaded model."""

    space: ChannelSpace
    table: LatencyTable
    dense_onnx: bytes
    seconds: float


def open_channels(ws: Workspace, settings: LatencySettings, cache: Path | None = None,
                  structure: str = "channel", blocks_optional: bool = False) -> ChannelContext:
    """The model's channel groups (and with depth its removable blocks) and their latency table. A model without a
    removable block is refused with depth unless `blocks_optional` (then its units are its groups alone)."""
    started = time.perf_counter()
    check_latency_settings(settings)
    x, _ = datasets.materialize(ws.splits.reward, limit=2)
    narrows, drops = structure_parts(structure)
    with phase("find channel groups and residual blocks" if drops else "find channel groups"):
        space = ChannelSpace(ws.loaded.module, x, depth=drops, width=narrows)
    if drops and not space.blocks and not (blocks_optional and space.groups):
        raise QLPError("this model has no residual block that can be removed whole (a sum whose other side is an "
                       "identity or a parameter-free channel map); use --structure channel")
    if narrows and not space.groups:
        reasons = "; ".join(f"{n}: {r}" for n, r in space.unsafe) or "no Conv/Linear output channels outside the " \
                                                                       "classifier"
        raise QLPError(f"no channel group of this model can be pruned safely ({reasons}); use --structure weight")
    with phase("latency table (onnxruntime timings of each group's widths and block)"):
        dense = export_bytes(ws.loaded.module, ws)
        table = LatencyTable.build(space, dense, export_bytes(space.model, ws), ws.input_shape, settings,
                                   ws.loaded.sha256, lambda m: export_bytes(m, ws), cache=cache)
    busy_table_warning(table)
    return ChannelContext(space, table, dense, time.perf_counter() - started)


def find_widths(ws: Workspace, ctx: ChannelContext, settings: ChannelSettings, checkpoint: Path | None = None,
                resume: bool = False, on_episode: Callable[[dict], None] | None = None) -> dict:
    """The per-group widths of `settings.method` at the speedup target, and how they were found. The settings
    were checked where they entered (workflows.structures); only the table's reach is checked here."""
    target = speedup_to_target(settings.speedup)
    check_reach(ctx.table, settings.speedup)
    started = time.perf_counter()
    info: dict = {"method": settings.method, "criterion": CRITERION_OF[settings.method]}
    if settings.method in BASELINES:
        widths = allocate_widths(settings.method, ctx.space, ctx.table, target)
    else:
        reward_settings = replace(settings.reward, device=ws.device)
        search = replace(settings.search or SearchSettings(target_removed=target), target_removed=target,
                         method=settings.method,
                         near_best=0.0)  # near-best episodes move per-layer sparsities: weight mode only
        demos = settings.demonstrations if settings.demonstrations is not None else default_demonstrations(ctx.space)
        search = replace(search, demonstrations=tuple(demos))
        budget_warning(search)
        with scoring(settings.structure, ws, reward_settings, settings.scale,
                     lambda: ChannelReward(ctx.space, ws.splits.reward, reward_settings)) as scorer:
            env = ChannelEnv(ctx.table, scorer.reward_fn, search.env)
            result = run_search(env, search, checkpoint=checkpoint, resume=resume, on_episode=on_episode,
                                allocation=demonstration_allocator(ctx.space, ctx.table), run_record=ws.record,
                                score_batch=scorer.score_batch)
            info.update(scale_record(settings.scale, search.batch_episodes, result, scorer.pool))
        if result.final.sparsities is None:
            raise QLPError(f"no episode reached a {settings.speedup:g}× predicted speedup in {search.episodes} "
                           "episodes; raise --episodes or --passes")
        signal_warning(result.history, ws.data.num_classes, target)
        widths = ctx.space.units_from(result.final.sparsities)
        succeeded = sum(bool(h["succeeded"]) for h in result.history)
        demonstrations = sum(h.get("demonstration") is not None for h in result.history)
        info.update(agent_episodes=len(result.history) - demonstrations, demonstration_episodes=demonstrations,
                    scored_episodes=succeeded, failed_episodes=len(result.history) - succeeded,
                    counts="episodes = agent_episodes + demonstration_episodes = scored_episodes + failed_episodes; "
                           "reward_evaluations counts the networks scored by this process (a scored episode whose "
                           "widths were scored before is answered from a cache, so distinct_networks_scored can be "
                           "fewer; a resumed search counts only its own)",
                    best_reward=result.final.reward, demonstration=result.final.demonstration,
                    episodes=len(result.history), reward_seconds=round(result.reward_seconds, 2),
                    stages=[{"target_speedup": round(1 / (1 - b.target), 4), "reward": b.reward, "episode": b.episode,
                             "demonstration": b.demonstration, "near_best": b.near_best,
                             "widths": ctx.space.units_from(b.sparsities) if b.sparsities else None}
                            for b in result.best],
                    rewards=[round(h["reward"], 5) for h in result.history])
        if scorer.pool is None:  # scored in this process: what its reward counted (workers keep their own counts)
            r = scorer.reward_fn
            info.update(reward_evaluations=r.evaluations, distinct_networks_scored=len(r.cache),
                        reward_failures=len(r.failures))
    info.update(widths=widths, predicted_speedup=ctx.table.speedup(widths),
                search_seconds=round(time.perf_counter() - started, 2))
    return info


def prune_channels_and_finetune(ws: Workspace, ctx: ChannelContext, units: list[int], criterion: str,
                                settings: TrainSettings | None, distill: bool, checkpoint: Path | None = None,
                                resume: bool = False, measured: int | None = None) -> tuple[nn.Module, nn.Module]:
    """Channel and depth modes: the network narrowed (and its blocks dropped) to `units`, then
    `recalibrate_and_finetune`, distilled from the dense network when `distill`, and always guarded on
    held_out_images(ws, measured) (None: the reward's default image count). No masks: the network is smaller."""
    teacher = copy.deepcopy(ws.loaded.module) if distill and settings is not None and settings.epochs > 0 else None
    return recalibrate_and_finetune(ws, ctx.space.prune(units, criterion), settings, checkpoint=checkpoint,
                                    resume=resume, teacher=teacher,
                                    held_out=held_out_images(ws, REWARD_IMAGES if measured is None else measured))


def measure_against_dense(ws: Workspace, ctx: ChannelContext, onnx_bytes: bytes, module: nn.Module,
                          settings: ChannelSettings, batches: tuple[int, ...] = SPEEDUP_BATCHES) -> dict:
    """Test accuracy (onnxruntime), MACs, parameters and the speedup over the dense model, measured interleaved."""
    with phase("measure (onnxruntime: test accuracy, interleaved speedup against the dense model)"):
        return _measure(ws, ctx, onnx_bytes, module, settings, batches)


def _measure(ws: Workspace, ctx: ChannelContext, onnx_bytes: bytes, module: nn.Module, settings: ChannelSettings,
             batches: tuple[int, ...]) -> dict:
    x, _ = datasets.materialize(ws.splits.reward, limit=1)
    macs, params = count_macs_params(module, x)
    speed = {str(b): measure_speedup(ctx.dense_onnx, onnx_bytes, ws.input_shape, b, settings.latency.threads,
                                     rounds=settings.speed_rounds)
             for b in sorted({*batches, settings.latency.batch})}
    return {"accuracy": session_accuracy(open_session(onnx_bytes), ws.splits.test), "macs": macs, "params": params,
            "speedup": speed, "bytes": len(onnx_bytes)}


def compress_channels(model_path: Path, ws: Workspace, settings: ChannelSettings, out: Path, command: str,
                      resume: bool = False, ctx: ChannelContext | None = None,
                      on_episode: Callable[[dict], None] | None = None, policy_path: Path | None = None,
                      force: bool = False) -> dict:
    """Widths (found, or read from `policy_path`) → prune → fine-tune → export (verified) → report, all under
    `out`, written as a set (qlp_compress.base.outputs): an existing folder is replaced only with `force`."""
    with OutputRun(out, force, resume) as run:
        report = _compress_channels(model_path, ws, settings, out, run, command, resume, ctx, on_episode, policy_path)
        run.commit()
    return report


def _compress_channels(model_path: Path, ws: Workspace, settings: ChannelSettings, out: Path, run: OutputRun,
                       command: str, resume: bool, ctx: ChannelContext | None,
                       on_episode: Callable[[dict], None] | None, policy_path: Path | None) -> dict:
    started = time.perf_counter()
    work, staged = run.work, run.staging
    chosen = read_channel_policy(policy_path) if policy_path is not None else None  # before the table is timed
    if chosen is not None:  # the policy's own structure (files written before depth: channel)
        settings = replace(settings, structure=chosen.get("structure", "channel"))
    if settings.structure != "channel":  # a resumed search must have searched the same units
        ws = with_record(ws, {"--structure": settings.structure})
    ctx = ctx or open_channels(ws, settings.latency, structure=settings.structure)
    if chosen is not None:
        widths = check_channel_policy(chosen, policy_path, [g.name for g in ctx.space.groups], group_names(ws, ctx),
                                      ctx.space.sizes, ws.loaded.sha256, [b.name for b in ctx.space.blocks])
        found = {"method": chosen["method"], "criterion": chosen["criterion"], "widths": widths,
                 "predicted_speedup": ctx.table.speedup(widths), "search_seconds": 0.0, "from_policy": str(policy_path)}
        settings = replace(settings, method=chosen["method"], speedup=float(chosen["target_speedup"]))
    else:
        found = find_widths(ws, ctx, settings, checkpoint=work / "search.ckpt", resume=resume, on_episode=on_episode)
    widths = found["widths"]
    policy = policy_json(ws, ctx, settings, found)
    atomic_write_json(staged / "policy.json", policy)
    pruned, tuned = prune_channels_and_finetune(ws, ctx, widths, found["criterion"], settings.finetune,
                                                settings.distill, work / "finetune.ckpt", resume,
                                                settings.reward.images)
    x, _ = datasets.materialize(ws.splits.reward, limit=1)
    dense_macs, dense_params = count_macs_params(ws.loaded.module, x)
    pruned_bytes, tuned_bytes = export_bytes(pruned, ws), export_bytes(tuned, ws)
    measured = {"pruned": measure_against_dense(ws, ctx, pruned_bytes, pruned, settings, batches=()),
                "finetuned": measure_against_dense(ws, ctx, tuned_bytes, tuned, settings)}
    dense_accuracy = session_accuracy(open_session(ctx.dense_onnx), ws.splits.test)
    at = measured["finetuned"]["speedup"]
    speedup_warning(settings.speedup, found["predicted_speedup"], at[str(settings.latency.batch)]["speedup"],
                    settings.latency.batch)
    metadata = {"qlp.source_sha256": ws.loaded.sha256, "qlp.structure": settings.structure,
                "qlp.method": settings.method, "qlp.dropped_blocks": json.dumps(ctx.space.dropped(widths)),
                "qlp.target_speedup": f"{settings.speedup:g}", "qlp.latency_batch": settings.latency.batch,
                "qlp.threads": settings.latency.threads,
                "qlp.predicted_speedup": f"{found['predicted_speedup']:.4f}",
                "qlp.measured_speedup": ",".join(f"b{b}:{v['speedup']:.4f}" for b, v in at.items()),
                "qlp.widths": json.dumps(dict(zip(group_names(ws, ctx), widths, strict=False))),
                "qlp.macs": measured["finetuned"]["macs"], "qlp.dense_macs": dense_macs,
                "qlp.params": measured["finetuned"]["params"], "qlp.dense_params": dense_params,
                "qlp.dataset": ws.data.name, "qlp.dense_test_accuracy": f"{dense_accuracy:.4f}",
                "qlp.pruned_test_accuracy": f"{measured['pruned']['accuracy']:.4f}",
                "qlp.finetuned_test_accuracy": f"{measured['finetuned']['accuracy']:.4f}", "qlp.command": command,
                **{k: v for k, v in ws.loaded.metadata.items() if not k.startswith("qlp.")}}
    verification = export_verified(tuned, export.with_metadata(tuned_bytes, metadata), ws, staged / "model.onnx")
    verification["path"] = str(out / "model.onnx")  # where it will be once the run's files are in place
    report = {
        "model": str(model_path), "model_sha256": ws.loaded.sha256, "data": ws.data.name,
        "structure": settings.structure,
        "method": settings.method, "target_speedup": settings.speedup, "latency_batch": settings.latency.batch,
        "threads": settings.latency.threads, "round_to": settings.latency.round_to,
        "predicted_speedup": found["predicted_speedup"],
        "measured_speedup": {b: v["speedup"] for b, v in at.items()},
        "accuracy": {"dense": dense_accuracy, "pruned": measured["pruned"]["accuracy"],
                     "finetuned": measured["finetuned"]["accuracy"]},
        "macs": {"dense": dense_macs, "pruned": measured["finetuned"]["macs"]},
        "params": {"dense": dense_params, "pruned": measured["finetuned"]["params"]},
        "groups": [{"name": label, "module": g.name, "channels": g.size, "width": w}
                   for label, g, w in zip(group_names(ws, ctx), ctx.space.groups, widths, strict=False)],
        "blocks": block_list(ctx, widths),
        "left_whole": [{"group": ws.loaded.layer_names.get(n, n), "why": r} for n, r in ctx.space.unsafe],
        "seed": {"search": settings.search.seed if settings.search is not None else None,
                 "finetune": None if settings.finetune is None else settings.finetune.seed, "split": ws.split_seed},
        "settings": {**jsonable(settings), "device": ws.device, "data": ws.data.name},
        "versions": versions(),
        "channel_maps": ctx.space.channel_maps, "latency_table": ctx.table.summary(), "search": found,
        "measured": measured, "verification": verification,
        "finetune": finetune_report(settings.finetune, tuned, distill=settings.distill),
        "command": command, "wall_seconds": round(time.perf_counter() - started + ctx.seconds, 1),
    }
    if settings.quantize is not None:  # int8 on top of the smaller network, timed against the dense fp32 model
        report["int8"] = quantize_beside(ws, staged / "model.onnx", settings.quantize,
                                         measured["finetuned"]["accuracy"])
        int8_bytes = (staged / "model.int8.onnx").read_bytes()
        report["int8"]["measured_speedup"] = {
            str(b): measure_speedup(ctx.dense_onnx, int8_bytes, ws.input_shape, b, settings.latency.threads,
                                    rounds=settings.speed_rounds)["speedup"]
            for b in sorted({*SPEEDUP_BATCHES, settings.latency.batch})}
        report["cpu"] = cpu_capability()
    atomic_write_json(staged / "report.json", report)
    atomic_write_text(staged / "report.md", report_markdown(report))
    return report


def group_names(ws: Workspace, ctx: ChannelContext) -> list[str]:
    """The readable name of each channel group: its root layer's (base.names)."""
    return ws.loaded.names_of([g.name for g in ctx.space.groups])


def block_list(ctx: ChannelContext, units: list[int]) -> list[dict]:
    """The removable blocks, whether `units` keeps each, and the trainable parameters each holds."""
    dropped = set(ctx.space.dropped(units))
    return [{"name": b.name, "kept": b.name not in dropped, "parameters": b.parameters} for b in ctx.space.blocks]


def policy_json(ws: Workspace, ctx: ChannelContext, settings: ChannelSettings, found: dict) -> dict:
    return {"format": POLICY_FORMAT, "structure": settings.structure, "method": settings.method,
            "target_speedup": settings.speedup, "latency": asdict(settings.latency),
            "model_sha256": ws.loaded.sha256, "criterion": found["criterion"],
            "groups": [{"name": label, "module": g.name, "channels": g.size, "width": w}
                       for label, g, w in zip(group_names(ws, ctx), ctx.space.groups, found["widths"], strict=False)],
            "blocks": block_list(ctx, found["widths"]), "predicted_speedup": found["predicted_speedup"],
            "search": {k: v for k, v in found.items() if k not in ("widths", "criterion")}}
