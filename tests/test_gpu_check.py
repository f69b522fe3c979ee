"""`make gpu-check` on a machine without a GPU: it says so and succeeds (the GPU is checked where one is lent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_a_gpu_says_no_gpu_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "no GPU", done.stderr[-2000:]
    assert not out.exists()
