"""docs/benchmarks.md and its plots, from benchmarks/results/*.json (every grid that has results)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from qlp_compress.base.io import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BASELINES = ("global", "lamp", "erk", "uniform")


def ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def spearman_p(a: list[float], b: list[float], draws: int = 100_000) -> float:
    """One-sided permutation p-value of a positive rank correlation: the share of random orderings of b whose
    Spearman with a is at least the observed one. "Clearly positive" in the reward gate means p < 0.05; with
    9 allocations that takes a Spearman of about +0.6, with 14 about +0.46."""
    ra, rb = ranks(a), ranks(b)
    shuffled = np.random.default_rng(0).permuted(np.tile(rb, (draws, 1)), axis=1)
    za, zs = ra - ra.mean(), shuffled - shuffled.mean(axis=1, keepdims=True)
    rho = (zs @ za) / (np.linalg.norm(zs, axis=1) * np.linalg.norm(za))
    return float((1 + np.sum(rho >= spearman(a, b) - 1e-12)) / (1 + draws))


def methods(summary: dict) -> list[str]:
    """The grid's methods in table order: its QLP searches, random search, then the closed-form baselines."""
    return list(dict.fromkeys(r["method"] for r in summary["table"]))


def fmt(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return f"{cell['mean']:.2%} ± {cell['std']:.2%}" if cell["n"] > 1 else f"{cell['mean']:.2%}"


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_accuracy(summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, title in ((axes[0], "pruned", "before fine-tuning"), (axes[1], "finetuned", "after fine-tuning")):
        for method in methods(summary):
            rows = [r for r in summary["table"] if r["method"] == method]
            xs = [r["target"] for r in rows]
            ax.errorbar(xs, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], marker="o",
                        capsize=3, label=method)
        ax.axhline(summary["dense"]["accuracy"], color="grey", linestyle=":", label="dense")
        ax.set_title(title)
        ax.set_xlabel("global sparsity")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("test accuracy (onnxruntime)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plot_layers(summary: dict, target: float, path: Path) -> None:
    layers = summary["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(layers)), 3.6))
    chosen = [m for m in ("qlp", "lamp", "global") if any(r["method"] == m for r in summary["table"])]
    width = 0.8 / len(chosen)
    for i, method in enumerate(chosen):
        row = next(r for r in summary["table"] if r["method"] == method and r["target"] == target)
        ax.bar([x + i * width for x in range(len(layers))], row["sparsities_seed0"], width, label=method)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))])
    ax.set_xticklabels([n.removeprefix("1.") for n in layers], rotation=90, fontsize=7)
    ax.set_ylabel(f"layer sparsity at {target:g}")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def reading(summary: dict) -> list[str]:
    """Plain-words comparison of each QLP search with the best of the simple baselines, per sparsity, with the
    noise."""
    lines = []
    searches = list(summary.get("searches") or ["qlp"])
    for target in summary["settings"]["sparsities"]:
        rows = {r["method"]: r for r in summary["table"] if r["target"] == target}
        if not {"random", *BASELINES} <= set(rows):  # a partial grid
            continue
        for key, label in (("finetuned", "after fine-tuning"), ("pruned", "before fine-tuning")):
            best = max(BASELINES, key=lambda m: rows[m][key]["mean"])
            b = rows[best][key]
            for search in (s for s in searches if s in rows):  # a search not yet run for any seed: left out
                q = rows[search][key]
                diff = q["mean"] - b["mean"]
                noise = max(q["std"], b["std"])
                verdict = "within the seed noise of" if abs(diff) <= noise else "ahead of" if diff > 0 else "behind"
                caveat = " (one seed: no noise estimate yet)" if q["n"] < 2 else ""
                lines.append(f"- {target:g}, {label}: {search} {fmt(q)} vs best simple baseline {best} {fmt(b)} — "
                             f"{diff * 100:+.2f} points, {verdict} it{caveat}; random search "
                             f"{fmt(rows['random'][key])}.")
    return lines


