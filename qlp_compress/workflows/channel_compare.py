"""`compare` for the structured modes (channel, depth, or both): every method at every speedup target, one latency
table, the same fine-tuning; rows kept after every cell so that --resume continues."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.base.outputs import OutputRun
from qlp_compress.deploy.engine import open_session, session_accuracy
from qlp_compress.report.structured import compare_markdown
from qlp_compress.workflows.channels import (
    ChannelSettings,
    find_widths,
    measure_against_dense,
    open_channels,
    prune_channels_and_finetune,
)
from qlp_compress.workflows.compare import measured_rows
from qlp_compress.workflows.selection import SelectionSettings, run_record
from qlp_compress.workflows.workspace import Workspace, export_bytes, with_record


def channel_record(settings: ChannelSettings) -> dict[str, object]:
    """What a structured comparison's rows depend on (base.resume), by option."""
    record = run_record(settings.search, None, None, settings.finetune, SelectionSettings())
    for weight_only in ("--candidates", "--select-epochs", "--min-density"):
        record.pop(weight_only)
    latency, reward = settings.latency, settings.reward
    if settings.structure != "channel":  # (records written before depth have no structure: channel)
        record["--structure"] = settings.structure
    return {**record, "--distill": settings.distill, "--latency-batch": latency.batch, "--threads": latency.threads,
            "--round-to": latency.round_to, "--reward-images": reward.images, "--bn-recalibrate": reward.bn_recalibrate}


def compare_channels(ws: Workspace, methods: list[str], speedups: list[float], settings: ChannelSettings, out: Path,
                     command: str, force: bool = False, resume: bool = False) -> list[dict]:
    """Every method at every speedup target: same table, same fine-tuning. compare.json and compare.md are
    written as a set at the end; the rows so far are kept in OUT/.work/compare.json after every cell, and
    `resume` continues from them."""
    with OutputRun(out, force, resume) as run:
        rows = _compare_channels(ws, methods, speedups, settings, run, command)
        run.commit()
    return rows


def _compare_channels(ws: Workspace, methods: list[str], speedups: list[float], settings: ChannelSettings,
                      run: OutputRun, command: str) -> list[dict]:
    ws = with_record(ws, channel_record(settings))  # what every row shares; a resume with others is refused
    ctx = open_channels(ws, settings.latency, structure=settings.structure)
    rows = measured_rows(run.work / "compare.json", ws.loaded.sha256, dict(ws.record))
    for speedup in speedups:
        for method in methods:
            if any(r["method"] == method and r["target_speedup"] == speedup for r in rows):
                continue  # measured before the interruption
            cell = replace(settings, method=method, speedup=speedup)
            found = find_widths(ws, ctx, cell)
            pruned, tuned = prune_channels_and_finetune(ws, ctx, found["widths"], found["criterion"], cell.finetune,
                                                        cell.distill)
            tuned_bytes = export_bytes(tuned, ws)
            result = measure_against_dense(ws, ctx, tuned_bytes, tuned, cell)
            rows.append({"method": method, "target_speedup": speedup, "widths": found["widths"],
                         "dropped_blocks": ctx.space.dropped(found["widths"]),
                         "predicted_speedup": found["predicted_speedup"],
                         "pruned_accuracy": session_accuracy(open_session(export_bytes(pruned, ws)), ws.splits.test),
                         "finetuned_accuracy": result["accuracy"] if cell.finetune else None,
                         "measured_speedup": {b: v["speedup"] for b, v in result["speedup"].items()},
                         "macs": result["macs"], "params": result["params"],
                         "search_seconds": found["search_seconds"]})
            atomic_write_json(run.work / "compare.json", {"command": command, "model_sha256": ws.loaded.sha256,
                                                     "structure": settings.structure, "record": dict(ws.record),
                                                     "groups": [g.name for g in ctx.space.groups], "rows": rows})
    os.replace(run.work / "compare.json", run.staging / "compare.json")
    atomic_write_text(run.staging / "compare.md", compare_markdown(rows, command))
    return rows
