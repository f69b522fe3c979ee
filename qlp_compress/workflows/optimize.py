"""`optimize`: the fastest (or smallest) verified model within an accuracy budget, from width, depth and int8.

It climbs a ladder of targets, compressing at each with QLP, distillation and fine-tuning (the structured
workflow for speed, the weight workflow for size), and writes int8 beside every candidate. Each candidate and each
of its forms (float, int8) is judged by:
- its loss: accuracy points lost against the dense model on reward-split images the search never scored (the
  held-out images, as the answer's selection uses them);
- its speed: measured directly, interleaved with the dense model, at batch 1 and at `batch`; or its size on disk.
The climb stops at the first target where no form stays within the budget, when the latency table predicts the
target out of reach, or when the time budget is spent. The answer is the fastest (smallest) form within the budget;
only then is the test split read, for the answer's report (and the dense model's, beside it).

Every candidate is a complete output folder of its own, `OUT/candidates/<name>/` (model, policy, report), built in
OUT/.work/candidates while the run lasts, so that `--resume` continues an interrupted candidate and reuses the
finished ones; they move into OUT with the answer as one set (base.outputs).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch.utils.data import Subset

from qlp_compress.base.errors import Interrupted, QLPError, UsageError
from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.base.messages import console
from qlp_compress.base.names import structure_parts
from qlp_compress.base.outputs import OutputRun
from qlp_compress.deploy.engine import open_session, session_accuracy
from qlp_compress.deploy.quantize import QuantizeSettings
from qlp_compress.report.optimize import objective_value, optimize_markdown, pareto_front, plot_pareto
from qlp_compress.report.progress import is_quiet, phase
from qlp_compress.report.provenance import jsonable, versions
from qlp_compress.workflows import weights
from qlp_compress.workflows.channels import ChannelSettings, compress_channels, open_channels
from qlp_compress.workflows.workspace import Workspace, export_bytes

OBJECTIVES = ("speed", "size")
SPEEDUP_LADDER = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # speedup targets, climbed in order
SPARSITY_LADDER = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)  # weight sparsities climbed for --objective size
PROGRESS = "optimize.json"  # in OUT/.work: the settings the candidates were made with and the time spent


@dataclass(frozen=True)
class OptimizeSettings:
    """One optimize run."""

    max_loss: float  # accuracy points the answer may lose against the dense model (held-out reward images)
    objective: str = "speed"  # speed: the fastest form at `batch`; size: the smallest file
    batch: int = 64  # the batch the speed is for (the latency table's and the answer's)
    time_budget: float | None = None  # seconds of wall time; the best found so far is returned when it is spent
    structure: str = "channel,depth"  # what speed candidates remove ("channel" for models without removable blocks)
    channel: ChannelSettings = field(default_factory=ChannelSettings)  # how a speed candidate is made
    weight: weights.CompressSettings = field(default_factory=weights.CompressSettings)  # how a size candidate is
    int8: QuantizeSettings | None = field(default_factory=QuantizeSettings)  # int8 beside every candidate (None: no)
    speedups: tuple[float, ...] = SPEEDUP_LADDER
    sparsities: tuple[float, ...] = SPARSITY_LADDER


def check_settings(settings: OptimizeSettings) -> None:
    if settings.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {settings.objective!r}")
    if not 0 <= settings.max_loss <= 100:
        raise UsageError(f"--max-loss is in accuracy points, from 0 to 100 (e.g. 1 for one point), got "
                         f"{settings.max_loss}")
    if settings.time_budget is not None and not settings.time_budget > 0:
        raise UsageError(f"--time-budget must be a number of seconds above 0 (e.g. 3600), got {settings.time_budget}")


class HeldOut(Subset):
    """The reward split after the images the search's reward measures: what candidates are judged on."""

    label = "held-out reward-split"


def held_out(ws: Workspace, measured: int) -> HeldOut:
    n = len(ws.splits.reward)
    if n <= measured:
        raise UsageError(f"the reward split holds {n} images and the search measures {measured}, so none is left to "
                         "judge candidates on; raise --reward-size (e.g. 5000) or lower --reward-images")
    return HeldOut(ws.splits.reward, range(measured, n))


