"""`python tests/paused_cli.py ARGS`: the command line (`python -m qlp_compress ARGS`) that stops at a known point
and waits there, so that a test can signal or kill it at that point instead of racing the machine's speed.

QLP_TEST_PAUSE="WHERE:N[:AFTER]" says where: at the N-th time this process reaches WHERE (counted only once it has
written a file whose path ends with AFTER, when given):
- `reward`: a weight-mode reward evaluation begins (inside a search episode, outside any critical section);
- `step`: a training step begins (`Tensor.backward`: fine-tuning, a candidate of the answer's choice);
- `written`: a file was just put in place (its path ends with AFTER) by an atomic write (for kill -9 only: the
  write may sit inside a section that holds SIGINT/SIGTERM back).
There it writes the file named by QLP_TEST_PAUSED (what the test waits for) and sleeps until a signal ends it (at
most 10 minutes). A signal raises where the run would meet it at that point; nothing else in the run changes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _install(spec: str, marker: Path) -> None:
    import torch

    from qlp_compress.reward import weights

    where, count, *after = spec.split(":", 2)
    wanted, after = int(count), (after[0] if after else None)
    seen = {"reward": 0, "step": 0, "written": 0}
    armed = [after is None or where == "written"]

    def reached(kind: str) -> None:
        if kind != where or not armed[0]:
            return
        seen[kind] += 1
        if seen[kind] == wanted:
            marker.write_text(f"{kind} {wanted}\n")
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # a signal's handler raises here (KeyboardInterrupt)
                time.sleep(0.05)

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        result = real_replace(src, dst, *args, **kwargs)
        if after is not None and str(dst).endswith(after):
            if where == "written":
                reached("written")
            armed[0] = True
        return result

    os.replace = replace  # the one rename every atomic write ends with (qlp_compress.base.io.atomic_path)
    real_reward = weights.Reward.__call__

    def reward(self, *args, **kwargs):
        reached("reward")
        return real_reward(self, *args, **kwargs)

    weights.Reward.__call__ = reward
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        reached("step")
        return real_backward(self, *args, **kwargs)

    torch.Tensor.backward = backward


if __name__ == "__main__":
    if os.environ.get("QLP_TEST_PAUSE"):
        _install(os.environ["QLP_TEST_PAUSE"], Path(os.environ["QLP_TEST_PAUSED"]))
    sys.argv[0] = "qlp-compress"
    from qlp_compress.cli.main import main

    main()
