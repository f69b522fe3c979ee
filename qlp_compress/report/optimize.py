"""What `optimize` leaves: the Pareto front of its candidates (report.md's table) and pareto.png, with the budget
line drawn and the answer marked."""

from __future__ import annotations

from pathlib import Path

from qlp_compress.report.plots import _pyplot, _save_figure


def objective_value(row: dict, objective: str, batch: int) -> float:
    """Higher is better: the speedup at `batch`, or minus the bytes."""
    return -float(row["bytes"]) if objective == "size" else float(row["speedup"].get(str(batch), 0.0))


def pareto_front(rows: list[dict], objective: str, batch: int) -> list[dict]:
    """The rows no other row beats on both counts (lower held-out loss, and faster or smaller), by loss."""
    def beats(o: dict, r: dict) -> bool:
        better, worse = objective_value(o, objective, batch), objective_value(r, objective, batch)
        return o["loss"] <= r["loss"] and better >= worse and (o["loss"] < r["loss"] or better > worse)

    front = [r for r in rows if not any(o is not r and beats(o, r) for o in rows)]
    return sorted(front, key=lambda r: r["loss"])


def pareto_figure(rows: list[dict], max_loss: float, chosen: str, objective: str, batch: int):
    """Every candidate form as a point (loss against speed or size), the front as a line, the budget as a dashed
    vertical line, the answer as a star."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    y = (lambda r: r["bytes"] / 1e6) if objective == "size" else (lambda r: r["speedup"].get(str(batch), 0.0))
    for form, marker, color in (("float", "o", "tab:blue"), ("int8", "^", "tab:orange")):
        points = [r for r in rows if r["form"] == form and r["name"] != "dense"]
        if points:
            ax.plot([r["loss"] for r in points], [y(r) for r in points], marker, color=color, linestyle="none",
                    label=f"{form} candidates ({len(points)})")
            for r in points:
                ax.annotate(r["name"].removesuffix(" int8"), (r["loss"], y(r)), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color="dimgrey")
    dense = [r for r in rows if r["name"] == "dense"]
    if dense:
        ax.plot([0.0], [y(dense[0])], "s", color="black", label="dense model")
    front = pareto_front(rows, objective, batch)
    ax.plot([r["loss"] for r in front], [y(r) for r in front], "-", color="tab:green", linewidth=1,
            label="Pareto front")
    ax.axvline(max_loss, color="tab:red", linestyle="--", linewidth=1, label=f"budget: {max_loss:g} points")
    answer = next(r for r in rows if r["name"] == chosen)
    ax.plot([answer["loss"]], [y(answer)], "*", color="gold", mec="black", ms=16, label=f"answer: {chosen}",
            zorder=5)
    ax.set_xlabel("accuracy lost against the dense model (points, held-out reward-split images)")
    ax.set_ylabel("size (MB)" if objective == "size" else f"measured speedup at batch {batch}")
    ax.set_title("optimize: every candidate measured")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_pareto(rows: list[dict], max_loss: float, chosen: str, objective: str, batch: int, path: Path) -> Path:
    _save_figure(pareto_figure(rows, max_loss, chosen, objective, batch), path)
    return path


def optimize_markdown(r: dict) -> str:
    """report.md of an optimize run."""
    batch, objective = r["batch"], r["objective"]
    front = set(r["front"])
    goal = f"the fastest at batch {batch}" if objective == "speed" else "the smallest file"
    test = r["test_accuracy"]
    lines = [f"# optimize: {goal} within {r['max_loss_points']:g} points", "",
             f"- model: `{r['model']}` ({r['data']}); structure searched: {r['structure']}",
             f"- answer: **{r['chosen']}** ({r['chosen_form']}, `{r['chosen_file']}`), written as `model.onnx`",
             f"- test accuracy (read once, after the choice): answer {test['chosen']:.2%}, dense {test['dense']:.2%} "
             f"({-r['test_loss_points']:+.2f} points)",
             f"- CPU: {r['cpu_description']}; {r['int8_verdict']}",
             f"- the climb stopped because {r['stopped']}",
             f"- candidates judged on {r['held_out_images']} held-out reward-split images (the search never scored "
             "them); their own report.md files give accuracy on those images in the test split's place",
             *([f"- {r['note']}"] if r.get("note") else []), "",
             "![Pareto front](pareto.png)", "",
             f"| candidate | form | speedup batch 1 | speedup batch {batch} | held-out loss (points) | within budget | "
             "size (MB) | blocks dropped | on the front |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for c in r["candidates"]:
        s = {b: f"{v:.2f}×" for b, v in c["speedup"].items()}
        lines.append(f"| {c['name']}{' (answer)' if c['name'] == r['chosen'] else ''} | {c['form']} | "
                     f"{s.get('1', '–')} | {s.get(str(batch), '–')} | {c['loss']:+.2f} | "
                     f"{'yes' if c['loss'] <= r['max_loss_points'] else 'no'} | {c['bytes'] / 1e6:.3f} | "
                     f"{c.get('blocks_dropped', 0)} | {'yes' if c['name'] in front else ''} |")
    lines += ["", f"Command: `{r['command']}`; wall time {r['wall_seconds']:.0f} s. Every candidate's files are in "
                  "`candidates/`.", ""]
    return "\n".join(lines)