def best_within_budget(model_path: Path, ws: Workspace, settings: OptimizeSettings, out: Path, command: str,
             resume: bool = False, force: bool = False) -> dict:
    """Climb the ladder, choose, and write OUT (see the module docstring) as one set."""
    check_settings(settings)
    measured = settings.channel.reward.images if settings.objective == "speed" else (
        settings.weight.reward.images if settings.weight.reward else 1000)
    judge = replace(ws, splits=replace(ws.splits, test=held_out(ws, measured)))  # checked before OUT is touched
    with OutputRun(out, force, resume) as run:
        report = _optimize(model_path, ws, judge, settings, out, run, command, resume)
        run.commit()
    return report


def _record(settings: OptimizeSettings, ws: Workspace) -> dict:
    """What the candidates depend on; a resume with other values is refused (the budget and time may change)."""
    shaped = replace(settings, max_loss=0.0, time_budget=None)
    return json.loads(json.dumps({"settings": jsonable(shaped), "run": dict(ws.record)}, default=str))


def _optimize(model_path: Path, ws: Workspace, judge: Workspace, settings: OptimizeSettings, out: Path,
              run: OutputRun, command: str, resume: bool) -> dict:
    started = time.perf_counter()
    folder = run.work / "candidates"
    progress_path = run.work / PROGRESS
    record = _record(settings, ws)
    spent = 0.0
    if resume and progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        if progress.get("record") != record:
            raise UsageError(f"{out} holds candidates made with other settings; rerun without --resume and with "
                             "--force to start over, or resume with the settings of the first run")
        spent = float(progress.get("seconds", 0.0))
    elif folder.exists():
        shutil.rmtree(folder)  # an earlier run's candidates, not continued (--force without --resume)
    folder.mkdir(parents=True, exist_ok=True)

    def save_progress() -> None:
        atomic_write_json(progress_path, {"record": record, "seconds": round(spent + time.perf_counter() - started, 1)})

    save_progress()
    ctx = None
    if settings.objective == "speed":
        latency = replace(settings.channel.latency, batch=settings.batch)
        ctx = open_channels(ws, latency, structure=settings.structure, blocks_optional=True)
        if not ctx.space.blocks and structure_parts(settings.structure)[1]:
            console.print("note: this model has no residual block that can be removed whole; optimize narrows "
                          "channels only", highlight=False, soft_wrap=True)
            settings = replace(settings, structure="channel")
        dense_onnx = ctx.dense_onnx
    else:
        dense_onnx = export_bytes(ws.loaded.module, ws)
    dense_held = session_accuracy(open_session(dense_onnx), judge.splits.test)
    rows: list[dict] = []
    stopped = "the ladder's last target was reached"
    ladder = settings.speedups if settings.objective == "speed" else settings.sparsities
    for step, target in enumerate(ladder, 1):
        elapsed = spent + time.perf_counter() - started
        if settings.time_budget is not None and elapsed >= settings.time_budget:
            stopped = f"the time budget ({settings.time_budget:g} s) was spent after {elapsed:.0f} s"
            break
        if ctx is not None and target > ctx.table.max_speedup():
            stopped = (f"{target:g}× is beyond what the latency table predicts for this model "
                       f"({ctx.table.max_speedup():.2f}× at the narrowest widths with every removable block dropped)")
            break
        name = f"speedup-{target:g}x" if ctx is not None else f"sparsity-{target:g}"
        with phase(f"candidate {step}/{len(ladder)}: {name}"):
            try:
                report = _candidate(model_path, judge, ctx, settings, target, folder / name, command)
            except Interrupted:
                raise  # Ctrl-C or SIGTERM: the run stops here, and --resume continues this candidate
            except QLPError as e:  # (its folder goes: it holds no model, only the failed run's checkpoints)
                stopped = f"the candidate at {name} failed: {e}"
                shutil.rmtree(folder / name, ignore_errors=True)
                break
        forms = _forms(name, target, report, settings, dense_held, folder / name)
        rows.extend(forms)
        save_progress()
        if not is_quiet():
            console.print("; ".join(f"{f['name']}: loss {f['loss']:+.2f} points, " + _shown(f, settings)
                                    for f in forms), highlight=False, soft_wrap=True)
        if min(f["loss"] for f in forms) > settings.max_loss:
            stopped = f"no form of {name} stayed within {settings.max_loss:g} points"
            break
    dense = {"name": "dense", "form": "float", "target": None, "loss": 0.0, "held_out_accuracy": dense_held,
             "speedup": {"1": 1.0, str(settings.batch): 1.0}, "bytes": len(dense_onnx), "file": None}
    return _finish(model_path, ws, settings, run, command, [dense, *rows], dense_onnx, stopped,
                   round(spent + time.perf_counter() - started, 1), ctx, len(judge.splits.test))


