"""The figures a run leaves: per-layer sparsity (sparsity.png) and the reward of every episode (reward.png).

Each figure is built by a `*_figure` function (returned open, so tests can read back what is drawn) and saved by
the matching `plot_*` function."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qlp_compress.base.io import atomic_path

DPI = 150
FONT = 9  # points: readable at the shipped size without zooming
REWARD_YLABEL = "reward (accuracy on the reward split;\nnegative = missed the target)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 1, "legend.fontsize": FONT - 1})
    return plt


def layer_sparsity_figure(sparsities: dict[str, list[float]], layers: Sequence[str], target: float | None = None,
                          title: str | None = None):
    """Grouped bars: per-layer sparsity of one or more methods; the target global sparsity as a dashed line; a
    hollow marker on every bar of 0 % (a layer left dense), which would otherwise draw nothing."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) * max(1, len(sparsities)) ** 0.5 + 1.5), 4.2))
    width = 0.8 / len(sparsities)
    zero_label = "0 % (layer left dense)"
    for i, (method, values) in enumerate(sparsities.items()):
        xs = [x - 0.4 + (i + 0.5) * width for x in range(len(layers))]
        bars = ax.bar(xs, values, width, label=method)
        zeros = [x for x, v in zip(xs, values, strict=True) if v == 0]
        if zeros:
            ax.plot(zeros, [0.0] * len(zeros), "o", mfc="white", mec=bars.patches[0].get_facecolor(), ms=5,
                    label=zero_label, zorder=3, clip_on=False)
            zero_label = "_nolegend_"
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target global sparsity {target:g}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=FONT - 1)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylabel("sparsity (fraction of the\nlayer's weights removed)")
    ax.set_ylim(0, 1.0)
    ax.set_title(title or "per-layer sparsity")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_layer_sparsity(path: Path, sparsities: dict[str, list[float]], layers: Sequence[str],
                        target: float | None = None, title: str | None = None) -> Path:
    _save_figure(layer_sparsity_figure(sparsities, layers, target, title), path)
    return path


def reward_figure(rewards: Sequence[float], stages: Sequence[int] | None = None,
                  succeeded: Sequence[bool] | None = None, demonstrations: Sequence[str | None] | None = None,
                  stage_targets: Sequence[float] | None = None, chance: float | None = None, title: str | None = None):
    """Every episode's reward at its true value: the agent's episodes as dots, demonstrations (replayed baseline
    allocations) as diamonds, failed episodes (target not reached: a negative reward for the sparsity still
    missing) as red crosses; the best reward so far in each stage as a line; stage boundaries as dotted lines
    labelled with the stage's target; chance accuracy (1 / classes) as a grey line when given."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = len(rewards)
    episodes = list(range(1, n + 1))
    succeeded = list(succeeded) if succeeded is not None else [True] * n
    demonstrations = list(demonstrations) if demonstrations is not None else [None] * n
    stages = list(stages) if stages else [1] * n
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    kinds = (("agent episode", "o", "tab:blue", lambda i: succeeded[i] and not demonstrations[i]),
             ("demonstration (baseline allocation)", "D", "tab:orange", lambda i: succeeded[i] and demonstrations[i]),
             ("failed: target not reached", "x", "tab:red", lambda i: not succeeded[i]))
    for label, marker, color, chosen in kinds:
        idx = [i for i in range(n) if chosen(i)]
        if idx:
            ax.plot([episodes[i] for i in idx], [rewards[i] for i in idx], marker, color=color, ms=4,
                    linestyle="none", label=f"{label} ({len(idx)})")
    best_x, best_y = [], []
    for s in sorted(set(stages)):
        running = None
        for i in (i for i in range(n) if stages[i] == s):
            if succeeded[i]:
                running = rewards[i] if running is None else max(running, rewards[i])
            if running is not None:
                best_x.append(episodes[i])
                best_y.append(running)
        if best_x:
            best_x.append(float("nan"))  # no line across a stage boundary
            best_y.append(float("nan"))
    if best_x:
        ax.plot(best_x, best_y, "-", color="tab:green", linewidth=1.5, label="best so far in the stage")
    starts = [i for i in range(1, n) if stages[i] != stages[i - 1]]
    for i in starts:
        ax.axvline(i + 0.5, color="grey", linestyle=":", linewidth=1)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance accuracy ({chance:.2f})")
    if any(not s for s in succeeded):
        ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlim(0.5, n + 0.5)
    low = min([0.0, *rewards]) if rewards else 0.0
    ax.set_ylim(low - 0.05, 1.02)  # every episode on the chart
    if stage_targets:
        edges = [0.5, *[i + 0.5 for i in starts], n + 0.5]
        for k, target in enumerate(stage_targets[: len(edges) - 1]):
            ax.text((edges[k] + edges[k + 1]) / 2, 1.01, f"stage {k + 1}\n{target:.3g}", ha="center",
                    va="bottom", fontsize=FONT - 2, color="dimgrey", transform=ax.get_xaxis_transform())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("episode" + ("  (dotted lines: stage boundaries; above: each stage's target sparsity)"
                               if stage_targets and starts else ""))
    ax.set_ylabel(REWARD_YLABEL)
    ax.set_title(title or "search reward per episode", pad=26 if stage_targets else 6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_reward_curve(path: Path, rewards: Sequence[float], stages: Sequence[int] | None = None, **kwargs) -> Path:
    _save_figure(reward_figure(rewards, stages, **kwargs), path)
    return path


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
