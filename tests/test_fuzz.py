"""The fuzz run (benchmarks/fuzz.py) at a fixed seed: 100 damaged inputs through the real command line (mutated
ONNX files made from the shipped ResNet-20, mutated .npz data sets and policy.json files), and a handful of damaged
latency caches and channel policies. Each must end in a correct result or a one-line error: no traceback, no
"unexpected" error, no hang, no changed input file; a damaged cache always in a result. About half a minute on
2 CPU cores; `python benchmarks/fuzz.py --mutations N --seed S [--kinds cache,channel-policy]` runs longer ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = 100  # every kind of damage and both outcomes at seed 0; `make fuzz` runs 2000
CHANNEL_MUTATIONS = 8  # a channel run takes seconds: a handful here, more under the benchmark


def _fuzz(tmp_path, mutations: int, *extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    summary_path = tmp_path / "fuzz.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--mutations", str(mutations), "--seed", "0",
         "--json", str(summary_path), *extra], capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    assert summary_path.exists(), result.stderr[-3000:]
    return json.loads(summary_path.read_text()), result


@pytest.mark.slow
def test_fuzzed_inputs_give_a_result_or_one_error_line(tmp_path):
    summary, result = _fuzz(tmp_path, MUTATIONS)
    assert summary["cases"] == MUTATIONS
    assert summary["failures"] == [], json.dumps(summary["failures"][:5], indent=1)
    assert result.returncode == 0, result.stderr[-3000:]
    # every class of mutation was tried, and both outcomes occur (the checks can fail and can pass)
    assert {"onnx:flip", "onnx:truncate", "onnx:fields", "npz", "policy"} <= summary["by_kind"].keys()
    assert summary["exit_codes"].get("0", 0) > 0 and summary["exit_codes"].get("1", 0) > 0


@pytest.mark.slow
def test_fuzzed_latency_caches_and_channel_policies(tmp_path):
    """A damaged latency cache (fields, NaN, FIFO, /dev/zero, …) is measured again and the run ends in a result; a
    mutated channel policy ends in a result or one `not a valid policy.json` line."""
    summary, result = _fuzz(tmp_path, CHANNEL_MUTATIONS, "--kinds", "cache,channel-policy")
    assert summary["cases"] == CHANNEL_MUTATIONS
    assert summary["failures"] == [], json.dumps(summary["failures"][:5], indent=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(summary["by_kind"]) == {"cache", "channel-policy"}
    assert summary["by_kind"]["cache"] == {"ok": summary["by_kind"]["cache"].get("ok", 0)}  # never an error
