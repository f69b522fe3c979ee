"""Reading a cached latency table as data, not trust: only a regular file of at most MAX_TABLE_BYTES, checked before
it is opened and again on the open file (a FIFO, a device such as /dev/zero or a folder is never read, and nothing
blocks), and every field checked against what LatencyTable (pruning.latency) reads. A failure is a BadCache whose
message follows the file's name in the caller's one-line note."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

CALIBRATION_POINTS = 20  # a table holds 5 calibration points (8 with depth); more: not a table this tool wrote
MAX_TABLE_BYTES = 64 << 20  # a cached table holds a few thousand entries (ResNet-20 at --round-to 1: about 1 MiB)


class BadCache(Exception):
    """Why a cached table file cannot be used (a phrase that follows the file's name)."""


def read_regular(path: Path) -> bytes | None:
    """The bytes of `path` when it is a regular file within MAX_TABLE_BYTES; None when it does not exist. Checked
    before opening (a FIFO, a device or a folder is never opened), opened without blocking, checked again on the
    open file (it cannot be swapped in between) and read to at most the limit."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BadCache(f"cannot be read ({e.strerror})") from e
    if not stat.S_ISREG(info.st_mode):
        raise BadCache("is not a regular file")
    if info.st_size > MAX_TABLE_BYTES:
        raise BadCache(f"is {info.st_size} bytes, more than a table holds ({MAX_TABLE_BYTES})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BadCache(f"cannot be read ({e.strerror})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadCache("is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_TABLE_BYTES + 1)
    except OSError as e:
        raise BadCache(f"cannot be read ({e.strerror})") from e
    finally:
        os.close(fd)
    if len(raw) > MAX_TABLE_BYTES:
        raise BadCache(f"is more than a table holds ({MAX_TABLE_BYTES} bytes)")
    return raw


def _positive(x: object) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and x > 0


def _count(x: object) -> bool:
    """None, zero or a finite positive number (a load average, a CPU count, seconds)."""
    return x is None or _positive(x) or (type(x) in (int, float) and x == 0)


def check_table(data: object, key: dict, sizes: list[int], wanted: set[str], blocks: int = 0) -> None:
    """Raise BadCache unless `data` is a whole table of `key` (groups of `sizes` channels, then `blocks` removable
    blocks, entries named `wanted`): what LatencyTable reads, of the right types."""
    if not isinstance(data, dict):
        raise BadCache(f"holds a {type(data).__name__}, not a table")
    if data.get("key") != key:
        raise BadCache("belongs to another model, machine or setting (its key differs)")
    if data.get("settings") != key["settings"]:
        raise BadCache("records other settings than its key")
    rewrite = data.get("rewrite")
    if not (isinstance(rewrite, dict) and all(_positive(rewrite.get(k)) for k in
                                              ("dense_ms", "pruned_ms", "pruned_min_ms", "speedup"))):
        raise BadCache("has no dense timings (rewrite: dense_ms, pruned_ms, pruned_min_ms, speedup)")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise BadCache("has no entries")
    if entries.keys() != wanted:
        missing, extra = len(wanted - entries.keys()), len(entries.keys() - wanted)
        raise BadCache(f"has {missing} of its {len(wanted)} entries missing and {extra} extra")
    bad = sum(not _positive(v) for v in entries.values())
    if bad:
        raise BadCache(f"has {bad} entries that are not a finite positive time")
    calibration = data.get("calibration", [])
    if not isinstance(calibration, list) or len(calibration) > CALIBRATION_POINTS:
        raise BadCache("has a calibration that is not a short list")
    for c in calibration:
        widths = c.get("widths") if isinstance(c, dict) else None
        if not (isinstance(widths, list) and len(widths) == len(sizes) + blocks
                and all(type(w) is int and 1 <= w <= n for w, n in zip(widths, sizes, strict=False))
                and all(w in (0, 1) for w in widths[len(sizes):])
                and _positive(c.get("speedup"))):
            raise BadCache("has a calibration point without widths of every group and a finite positive speedup")
    load = data.get("load", {})
    if not (isinstance(load, dict) and all(_count(load.get(k)) for k in ("before", "after", "cpus"))):
        raise BadCache("records a load average that is not a number")
    if not _count(data.get("seconds")):
        raise BadCache("records a build time that is not a number")