def _candidate(model_path: Path, judge: Workspace, ctx, settings: OptimizeSettings, target: float, folder: Path,
               command: str) -> dict:
    """The candidate's report: read from a finished folder, else made (continued when it was interrupted)."""
    report_path = folder / "report.json"
    if report_path.is_file() and not (folder / ".work").exists():
        return json.loads(report_path.read_text())
    resume = (folder / ".work").exists()
    if ctx is not None:
        cell = replace(settings.channel, structure=settings.structure, speedup=target, quantize=settings.int8,
                       latency=replace(settings.channel.latency, batch=settings.batch))
        return compress_channels(model_path, judge, cell, folder, command, resume=resume, ctx=ctx)
    cell = replace(settings.weight, target=target, quantize=settings.int8, sparse_storage=True)
    return weights.compress(model_path, judge, cell, folder, command, resume=resume)


def _forms(name: str, target: float, report: dict, settings: OptimizeSettings, dense_held: float,
           folder: Path) -> list[dict]:
    """The candidate's float form and, when it was written, its int8 form, each with its loss, speed and size."""
    batch = str(settings.batch)
    accuracy = report["accuracy"]["finetuned"] if "finetuned" in report["accuracy"] else report["accuracy"]["pruned"]
    speed = report.get("measured_speedup", {})
    # the float form's file: the sparse-storage one where it was written (size), else the model itself
    file = "model.sparse.onnx" if settings.objective == "size" and (folder / "model.sparse.onnx").is_file() \
        else "model.onnx"
    forms = [{"name": name, "form": "float", "target": target, "held_out_accuracy": accuracy,
              "loss": round((dense_held - accuracy) * 100, 4),
              "speedup": {b: speed[b] for b in ("1", batch) if b in speed}, "bytes": (folder / file).stat().st_size,
              "file": f"candidates/{name}/{file}", "blocks_dropped": sum(not b["kept"] for b in
                                                                       report.get("blocks", []))}]
    int8 = report.get("int8")
    if int8 and (folder / "model.int8.onnx").is_file():
        acc = int8["accuracy"]["int8_accuracy"]
        forms.append({**forms[0], "name": f"{name} int8", "form": "int8", "held_out_accuracy": acc,
                      "loss": round((dense_held - acc) * 100, 4),
                      "speedup": {b: v for b, v in int8.get("measured_speedup", {}).items() if b in ("1", batch)},
                      "bytes": (folder / "model.int8.onnx").stat().st_size,
                      "file": f"candidates/{name}/model.int8.onnx"})
    return forms


def _shown(form: dict, settings: OptimizeSettings) -> str:
    if settings.objective == "size":
        return f"{form['bytes'] / 1e6:.3f} MB"
    return f"{form['speedup'].get(str(settings.batch), float('nan')):.2f}× at batch {settings.batch}"


def choose(rows: list[dict], settings: OptimizeSettings) -> dict:
    """The answer: among the forms within the budget (the dense model always is), the fastest at the batch (or the
    smallest file); on a tie the dense model, then the lower loss."""
    def key(form: dict) -> tuple:
        return objective_value(form, settings.objective, settings.batch), form["name"] == "dense", -form["loss"]

    return max((r for r in rows if r["loss"] <= settings.max_loss), key=key)


