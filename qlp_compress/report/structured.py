"""report.md and compare.md of the structured runs (channel, depth, or both): measured speedups, accuracy, the
groups' widths and the blocks dropped."""

from __future__ import annotations

from qlp_compress.base.machine import describe_cpu
from qlp_compress.report.provenance import finetune_lines

TITLES = {"channel": "Channel pruning", "depth": "Depth pruning", "channel,depth": "Channel and depth pruning"}


def report_markdown(r: dict) -> str:
    """report.md of a channel, depth or channel-and-depth run."""
    speed = ", ".join(f"batch {b}: {v:.2f}×" for b, v in r["measured_speedup"].items())
    lines = [f"# {TITLES.get(r['structure'], 'Channel pruning')}: {r['method']} at {r['target_speedup']:g}× "
             f"(batch {r['latency_batch']}, {r['threads']} threads)", "",
             f"- model: `{r['model']}` ({r['data']})",
             f"- predicted speedup (latency table): {r['predicted_speedup']:.2f}×; measured (onnxruntime, interleaved "
             f"medians): {speed}; CPU: {r['latency_table'].get('machine', {}).get('cpu_extensions', '?')}",
             f"- test accuracy: dense {r['accuracy']['dense']:.2%}, pruned {r['accuracy']['pruned']:.2%}, "
             f"fine-tuned {r['accuracy']['finetuned']:.2%}",
             f"- MACs: {r['macs']['dense'] / 1e6:.2f} M → {r['macs']['pruned'] / 1e6:.2f} M; parameters: "
             f"{r['params']['dense']:,} → {r['params']['pruned']:,}",
             f"- shortcut maps rewritten into fixed 1×1 convolutions: {len(r['channel_maps'])}",
             f"- groups left whole (not safely prunable): "
             f"{', '.join(g['group'] + ' (' + g['why'] + ')' for g in r['left_whole']) or 'none'}",
             *_block_lines(r.get("blocks")), "",
             "| group | channels | width |", "|---|---:|---:|"]
    if r.get("int8"):
        a, s = r["int8"]["accuracy"], r["int8"]["measured_speedup"]
        lines[4:4] = [f"- int8 (`model.int8.onnx`, onnxruntime static QDQ): test accuracy {a['int8_accuracy']:.2%} "
                      f"({-a['loss_points']:+.2f} points against the float file); measured speedup over the dense "
                      f"fp32 model: {', '.join(f'batch {b}: {v:.2f}×' for b, v in s.items())} "
                      f"({describe_cpu(r['cpu'])})"]
    lines += [f"| {g['name']} | {g['channels']} | {g['width']} |" for g in r["groups"]]
    if not r["groups"]:
        lines = lines[:-2]
    lines += ["", *finetune_lines(r.get("finetune")), f"Command: `{r['command']}`", ""]
    if r.get("versions"):
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".",
                  "Seeds: " + ", ".join(f"{k} {v}" for k, v in r["seed"].items() if v is not None)
                  + "; all settings in report.json (`settings`).", ""]
    return "\n".join(lines)


def _block_lines(blocks: list[dict] | None) -> list[str]:
    if not blocks:
        return []
    dropped = [b["name"] for b in blocks if not b["kept"]]
    return [f"- residual blocks dropped: {len(dropped)} of {len(blocks)}" + (f" ({', '.join(dropped)})" if dropped
                                                                              else "")]


def compare_markdown(rows: list[dict], command: str) -> str:
    """compare.md of a structured compare: every method at every speedup target."""
    header = ("| method | target | predicted | measured (batch: speedup) | pruned acc | fine-tuned acc | MACs | "
              "blocks dropped |")
    lines = [header, "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        speed = ", ".join(f"{b}: {v:.2f}×" for b, v in r["measured_speedup"].items())
        tuned_acc = f"{r['finetuned_accuracy']:.2%}" if r["finetuned_accuracy"] is not None else "–"
        lines.append(f"| {r['method']} | {r['target_speedup']:g}× | {r['predicted_speedup']:.2f}× | {speed} | "
                     f"{r['pruned_accuracy']:.2%} | {tuned_acc} | {r['macs'] / 1e6:.2f} M | "
                     f"{len(r.get('dropped_blocks', []))} |")
    return "\n".join([*lines, "", f"Command: `{command}`", ""])
