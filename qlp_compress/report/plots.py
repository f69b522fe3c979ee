"""The figures a run leaves: per-layer sparsity and the reward of every episode."""

from __future__ import annotations

from pathlib import Path

from qlp_compress.base.io import atomic_path


def plot_layer_sparsity(path: Path, sparsities: dict[str, list[float]], layers: list[str]) -> Path:
    """Grouped bars: per-layer sparsity of one or more methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers)), 3.5))
    width = 0.8 / len(sparsities)
    for i, (method, values) in enumerate(sparsities.items()):
        ax.bar([x + i * width for x in range(len(layers))], values, width, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))])
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def plot_reward_curve(path: Path, rewards: list[float], stages: list[int] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rewards) + 1), rewards, ".", markersize=3, label="episode reward")
    best, running = [], -float("inf")
    for i, r in enumerate(rewards):
        if stages and i and stages[i] != stages[i - 1]:
            running = -float("inf")  # a new curriculum stage starts its own best
        running = max(running, r)
        best.append(running)
    ax.plot(range(1, len(rewards) + 1), best, "-", label="best in stage")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward (reward-split accuracy)")
    ax.set_ylim(bottom=max(-0.2, min(rewards)))
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
