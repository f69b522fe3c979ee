"""The `compare` workflow (weights): every method at every target sparsity, the same fine-tuning budget, one table.

Every row is made with the same settings: OUT/.work/compare.json keeps the rows measured so far with the run's
record (base.resume: the model, the data and its split, fine-tuning, search, reward and selection options), a
--resume with other settings is refused, naming the option, and compare.md lists the settings its rows were made
with and the commands that made them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import atomic_write_text
from qlp_compress.base.names import SEARCH_METHODS as METHODS
from qlp_compress.base.outputs import OutputRun
from qlp_compress.base.resume import check_same
from qlp_compress.pruning.allocate import ALLOCATORS, AllocationSettings
from qlp_compress.pruning.masks import find_prunable_layers
from qlp_compress.reward.weights import RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.curriculum import SearchSettings
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.workflows.parallel import PortableWorkspace, from_portable, run_units, to_portable
from qlp_compress.workflows.selection import SelectionSettings, choose_answer, run_record
from qlp_compress.workflows.weights import allocator, find_policy, prune_weights_and_finetune
from qlp_compress.workflows.workspace import Workspace, export_bytes, measure_onnx, with_record


def compare_weights(ws: Workspace, methods: list[str], targets: list[float], search: SearchSettings,
            reward_settings: RewardSettings, allocation: AllocationSettings, finetune: TrainSettings | None,
            out: Path, command: str, force: bool = False, resume: bool = False,
            selection: SelectionSettings | None = None, scale: ScaleSettings | None = None) -> list[dict]:
    """Every method at every target: same masks rule, same fine-tuning budget, test accuracy via onnxruntime.

    compare.json and compare.md are written as a set at the end (qlp_compress.base.outputs); the rows measured so far
    are also kept in OUT/.work/compare.json after every cell, so an interrupted comparison keeps what it measured,
    and `resume` continues it. With `scale.workers` the cells (method × target) run on Ray workers
    (workflows.parallel), each as it runs in this process; the rows come out in the same order."""
    for method in methods:
        if method not in ALLOCATORS and method not in METHODS:
            raise UsageError(f"unknown method {method!r}; use {', '.join((*METHODS, *ALLOCATORS))}")
    with OutputRun(out, force, resume) as run:
        rows = _compare(ws, methods, targets, search, reward_settings, allocation, finetune, run, command,
                        selection or SelectionSettings(), scale)
        run.commit()
    return rows


def _compare(ws: Workspace, methods: list[str], targets: list[float], search: SearchSettings,
             reward_settings: RewardSettings, allocation: AllocationSettings, finetune: TrainSettings | None,
             run: OutputRun, command: str, selection: SelectionSettings,
             scale: ScaleSettings | None) -> list[dict]:
    from qlp_compress.base.io import atomic_write_json
    from qlp_compress.report.documents import compare_markdown

    ws = with_record(ws, run_record(search, reward_settings, allocation, finetune, selection))
    earlier = _interrupted(run.work / "compare.json", ws.loaded.sha256, dict(ws.record))
    dense_accuracy = measure_onnx(export_bytes(ws.loaded.module, ws), ws, repeats=1)["accuracy"]
    rows = earlier.get("rows", [])
    commands = [*earlier.get("commands", [earlier["command"]] if "command" in earlier else []), command]
    document = {"command": commands[0], "commands": commands, "model_sha256": ws.loaded.sha256,
                "record": dict(ws.record), "rows": rows,
                "layers": ws.loaded.names_of([layer.name for layer in find_prunable_layers(ws.loaded.module)])}
    cell = Cell(search, reward_settings, allocation, finetune, selection, dense_accuracy)
    todo = [(method, target) for method, target in dict.fromkeys((m, t) for t in targets for m in methods)
            if not any(r["method"] == method and r["target"] == target for r in rows)]  # measured before: skipped
    finished: dict[int, dict] = {}

    def keep(i: int, row: dict) -> None:  # a finished cell is kept at once, so an interruption keeps it
        finished[i] = row
        document["rows"] = rows + [finished[k] for k in sorted(finished)]
        atomic_write_json(run.work / "compare.json", document)

    if scale is not None and scale.workers and todo:
        job = CellJob(to_portable(ws), replace(cell, finetune=replace(finetune, nproc=1) if finetune else None))
        units = run_units(scale, compare_cell, job, todo, "compare", [f"{m} @ {t:g}" for m, t in todo], keep,
                          gpus=1 if ws.device == "cuda" else 0)
        document["scale"] = units.as_dict()
    else:
        for i, (method, target) in enumerate(todo):
            keep(i, run_cell(ws, cell, method, target))
    rows = document["rows"]  # in the serial order whoever finished first
    atomic_write_json(run.staging / "compare.json", document)
    atomic_write_text(run.staging / "compare.md", compare_markdown(rows, commands[0]) + settings_markdown(document))
    return rows


@dataclass(frozen=True)
class Cell:
    """What every cell of a comparison shares besides the workspace."""

    search: SearchSettings
    reward: RewardSettings
    allocation: AllocationSettings
    finetune: TrainSettings | None
    selection: SelectionSettings
    dense_accuracy: float


def run_cell(ws: Workspace, cell: Cell, method: str, target: float) -> dict:
    """One method at one target: its allocation (a search's answer chosen as the search command chooses it), pruned,
    fine-tuned and measured on test through onnxruntime (in this process or on a worker)."""
    from qlp_compress.report.progress import search_progress

    started = time.perf_counter()
    if method in METHODS:
        with search_progress(f"{method} @ {target:g}", cell.search.episodes) as on_episode:
            policy = find_policy(ws, method, target, replace(cell.search, target_removed=target), cell.reward,
                                 on_episode=on_episode)
        if method == "qlp":  # its answer chosen as the search command chooses it
            policy = choose_answer(ws, policy, allocator(ws, cell.allocation), cell.selection, cell.finetune,
                                   cell.reward.images)
    else:
        policy = find_policy(ws, method, target, allocation=cell.allocation)
    search_seconds = time.perf_counter() - started
    pruned, tuned = prune_weights_and_finetune(ws, policy, cell.finetune, measured=cell.reward.images)
    return {"method": method, "target": target, "achieved": policy.achieved, "dense_accuracy": cell.dense_accuracy,
            "pruned_accuracy": measure_onnx(export_bytes(pruned, ws), ws, repeats=1)["accuracy"],
            "finetuned_accuracy": measure_onnx(export_bytes(tuned, ws), ws, repeats=1)["accuracy"]
            if cell.finetune else None,
            "best_reward": policy.best_reward, "search_seconds": round(search_seconds, 1),
            "chosen": policy.search.get("selection", {}).get("chosen"), "sparsities": policy.sparsities}


@dataclass(frozen=True)
class CellJob:
    """What every cell's worker shares: the workspace and the cells' settings."""

    ws: PortableWorkspace
    cell: Cell


def compare_cell(job: CellJob, unit: tuple[str, float]) -> dict:
    """One cell on a worker: the serial path's `run_cell` on the workspace the job carries."""
    method, target = unit
    return run_cell(from_portable(job.ws), job.cell, method, target)


def settings_markdown(document: dict) -> str:
    """compare.md's account of how its rows were made: the recorded settings, the workers the cells ran on and every
    command that added rows."""
    from qlp_compress.report.documents import units_lines

    lines = ["", "## Settings", "", "Every row was made with these settings (compare.json → `record`); `--resume` "
             "refuses others.", "", "| setting | value |", "|---|---|"]
    for key, value in document.get("record", {}).items():
        shown = "none" if value is None else f"{value:g}" if isinstance(value, float) else \
            ",".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"| {key} | {shown[:16] + '…' if key == 'model' else shown} |")
    record = document.get("record", {})
    asked, budget = record.get("--select-epochs"), record.get("--finetune-epochs")
    if asked is not None and budget and asked > budget and any(r["method"] == "qlp" for r in document["rows"]):
        lines += ["", f"qlp's candidates were each fine-tuned for {budget:g} epochs: --select-epochs {asked:g} is "
                      f"capped at --finetune-epochs {budget:g}."]
    scale = document.get("scale")
    if scale:
        lines += ["", *units_lines(scale, "cell")[:1]]
    commands = document.get("commands", [])
    if len(commands) > 1:
        lines += ["", "Resumed by: " + "; ".join(f"`{c}`" for c in commands[1:]) + "."]
    return "\n".join(lines) + "\n"


def _interrupted(checkpoint: Path, model_sha256: str, record: dict) -> dict:
    """The document of an interrupted comparison (empty when there is none); one with other settings, or of
    another model, is refused (base.resume)."""
    if not checkpoint.exists():
        return {}
    try:
        document = json.loads(checkpoint.read_text())
        rows = document["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError("rows")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QLPError(f"{checkpoint} is damaged ({type(e).__name__}); pass --force instead of --resume to start "
                       "over") from e
    check_same(document.get("record"), record)
    if document.get("model_sha256") != model_sha256:
        check_same({"model": document.get("model_sha256")}, {"model": model_sha256})
    return document


def measured_rows(checkpoint: Path, model_sha256: str, record: dict | None = None) -> list[dict]:
    """The rows an interrupted comparison measured; one with other settings (`record`), or of another model, is
    refused (base.resume)."""
    return _interrupted(checkpoint, model_sha256, dict(record or {})).get("rows", [])
