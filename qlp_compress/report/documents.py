"""report.json, report.md, compare.md: the files a run leaves."""

from __future__ import annotations

from pathlib import Path

from qlp_compress.base.io import atomic_write_json, atomic_write_text
from qlp_compress.report.plots import plot_layer_sparsity, plot_reward_curve
from qlp_compress.report.provenance import finetune_lines


def write_report(out: Path, report: dict, policy) -> None:
    """report.json, report.md and the plots (sparsity.png, reward.png) in `out`."""
    atomic_write_json(out / "report.json", report)
    model = Path(report["model"]).name
    plots = [plot_layer_sparsity(out / "sparsity.png", {policy.method: policy.sparsities}, policy.labels,
                                 target=policy.target,
                                 title=f"{model}: per-layer sparsity ({policy.method}, global {policy.achieved:.3f})")]
    s = policy.search
    if s.get("rewards"):
        plots.append(plot_reward_curve(
            out / "reward.png", s["rewards"], s.get("stage_of_episode"), succeeded=s.get("succeeded"),
            demonstrations=s.get("demonstration"), stage_targets=[st["target"] for st in policy.stages] or None,
            chance=report.get("chance_accuracy"),
            title=f"{model}: {policy.method} search, {len(s['rewards'])} episodes"))
    atomic_write_text(out / "report.md", report_markdown(report, [p.name for p in plots]))



def report_markdown(report: dict, plots: list[str]) -> str:
    m = report["measured"]
    provider = m["dense"]["latency"][0]["provider"]
    lines = [f"# qlp-compress report: {Path(report['model']).name}", "",
             f"- method **{report['method']}**, target sparsity {report['target_sparsity']:g}, achieved "
             f"{report['achieved_sparsity']:.4f} (read back from model.onnx: {report['file_global_sparsity']:.4f})",
             f"- data {report['data']}; accuracy on the test split ({report['test_images']} images) through "
             f"onnxruntime ({provider})", *_cpu_line(report), f"- command: `{report['command']}`",
             *_provenance_lines(report), "",
             "| model | top-1 | batch 1 median / p90 (ms) | batch 64 median / p90 (ms) | file (MB) | gzip (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("dense", "dense"), ("pruned", "pruned, not fine-tuned"), ("finetuned", "fine-tuned"),
                       ("int8", "fine-tuned, int8 (model.int8.onnx)")):
        if key not in m:
            continue
        row = m[key]
        lat = {r["batch"]: r for r in row["latency"]}
        lines.append(f"| {label} | {row['accuracy']:.2%} | {lat[1]['median_ms']:.2f} / {lat[1]['p90_ms']:.2f} | "
                     f"{lat[64]['median_ms']:.2f} / {lat[64]['p90_ms']:.2f} | {row['bytes'] / 1e6:.3f} | "
                     f"{row['gzip_bytes'] / 1e6:.3f} |")
    if "sparse_storage" in m:
        lines.append(f"| fine-tuned, sparse storage | same | same | same | {m['sparse_storage']['bytes'] / 1e6:.3f} | "
                     f"{m['sparse_storage']['gzip_bytes'] / 1e6:.3f} |")
    v = report["verification"]
    lines += ["", f"Verification: onnxruntime vs PyTorch max abs diff {v['max_abs_diff']:.2e}, same top-1: "
              f"{v['same_top1']}; {v['layers_matched']} layers' zero patterns found in the file.", ""]
    lines += _int8_lines(report.get("int8"))
    lines += [f"Note: {n}." for n in report.get("notes", [])] + ([""] if report.get("notes") else [])
    lines += finetune_lines(report.get("finetune"))
    if report["search"]:
        s = report["search"]
        counts = (f"{s['agent_episodes']} by the agent and {s['demonstration_episodes']} demonstrations; "
                  f"{s['reward_evaluations']} reached the target and were scored by the reward, "
                  f"{s['failed_episodes']} fell short (not scored, negative reward)") \
            if "agent_episodes" in s else f"{s.get('reward_evaluations', '?')} reward evaluations"
        lines += [f"Search: {s['episodes']} episodes ({counts}); {s['wall_seconds']:.0f} s, "
                  f"{s['seconds_per_episode']:.2f} s per episode, {s['share_outside_reward']:.1%} of the time outside "
                  f"the reward ({s['reward_engine']} engine, {s['reward_images']} reward images).", ""]
        lines += _scale_lines(report.get("scale"))
        lines += ["| stage | target | best reward | episode | found by |", "|---:|---:|---:|---:|---|"]
        lines += [f"| {i + 1} | {st['target']:.4f} | {st['reward']:.4f} | {st['episode']} | "
                  f"{st['demonstration'] + ' demonstration' if st.get('demonstration') else 'the agent'} |"
                  for i, st in enumerate(report["stages"])]
        lines += ["", *_selection_lines(s.get("selection"))]
    lines += ["| layer | weights | sparsity |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['weights']:,} | {r['sparsity']:.2%} |" for r in report["layers"]]
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _selection_lines(selection: dict | None) -> list[str]:
    """How the answer was chosen among the search's best allocations (workflows.selection)."""
    if not selection:
        return []
    lines = [f"The answer was chosen among the last stage's best allocations, each fine-tuned for "
             f"{selection['epochs']:g} epoch and measured on {selection['held_out_images']} reward-split images the "
             f"reward never measured: **{selection['chosen']}**.", "",
             "| candidate | reward | held-out accuracy |", "|---|---:|---:|"]
    lines += [f"| {c['name']} | {c['reward']:.4f} | {c['held_out_accuracy']:.2%} |" for c in selection["candidates"]]
    return [*lines, "", *units_lines(selection.get("scale"), "candidate")]