def _finish(model_path: Path, ws: Workspace, settings: OptimizeSettings, run: OutputRun, command: str,
            rows: list[dict], dense_onnx: bytes, stopped: str, seconds: float, ctx, held_out_images: int) -> dict:
    chosen = choose(rows, settings)
    chosen_bytes = dense_onnx if chosen["file"] is None else (run.work / chosen["file"]).read_bytes()
    with phase("test accuracy of the answer and of the dense model (the test split's only reading)"):
        test = {"chosen": session_accuracy(open_session(chosen_bytes), ws.splits.test),
                "dense": session_accuracy(open_session(dense_onnx), ws.splits.test)}
    staged = run.staging
    (staged / "model.onnx").write_bytes(chosen_bytes)
    shutil.move(str(run.work / "candidates"), str(staged / "candidates"))
    cpu = cpu_capability()
    report = {
        "model": str(model_path), "model_sha256": ws.loaded.sha256, "data": ws.data.name,
        "objective": settings.objective, "max_loss_points": settings.max_loss, "batch": settings.batch,
        "structure": settings.structure if settings.objective == "speed" else "weight",
        "chosen": chosen["name"], "chosen_form": chosen["form"], "chosen_file": chosen["file"] or "the dense model",
        "test_accuracy": test, "test_loss_points": round((test["dense"] - test["chosen"]) * 100, 4),
        "candidates": rows, "front": [r["name"] for r in pareto_front(rows, settings.objective, settings.batch)],
        "stopped": stopped, "held_out_images": held_out_images,
        "cpu": cpu, "cpu_description": describe_cpu(cpu),
        "int8_verdict": int8_verdict(rows, settings.batch, cpu, settings.objective),
        "latency_table": ctx.table.summary() if ctx is not None else None,
        "settings": jsonable(settings), "versions": versions(), "command": command, "wall_seconds": seconds,
    }
    if chosen["name"] == "dense" and len(rows) > 1:
        report["note"] = (f"no compressed form stayed within {settings.max_loss:g} points on the held-out images: the "
                          "answer is the dense model; raise --max-loss or --finetune-epochs")
    elif chosen["name"] == "dense":
        report["note"] = f"no candidate was made ({stopped}): the answer is the dense model"
    plot_pareto(rows, settings.max_loss, chosen["name"], settings.objective, settings.batch, staged / "pareto.png")
    atomic_write_json(staged / "optimize.json", report)
    atomic_write_text(staged / "report.md", optimize_markdown(report))
    return report


def int8_verdict(rows: list[dict], batch: int, cpu: dict, objective: str = "speed") -> str:
    """Which form this CPU favours: int8 against float at the same widths, the median over the candidates (for
    size: the int8 file against the float form's)."""
    pairs = []
    for r in rows:
        base = next((f for f in rows if f["name"] == r["name"].removesuffix(" int8")), None) if r["form"] == "int8" \
            else None
        if base is None:
            continue
        if objective == "size":
            pairs.append(base["bytes"] / r["bytes"])
        elif base["speedup"].get(str(batch)) and r["speedup"].get(str(batch)):
            pairs.append(r["speedup"][str(batch)] / base["speedup"][str(batch)])
    if not pairs:
        return "int8 was not measured"
    ratio = sorted(pairs)[len(pairs) // 2]
    if objective == "size":
        return (f"the int8 file is {ratio:.2f}× {'smaller' if ratio > 1 else 'larger'} than the float form's (median "
                f"of {len(pairs)}; at high sparsity the float file's sparse storage wins)")
    vnni = "with" if cpu.get("avx512_vnni") or cpu.get("avx_vnni") else "without"
    if ratio < 1:
        return (f"int8 is slower than float here ({ratio:.2f}× the float form's speed at batch {batch}, median of "
                f"{len(pairs)}; this CPU is {vnni} VNNI)")
    return f"int8 is faster than float here ({ratio:.2f}× at batch {batch}, median of {len(pairs)}; {vnni} VNNI)"
