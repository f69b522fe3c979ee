"""The output contract: the result on stdout (a table in a terminal, or one JSON document with --json), progress and
logs on stderr, --quiet for no progress; outside a terminal nothing wraps or is cut."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from rich.console import Console, RenderableType
from rich.text import Text

from qlp_compress.base import messages
from qlp_compress.report import tables

WIDE = 200  # columns used outside a terminal, so that tables never wrap when piped or logged


def stdout_console() -> Console:
    """Rich on stdout; outside a terminal, wide and without colour codes."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=WIDE, no_color=True, highlight=False, soft_wrap=True)


def set_quiet(quiet: bool) -> None:
    messages.set_quiet(quiet)


def _plain(value):
    """JSON for what json cannot write itself (paths, tuples of numpy numbers, ...)."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def emit(result: dict | list, as_json: bool, renderables: Callable[[], Iterable[RenderableType | str]]) -> None:
    """Print the command's result on stdout: one JSON document, or its tables and summary lines. A rank of a
    torchrun job other than 0 (its result is {"rank": R}) prints nothing: rank 0 reports."""
    if isinstance(result, dict) and result.get("rank", 0) > 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=_plain) + "\n")
        sys.stdout.flush()
        return
    console = stdout_console()
    for item in renderables():
        console.print(item)


def compressed_lines(report: dict):
    """What a terminal shows for a finished search or prune: its table and one summary line."""
    if report.get("structure", "weight") != "weight":
        speed = ", ".join(f"batch {b}: {v:.2f}×" for b, v in report["measured_speedup"].items())
        yield Text(f"wrote {report['out']}: model.onnx measured speedup {speed} (target {report['target_speedup']:g}× "
                   f"at batch {report['latency_batch']}), test accuracy {report['accuracy']['finetuned']:.2%} (dense "
                   f"{report['accuracy']['dense']:.2%})")
        if report.get("left_whole"):
            yield Text("left whole: " + "; ".join(f"{g['group']} ({g['why']})" for g in report["left_whole"]))
        return
    yield tables.report_table(report)
    yield Text(f"wrote {report['out']}: model.onnx at sparsity "
               f"{report['achieved_sparsity']:.4f}, test accuracy {report['accuracy'].get('finetuned', 0):.2%} "
               f"(dense {report['accuracy']['dense']:.2%})")


def int8_line(r: dict) -> Text:
    """The one line an int8 file gets: accuracy, size, zeros kept, and its speed against float here."""
    a = r["accuracy"]
    return Text(f"wrote {r['path']}: int8 test accuracy {a['int8_accuracy']:.2%} (float {a['float_accuracy']:.2%}), "
                f"{r['bytes'] / 1e6:.3f} MB (float {r['float_bytes'] / 1e6:.3f} MB), all "
                f"{r['zeros']['float_zeros']:,} zero weights kept"
                + "".join(f", {b['int8_speedup']:.2f}× float's speed at batch {b['batch']}"
                          for b in r.get("speed", {}).get("batches", [])))