def grid_section(summary: dict) -> list[str]:
    g, m = summary["grid"], summary["machine"]
    s = summary["settings"]
    acc_png, layers_png = f"img/bench_accuracy_{g}.png", f"img/bench_layers_{g}.png"
    plot_accuracy(summary, DOCS / acc_png)
    layer_target = 0.95 if 0.95 in s["sparsities"] else s["sparsities"][-1]
    plot_layers(summary, layer_target, DOCS / layers_png)
    lines = [f"## Grid `{g}` (`make bench{'-quick' if g == 'quick' else ''}`)", "",
             f"Machine: {m['processor']}, {m['torch_threads']} torch threads, device {m['device']}; Python "
             f"{m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}; commit {m['commit']}; "
             f"wall time of the last invocation {summary['wall_seconds'] / 60:.1f} min (cached cells are free).", "",
             f"Settings: sparsities {s['sparsities']}, seeds {s['seeds']}, one QLP curriculum search of "
             f"{s['qlp_episodes']} episodes per seed (its stages are the sparsities, after 0.5), "
             f"{s['reward_images']} reward images per evaluation, fine-tuning {s['finetune_epochs']} epoch "
             f"(lr {s['finetune_lr']}, cosine) for every method. Random search gets QLP's reward evaluations up to "
             "that stage. Test accuracy via onnxruntime on the 10,000 test images; mean ± std over seeds "
             "(searches and fine-tuning seeds; the baselines' masks are deterministic).", "",
             f"Dense model: {summary['dense']['accuracy']:.2%}.", "",
             *partial_note(summary),
             "| sparsity | method | before fine-tuning | after fine-tuning | best reward (reward split) "
             "| reward evals | QLP's policy: found by |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in summary["table"]:
        found = ", ".join(x if x.startswith("agent") else f"{x} demonstration" for x in r.get("best_from") or []) or "–"
        lines.append(f"| {r['target']:g} | {r['method']} | {fmt(r['pruned'])} | {fmt(r['finetuned'])} | "
                     f"{fmt(r['best_reward'])} | {r['reward_evaluations'] or '–'} | {found} |")
    lines += ["", f"![accuracy vs sparsity]({acc_png})", "", f"![per-layer sparsity at {layer_target:g}]({layers_png})",
              "", "### Reading", "", *reading(summary), ""]
    c = summary["search_cost"]
    lines += ["### Search cost", ""]
    for search in [n for n in summary.get("searches") or ["qlp"] if n in c]:  # a partial grid lacks some
        q = c[search]
        walls = q.get("wall_seconds_per_seed", [])
        by_seed = f" ({', '.join(f'{w:.0f}' for w in walls)} s by seed)" if len(walls) > 1 else ""
        lines.append(f"- {search}: {q['episodes']} episodes, {fmt_s(q['wall_seconds'])} per search{by_seed}, "
                     f"{q['seconds_per_episode']['mean']:.3f} s per episode, "
                     f"{q['share_outside_reward']['mean']:.1%} of the time outside the reward "
                     f"({q['reward_engine']} engine).")
    lines += [f"- Random search: {fmt_s(c['random']['search_seconds'])} per search, reward evaluations "
              f"{c['random']['reward_evaluations']}.", f"- Global, LAMP, ERK, uniform: {c['baselines']}.", ""]
    lines += agent_section(summary)
    lines += choice_section(summary.get("choices") or [])
    d = summary["dense"]
    lines += ["### Deployed (QLP, seed 0, fine-tuned; onnxruntime, "
              f"{d['latency'][0]['provider']})", "",
              "| sparsity | batch 1 median / p90 (ms) | batch 64 median / p90 (ms) | file (MB) | gzip (MB) | "
              "sparse storage (MB) | sparse + gzip (MB) |", "|---:|---:|---:|---:|---:|---:|---:|",
              f"| dense | {lat(d, 1)} | {lat(d, 64)} | {d['bytes'] / 1e6:.3f} | {d['gzip_bytes'] / 1e6:.3f} | – | – |"]
    for r in summary["deployed"]:
        lines.append(f"| {r['target']:g} | {lat(r, 1)} | {lat(r, 64)} | {r['bytes'] / 1e6:.3f} | "
                     f"{r['gzip_bytes'] / 1e6:.3f} | {r['sparse_bytes'] / 1e6:.3f} | "
                     f"{r['sparse_gzip_bytes'] / 1e6:.3f} |")
    lines += ["", "Unstructured zeros do not make onnxruntime's dense kernels faster: latency stays that of the dense "
              "model. The gain is size: gzip and sparse storage.", ""]
    if summary["ablations"]:
        lines += [f"### Ablation at {s['ablation_sparsity']:g} (seed {s['seeds'][0]}, "
                  f"one search of {s['ablation_episodes']} episodes each)", "",
                  "| variant | best reward | best episode from | before fine-tuning | after fine-tuning | "
                  "s / episode |", "|---|---:|---|---:|---:|---:|"]
        for a in summary["ablations"]:
            if "error" in a:
                lines.append(f"| {a['name']} | – | {a['error']} | – | – | – |")
                continue
            lines.append(f"| {a['name']} | {a['best_reward']:.2%} | {a.get('best_from', '–')} | "
                         f"{a['pruned_accuracy']:.2%} | {a['finetuned_accuracy']:.2%} | "
                         f"{a['seconds_per_episode']:.2f} |")
        lines.append("")
    return lines


def agent_section(summary: dict) -> list[str]:
    """The DQN agent's own episodes against the demonstrations, stage by stage, one entry per seed, for each
    QLP search of the grid."""
    by_search = summary.get("agent_vs_demonstrations")
    if not by_search:
        return []
    if isinstance(next(iter(by_search.values())), list):  # a grid summarised before it had several searches
        by_search = {"qlp": by_search}
    return [line for search, runs in by_search.items() for line in agent_table(search, runs)]


def agent_table(search: str, runs: dict) -> list[str]:
    seeds = sorted(runs, key=int)
    lines = [f"### The agent's own episodes against the demonstrations ({search}, reward split)", "",
             f"Per curriculum stage of each {search} search (seeds {', '.join(seeds)}, in that order): the agent's own "
             "episodes (all but the demonstrations; in brackets those that started near the stage's best), how "
             "many failed (ended short of the target), the best reward of those built from scratch and of the "
             "near-best ones, the best demonstration's reward, and what won the stage.", "",
             "| stage target | agent episodes (near-best) | failed | best from scratch | best near-best | "
             "best demonstration | stage winner |",
             "|---:|---:|---:|---:|---:|---:|---|"]

    def each(values, form="{}") -> str:
        return " / ".join("–" if v is None else form.format(v) for v in values)

    for k, first in enumerate(runs[seeds[0]]):
        stage = [runs[s][k] for s in seeds]
        lines.append(f"| {first['target']:g} | {first['agent_episodes']} ({first.get('near_best_episodes', 0)}) | "
                     f"{each(r['failed'] for r in stage)} | "
                     f"{each((r.get('best_from_scratch', r['best_agent']) for r in stage), '{:.3f}')} | "
                     f"{each((r.get('best_near_best') for r in stage), '{:.3f}')} | "
                     f"{each((r['best_demonstration'] for r in stage), '{:.3f}')} | "
                     f"{each(r.get('winner') for r in stage)} |")
    wins = [r.get("winner", "") for s in seeds for r in runs[s]]
    agent_wins = sum(w.startswith("agent") for w in wins)
    lines += ["", f"{search}: the agent's own episode won {agent_wins} of the {len(wins)} stage results "
                  f"({sum(w == 'agent, near-best' for w in wins)} of them near-best episodes)."]
    return [*lines, ""]


def choice_section(choices: list[dict]) -> list[str]:
    """How each answer of a CHOSEN row was chosen: its candidates' held-out accuracy after the brief fine-tuning."""
    if not choices:
        return []
    c0 = choices[0]
    lines = [f"### Answers chosen by fine-tuning ({c0['method']})", "",
             f"Per sparsity and seed: the candidates (the search's stage answer, then the stage's best-scoring "
             f"demonstrations), each fine-tuned {c0['epochs']:g} epoch and measured on the {c0['held_out_images']} "
             "reward-split images the reward never measures (reward in brackets), the one chosen, and its test "
             "accuracy after fine-tuning.", "",
             "| sparsity | seed | candidates: held-out accuracy (reward) | chosen | test, fine-tuned | seconds |",
             "|---:|---:|---|---|---:|---:|"]
    for c in sorted(choices, key=lambda c: (c["target"], c["seed"])):
        each = ", ".join(f"{x['name']} {x['held_out_accuracy']:.2%} ({x['reward']:.3f})" for x in c["candidates"])
        lines.append(f"| {c['target']:g} | {c['seed']} | {each} | {c['chosen']} | {c['finetuned_accuracy']:.2%} | "
                     f"{c['seconds']:.0f} |")
    kept = sum(c["chosen"] == c["candidates"][0]["name"] for c in choices)
    return [*lines, "", f"The search's own answer was kept in {kept} of {len(choices)} choices.", ""]


def partial_note(summary: dict) -> list[str]:
    done, expected = summary.get("finished_cells"), summary.get("expected_cells")
    if done is None or done >= expected:
        return []
    return [f"**Partial grid: {done} of {expected} cells finished** (seeds {sorted(summary['seeds_done'])}); "
            f"`python benchmarks/run.py --grid {summary['grid']}` continues it. Means and stds below are over the "
            "seeds finished so far.", ""]


def fmt_s(cell: dict) -> str:
    return f"{cell['mean']:.0f} ± {cell['std']:.0f} s" if cell["n"] > 1 else f"{cell['mean']:.0f} s"


def lat(row: dict, batch: int) -> str:
    r = next(x for x in row["latency"] if x["batch"] == batch)
    return f"{r['median_ms']:.2f} / {r['p90_ms']:.2f}"


def fidelity_section(f: dict) -> list[str]:
    steps = list(f["spearman_with_finetuned"])
    lines = [f"## Reward fidelity at {f['sparsity']:g}, {len(f['rows'])} allocations "
             "(`python benchmarks/reward_fidelity.py`)", "",
             "The search reward of LAMP, ERK and log-density blends between them"
             + (" and of the benchmark's QLP winners at this sparsity" if f.get("extra_allocations") else "")
             + " (reward split, "
             f"{f['reward_images']} measured images, BatchNorm re-estimated, after {', '.join(steps)} brief "
             f"fine-tuning steps), against their accuracy after {f['finetune_epochs']} epoch of fine-tuning (seeds "
             f"{', '.join(map(str, f['seeds']))}) on the {f['validation_images']} reward-split images the reward "
             "does not measure. The test split is not read.", "",
             "| allocation | " + " | ".join(f"reward, {k} steps" for k in steps) + " | after fine-tuning |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for r in f["rows"]:
        tuned = " / ".join(f"{a:.2%}" for a in r["finetuned_accuracy"])
        lines.append(f"| {r['allocation']} | " + " | ".join(f"{r['reward'][k]:.2%}" for k in steps) + f" | {tuned} |")
    after = [r["finetuned_mean"] for r in f["rows"]]
    lines.append("| Spearman with after fine-tuning | " +
                 " | ".join(f"{f['spearman_with_finetuned'][k]:+.2f}" for k in steps) + " | |")
    lines.append("| one-sided p (permutations) | " +
                 " | ".join(f"{spearman_p([r['reward'][k] for r in f['rows']], after):.3f}" for k in steps) + " | |")
    return [*lines, ""]


def write_markdown(_latest: dict | None = None) -> None:
    lines = ["# Benchmarks", "",
             "QLP against the simple allocators a user could use instead, on the shipped ResNet-20 "
             "(`models/resnet20_fmnist.onnx`) and Fashion-MNIST. Regenerated by `make bench` (full grid, "
             "resumable, about 2–3 h on 2 cores) and `make bench-quick` (reduced grid, under 15 min); raw results "
             "in `benchmarks/results/`. Search speed: `benchmarks/speed.py` → `benchmarks/results/speed.json`.",
             "Channel mode (`--structure channel`, measured onnxruntime speedups): "
             "[benchmarks_channel.md](benchmarks_channel.md), generated by `benchmarks/channel.py`. int8: "
             "[benchmarks_int8.md](benchmarks_int8.md). DQfD: [benchmarks_dqfd.md](benchmarks_dqfd.md). ONNX import: "
             "[onnx_import.md](onnx_import.md).", ""]
    notes = DOCS / "benchmarks_notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for name in ("full", "quick"):
        path = ROOT / "benchmarks/results" / f"{name}.json"
        if path.exists():
            lines += grid_section(json.loads(path.read_text()))
    for name in ("reward_fidelity_095.json", "reward_fidelity_098.json", "reward_fidelity.json"):
        fidelity = ROOT / "benchmarks/results" / name
        if fidelity.exists():
            lines += fidelity_section(json.loads(fidelity.read_text()))
    speed = ROOT / "benchmarks/results/speed.json"
    if speed.exists():
        sp = json.loads(speed.read_text())
        lines += ["## Search speed (`python benchmarks/speed.py`)", "",
                  f"{sp['images']} reward images, batch {sp['batch']}, median of {sp['repeats']}:", "",
                  "| engine | s per evaluation | images/s |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.3f} | {sp['images_per_second'][k]:.0f} |"
                  for k, v in sp["seconds_per_evaluation"].items()]
        lines += ["", *[f"- {k}: {v:.1%}" for k, v in sp["reward_vs_bare"].items()],
                  f"- search: {sp['search']['seconds_per_episode']:.3f} s per episode, "
                  f"{sp['search']['share_outside_reward']:.1%} of the wall time outside the reward "
                  f"({sp['search']['engine']} engine)", ""]
    atomic_write_text(DOCS / "benchmarks.md", "\n".join(lines))