def units_lines(scale: dict | None, unit: str) -> list[str]:
    """Where a workflow's independent units ran (workflows.parallel): the workers, the worker-seconds, the wall
    time; nothing when they ran in this process."""
    if not scale:
        return []
    return [f"{scale['units']} {unit}(s) ran on {scale['workers']} Ray worker(s) × "
            f"{scale['worker_threads']} thread(s): {scale['worker_seconds']:.0f} worker-seconds, "
            f"{scale['wall_seconds']:.0f} s wall time, {scale['workers_lost']} worker(s) lost.", ""]


def _provenance_lines(report: dict) -> list[str]:
    """Versions, seeds and the fine-tuning settings (the full settings are in report.json)."""
    lines = []
    if report.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    if report.get("seed"):
        lines.append("- seeds: " + ", ".join(f"{k} {v}" for k, v in report["seed"].items() if v is not None))
    tune = (report.get("settings") or {}).get("finetune")
    if tune:
        lines.append("- fine-tuning: " + ", ".join(f"{k} {v}" for k, v in tune.items()))
    elif "settings" in report:
        lines.append("- fine-tuning: none")
    if report.get("settings"):
        lines.append("- all settings: report.json, `settings`")
    return lines


def _cpu_line(report: dict) -> list[str]:
    from qlp_compress.base.machine import describe_cpu

    return [f"- CPU: {describe_cpu(report['cpu'])} (int8 speed depends on VNNI/AMX)"] if report.get("cpu") else []


def _int8_lines(int8: dict | None) -> list[str]:
    """What the int8 row is: how it was quantized and what was checked."""
    if not int8:
        return []
    a, z = int8["accuracy"], int8["zeros"]
    kept = ", ".join(int8["float_layers"]) or "none"
    return [f"int8 (onnxruntime static quantization, {int8['format']}: {int8['weights']} weights, "
            f"{int8['activations']} activations; pre-processing: {int8['preprocess']}): calibrated on "
            f"{int8['calibration_images']} {int8['calibration_split']}-split images; layers kept in float: {kept}. "
            f"Test accuracy {a['int8_accuracy']:.2%} against {a['float_accuracy']:.2%} in float "
            f"({a['loss_points']:+.2f} points lost"
            + (f", **over the {a['max_loss_points']:g}-point limit**" if a["warning"] else "") + "). "
            f"All {z['float_zeros']:,} zero weights of model.onnx are exactly zero in model.int8.onnx "
            f"({z['rounded_to_zero']:,} more weights rounded to zero).", *_int8_speed_lines(int8.get("speed")), ""]


def _int8_speed_lines(speed: dict | None) -> list[str]:
    """int8 against float on the machine that wrote the report, as timed interleaved."""
    if not speed or not speed.get("batches"):
        return []
    shown = ", ".join(f"{r['int8_speedup']:.2f}× at batch {r['batch']}" for r in speed["batches"])
    verdict = " **int8 is slower than float on this CPU.**" if speed["int8_slower"] else ""
    return ["", f"int8 speed against float on {speed['cpu']}: {shown} (timed interleaved).{verdict}"]


def compare_markdown(rows: list[dict], command: str) -> str:
    lines = ["# qlp-compress compare", "", f"`{command}`", "",
             f"Dense test accuracy: {rows[0]['dense_accuracy']:.2%}." if rows else "", "",
             "| sparsity | method | pruned | fine-tuned | search s |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        tuned = "-" if r["finetuned_accuracy"] is None else f"{r['finetuned_accuracy']:.2%}"
        lines.append(f"| {r['target']:g} | {r['method']} | {r['pruned_accuracy']:.2%} | {tuned} | "
                     f"{r['search_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _scale_lines(scale: dict | None) -> list[str]:
    """Where the rewards were scored: the workers, K, worker-seconds and wall time (workflows.scale)."""
    if not scale or not (scale["workers"] or scale["batch_episodes"] > 1):
        return []
    workers = f"{scale['worker_seconds']:.0f} worker-seconds, " if scale.get("worker_seconds") is not None else ""
    return [f"Rewards: scored on {scale['where']}, in batches of K = {scale['batch_episodes']} episodes; {workers}"
            f"{scale['wall_seconds']:.0f} s wall time ({scale['episodes_per_second']:.2f} episodes/s); "
            f"{scale['workers_lost']} worker(s) lost, {scale['allocations_rescored']} allocation(s) scored again.", ""]
