"""Warnings where a user's settings defeat the method: one line each on stderr, saying what to change.

- budget: a curriculum stage whose episodes all (or nearly all) go to demonstrations leaves the agent nothing to
  search with; checked from the settings before the search starts.
- busy machine: a latency table timed while other work competed for the cores predicts speedups that the quiet
  machine does not reproduce; checked when the table is opened.
- short of the target: a channel-pruned model that measures well below its --speedup at the table's batch (the
  table's per-layer sum misjudged the chosen widths); checked after the direct measurement.
- no signal: when every allocation the final stage scored is about chance accuracy, the reward cannot tell good
  allocations from bad ones, and the choice is noise; checked from the episodes after the search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qlp_compress.base.messages import console
from qlp_compress.search.curriculum import SearchSettings, curriculum_targets, stage_episodes

MIN_AGENT_EPISODES = 5  # episodes of its own a stage should give the agent (ε-greedy needs a few to explore)
CHANCE_MARGIN = 0.05  # a reward within 5 points of chance accuracy carries no signal
SPEEDUP_SHORTFALL = 0.9  # warn when the measured speedup is below this share of the target


def _warn(message: str) -> str:
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    return message


def _stages(settings: SearchSettings) -> int:
    if settings.method == "random":
        return 1
    if settings.stage_targets:
        return len(settings.stage_targets)
    return len(curriculum_targets(settings.target_removed, settings.stages, settings.first_target))


def _span(stages: Sequence[int]) -> str:
    return f"stage {stages[0]}" if len(stages) == 1 else f"stages {stages[0]}–{stages[-1]}" \
        if stages == list(range(stages[0], stages[-1] + 1)) else "stages " + ", ".join(map(str, stages))


def budget_warning(settings: SearchSettings, demonstrations: int | None = None) -> str | None:
    """The warning (printed, and returned) when some stage gives the agent fewer than MIN_AGENT_EPISODES episodes of
    its own after the demonstrations; None when the budget is enough. `demonstrations`: how many the search plays
    per stage (default: those the settings name, for qlp)."""
    demos = (len(settings.demonstrations) if settings.method == "qlp" else 0) if demonstrations is None \
        else demonstrations
    n = _stages(settings)
    lengths = stage_episodes(settings.episodes, n, settings.final_share)
    if min(lengths) < 1:
        return None  # refused by the search itself, with its own message
    short = [k + 1 for k, length in enumerate(lengths) if length - demos < MIN_AGENT_EPISODES]
    if not short:
        return None
    needed = settings.episodes
    while min(stage_episodes(needed, n, settings.final_share)) < demos + MIN_AGENT_EPISODES:
        needed += 1
    agent = [max(0, lengths[k - 1] - demos) for k in short]
    what = "no episode of its own" if max(agent) == 0 else \
        f"only {'/'.join(map(str, agent))} episode{'s' if max(agent) > 1 else ''} of its own"
    per_stage = "/".join(map(str, lengths))
    return _warn(f"--episodes {settings.episodes} over {n} stages ({per_stage}) with {demos} demonstrations per "
                 f"stage leaves the agent {what} in {_span(short)}, so the search cannot contribute there; use "
                 f"--episodes {needed} or more (or fewer --stages or --demonstrations)")


def signal_warning(history: Sequence[dict], num_classes: int, target: float, finetune_steps: int = 0) -> str | None:
    """The warning (printed, and returned) when every episode of the final stage that met the target scored within
    CHANCE_MARGIN of chance accuracy (1 / num_classes); None otherwise. `finetune_steps`: the brief fine-tuning the
    reward already gives at this target (0: none)."""
    if not history or num_classes < 2:
        return None
    final = history[-1]["stage"]
    scored = [h["reward"] for h in history if h["stage"] == final and h.get("succeeded")]
    chance = 1.0 / num_classes
    if not scored or max(scored) > chance + CHANCE_MARGIN:
        return None
    tune = f"--reward-finetune-steps {max(20, 2 * finetune_steps)}" + \
        ("" if finetune_steps else f" --reward-finetune-from {target:g}")
    return _warn(f"every allocation scored at sparsity {target:g} is about chance accuracy (best reward "
                 f"{max(scored):.3f}, chance {chance:.3f} with {num_classes} classes), so the reward cannot tell "
                 f"good allocations from bad and the policy is a guess; lower --sparsity, let the reward fine-tune "
                 f"({tune}), or measure on more images (--reward-images)")


def busy_table_warning(table) -> str | None:
    """The warning (printed, and returned) when the latency table was built on a busy machine; None otherwise."""
    load = table.busy_load()
    if load is None:
        return None
    where = table.data.get("file") or "its file in the latency cache (qlp-compress/latency under ~/.cache)"
    return _warn(f"the latency table was measured at a load average of {load:.1f} on {table.data['load']['cpus']} "
                 f"CPUs, so its speedups may be off by up to about 20 %; delete {where} and rerun on a quiet "
                 f"machine to measure it again")


def speedup_warning(target: float, predicted: float, measured: float, batch: int) -> str | None:
    """The warning (printed, and returned) when the exported model's measured speedup at the target's batch is below
    SPEEDUP_SHORTFALL × the target; None otherwise. It suggests the target that the table's error, read as
    proportional, would have turned into the one asked for."""
    if not math.isfinite(target) or measured >= SPEEDUP_SHORTFALL * target:
        return None
    ask = target * predicted / measured if measured > 0 else math.nan
    if not (math.isfinite(ask) and ask > 1):  # no target to suggest (the run refuses NaN before it gets here)
        return _warn(f"the pruned model measures {measured:.2f}× at batch {batch}, short of --speedup {target:g} (the "
                     f"latency table predicted {predicted:.2f}× for these widths); rebuild the latency table on a "
                     "quiet machine")
    return _warn(f"the pruned model measures {measured:.2f}× at batch {batch}, short of --speedup {target:g} (the "
                 f"latency table predicted {predicted:.2f}× for these widths); to land near {target:g}× ask for about "
                 f"--speedup {ask:.2f}, or rebuild the latency table on a quiet machine")
