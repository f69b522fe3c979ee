"""What more episodes buy, judged on images the search never scored (issue 28, Benchmark).

Every reward of a search measures the same fixed reward images (the reward split's first --reward-images), so a
stage's best allocation is partly the best of many draws of noise on those images. This benchmark runs the QLP search
at 1× and 2× the episodes (2× at K = 2: what 2 workers play in the wall time of 1× on a machine with twice the cores;
the result depends on K, never on the workers, so it is scored in this process), and for every curriculum stage it
re-scores on held-out reward-split images (the images after the reward's, as workflows/selection.py picks them; the
reward never measured them):
- the best allocation of the DQN learning from scratch (agent episodes that are neither demonstrations nor
  near-best),
- the best allocation of the near-best search (episodes started from the stage's best so far),
- the best demonstration (the baseline allocation that scored highest at that stage),
with the same measurement the reward makes (BatchNorm re-estimated on 256 of the images, then top-1 accuracy), and
reports who wins each stage on the reward images and on the held-out ones.

Checkpoints: each search keeps its checkpoint and the allocations it scored under --work, and each held-out score is
kept in --out as soon as it is measured, so an interrupted run continues where it stopped (rerun the same command),
and a later session extends it with more --episodes or --seed values (existing entries are reused).

    nice -n 19 python benchmarks/episodes.py                      # 120 and 240 episodes, seed 0 (about an hour)
    python benchmarks/episodes.py --from-results                   # rewrite the page's section only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from qlp_compress.base.io import load_checkpoint
from qlp_compress.base.machine import cpu_capability, describe_cpu
from qlp_compress.workflows import (
    DataSettings,
    ModelSettings,
    PruningEnv,
    Reward,
    RewardSettings,
    SearchSettings,
    TensorImages,
    allocator,
    curriculum_targets,
    held_out_images,
    open_workspace,
    run_search,
    scored_in_turn,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/benchmarks_scale.md"
HEADING = "## What more episodes buy, on images the search never scored"
KINDS = ("dqn", "near_best", "demonstration")
SHOWN = {"dqn": "DQN from scratch", "near_best": "near-best search", "demonstration": "best demonstration",
         "tie": "tie"}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_key(episodes: int, batch: int, seed: int) -> str:
    return f"episodes={episodes},K={batch},seed={seed}"


class LoggedScorer:
    """The reward scored in this process (scored_in_turn), each scored allocation appended to a JSON-lines file, so
    that a search resumed from its checkpoint still knows every allocation before it."""

    def __init__(self, reward: Reward, path: Path, keep: int):
        self.score_in_turn, self.path = scored_in_turn(reward), path
        lines = path.read_text().splitlines() if path.exists() else []
        self.entries = [json.loads(line) for line in lines[:keep]]  # those the checkpoint holds; the rest are replayed
        path.write_text("".join(json.dumps(e) + "\n" for e in self.entries))

    def __call__(self, allocations):
        results = self.score_in_turn(allocations)
        with self.path.open("a") as f:
            for a, (value, _) in zip(allocations, results, strict=True):
                entry = {"sparsities": [float(s) for s in a], "reward": float(value)}
                self.entries.append(entry)
                f.write(json.dumps(entry) + "\n")
        return results


def search(ws, settings: SearchSettings, reward_settings: RewardSettings, work: Path) -> dict:
    """One search (resumed from its checkpoint under `work` when there is one): each episode's stage, kind, reward and
    allocation (for those scored)."""
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, log = work / "search.ckpt", work / "allocations.jsonl"
    keep = 0
    if checkpoint.exists():
        keep = sum(bool(h["succeeded"]) for h in load_checkpoint(checkpoint)["progress"]["history"])
    reward = Reward(ws.loaded.module, ws.splits.reward, reward_settings)
    scorer = LoggedScorer(reward, log, keep)
    env = PruningEnv(reward.numels, reward, settings.env)
    started, load_start = time.perf_counter(), load()
    result = run_search(env, settings, checkpoint=checkpoint, resume=checkpoint.exists(), allocation=allocator(ws),
                        score_batch=scorer)
    scored = iter(scorer.entries)
    episodes = []
    for h in result.history:
        entry = next(scored) if h["succeeded"] else None
        if entry is not None and abs(entry["reward"] - h["reward"]) > 1e-9:
            raise RuntimeError(f"{log} does not match the search's history; delete {work} and rerun")
        kind = "demonstration" if h.get("demonstration") else "near_best" if h.get("near_best") else "dqn"
        episodes.append({"stage": h["stage"], "kind": kind, "name": h.get("demonstration"), "reward": h["reward"],
                         "sparsities": entry["sparsities"] if entry else None})
    return {"episodes": episodes, "targets": [b.target for b in result.best],
            "wall_seconds_this_session": round(time.perf_counter() - started, 1), "load_start": load_start,
            "load_end": load(), "reward_seconds": round(result.reward_seconds, 1)}


def stage_bests(episodes: list[dict], stages: int) -> list[dict]:
    """For each stage, the best-rewarded scored allocation of each kind (the first on a tie, as the search keeps)."""
    out = []
    for k in range(1, stages + 1):
        row = {}
        for kind in KINDS:
            pool = [e for e in episodes if e["stage"] == k and e["kind"] == kind and e["sparsities"] is not None]
            if pool:
                best = max(pool, key=lambda e: e["reward"])  # max keeps the first of equals
                row[kind] = {"reward": best["reward"], "name": best["name"], "sparsities": best["sparsities"],
                             "episodes": len(pool)}
        out.append(row)
    return out


def held_out_scorer(ws, reward_settings: RewardSettings) -> tuple[Reward, int]:
    """The reward's own measurement on the reward split's images after those the reward measures."""
    held = held_out_images(ws, reward_settings.images)
    if not isinstance(held, TensorImages) or len(held) == len(ws.splits.reward):
        raise SystemExit("the reward split holds no image beyond --reward-images; give a larger reward split")
    settings = replace(reward_settings, images=len(held), finetune_steps=0)
    return Reward(ws.loaded.module, held, settings), len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--episodes", type=int, default=120, help="1×; 2× is twice this, played at K = 2")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads of this process")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks/results/episodes-work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/episodes.json")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks_scale.md")
    parser.add_argument("--from-results", action="store_true", help="rewrite the page's section from --out, no run")
    parser.add_argument("--reading", help="with --from-results: keep this reading of the figures in --out and show it")
    args = parser.parse_args()
    if args.from_results:
        result = json.loads(args.out.read_text())
        if args.reading:
            result["reading"] = args.reading
            save(args.out, result)
        write_doc(section(result))
        return
    from qlp_compress.workflows import use_threads

    use_threads(args.threads)
    result = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}, "loads": []}
    result.update(cpu=describe_cpu(cpu_capability()), cores=os.cpu_count(), model=args.model.name,
                  target=args.sparsity, reward_images=args.reward_images, threads=args.threads)
    result["loads"].append({"at": time.strftime("%Y-%m-%d %H:%M"), "load": list(os.getloadavg()),
                            "nice": os.nice(0)})
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "cpu")
    reward_settings = RewardSettings(images=args.reward_images, device="cpu")
    stages = len(curriculum_targets(args.sparsity, SearchSettings.stages))
    if args.sparsity >= reward_settings.finetune_from:
        raise SystemExit(f"at {args.sparsity} the reward fine-tunes briefly on the images after its measured ones; "
                         "this benchmark holds out those images: use a target below "
                         f"{reward_settings.finetune_from}")
    held, held_images = None, 0
    for seed in args.seed:
        for scale, batch in ((1, 1), (2, 2)):
            episodes = args.episodes * scale
            key = run_key(episodes, batch, seed)
            run = result["runs"].setdefault(key, {"episodes": episodes, "batch_episodes": batch, "seed": seed})
            if "stages" not in run:
                settings = SearchSettings(target_removed=args.sparsity, episodes=episodes, seed=seed,
                                          batch_episodes=batch,
                                          checkpoint_every=batch)
                found = search(ws, settings, reward_settings, args.work / key)
                run.update({k: v for k, v in found.items() if k != "episodes"})
                run["stages"] = [{"target": t, **best} for t, best in
                                 zip(found["targets"], stage_bests(found["episodes"], stages), strict=True)]
                save(args.out, result)
            for stage in run["stages"]:
                for kind in KINDS:
                    if kind in stage and "held_out" not in stage[kind]:
                        if held is None:
                            held, held_images = held_out_scorer(ws, reward_settings)
                        stage[kind]["held_out"] = float(held(stage[kind]["sparsities"]))
                        result["held_out_images"] = held_images
                        save(args.out, result)
    result["loads"].append({"at": time.strftime("%Y-%m-%d %H:%M"), "load": list(os.getloadavg()), "end": True})
    result["reward_split_images"] = len(ws.splits.reward)
    save(args.out, result)
    text = section(result)
    print(text)
    if not args.no_doc:
        write_doc(text)


def save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def winner(stage: dict, score: str) -> str:
    """The kind with the highest `score` at the stage, or "tie" when several share it."""
    present = [k for k in KINDS if k in stage]
    top = max((stage[k][score] for k in present), default=None)
    best = [k for k in present if stage[k][score] == top]
    return best[0] if len(best) == 1 else "tie"


def section(result: dict) -> str:
    n = result.get("held_out_images", 0)
    rows, tally = [], {}
    for run in sorted(result["runs"].values(), key=lambda r: (r["seed"], r["episodes"])):
        if "stages" not in run:
            continue
        for i, stage in enumerate(run["stages"], 1):
            if not all("held_out" in stage[k] for k in KINDS if k in stage):
                continue
            cells = []
            for kind in KINDS:
                x = stage.get(kind)
                what = f" ({x['name']})" if x and x["name"] else ""
                cells.append("—" if x is None else
                             f"{100 * x['reward']:.2f} → {100 * x['held_out']:.2f}{what} [{x['episodes']}]")
            on_reward, on_held = winner(stage, "reward"), winner(stage, "held_out")
            held_scores = sorted((stage[k]["held_out"] for k in KINDS if k in stage), reverse=True)
            margin = 100 * (held_scores[0] - held_scores[1]) if len(held_scores) > 1 else float("nan")
            clear = margin >= 2 * 100 * (held_scores[0] * (1 - held_scores[0]) / max(n, 1)) ** 0.5
            t = tally.setdefault(run["episodes"], {"stages": 0, "reward": {}, "held_out": {}, "clear": {}})
            t["stages"] += 1
            t["reward"][on_reward] = t["reward"].get(on_reward, 0) + 1
            t["held_out"][on_held] = t["held_out"].get(on_held, 0) + 1
            if clear:
                t["clear"][on_held] = t["clear"].get(on_held, 0) + 1
            rows.append(f"| {run['episodes']} (K = {run['batch_episodes']}) | {run['seed']} | {i} "
                        f"({stage['target']:.3g}) | " + " | ".join(cells) + f" | {SHOWN[on_reward]} | "
                        f"**{SHOWN[on_held]}** | {margin:.2f}{'' if clear else ' (noise)'} |")
    summary = []
    for episodes, t in sorted(tally.items()):
        def count(where: str, t=t) -> str:
            return ", ".join(f"{SHOWN[k]} {t[where].get(k, 0)}" for k in (*KINDS, "tie"))
        summary.append(f"- {episodes} episodes: stages won on the reward images: {count('reward')}; on the held-out "
                       f"images: {count('held_out')}; by more than two standard errors there: {count('clear')} (of "
                       f"{t['stages']}).")
    loads = "; ".join(f"{x['at']}: {' '.join(f'{v:.2f}' for v in x['load'])}" for x in result.get("loads", []))
    se = 100 * (0.9 * 0.1 / max(n, 1)) ** 0.5
    runs = [r for r in result["runs"].values() if "stages" in r]
    walls = "; ".join(f"{r['episodes']} episodes: {r['wall_seconds_this_session']:.0f} s (load {r['load_start']} → "
                      f"{r['load_end']})" for r in runs)
    header = (f"| episodes | seed | stage (target) | {' | '.join(SHOWN[k] for k in KINDS)} | wins on reward images | "
              "wins held out | held-out margin |")
    return f"""{HEADING}

`nice -n 19 python benchmarks/episodes.py` (figures in `benchmarks/results/episodes.json`): {result['model']} on
Fashion-MNIST, weight mode, target {result['target']:g}, 4 curriculum stages, the shipped search (4 demonstrations a
stage, half the rest near-best), **one seed, {min(r['episodes'] for r in runs) if runs else '?'} and
{max(r['episodes'] for r in runs) if runs else '?'} episodes**: a budget reduced to finish in about an hour on this
shared machine, not the full benchmark's 600 episodes and 3 seeds. The 2× run is played at K = 2, as 2 workers would
play it in the 1× run's wall time on a machine with twice the cores (the result depends on K, not on the workers: it
was scored in this process). Reward: the first {result['reward_images']} reward-split images, BatchNorm re-estimated
on 256 of them. Held out: the {n} reward-split images after them (as `workflows/selection.py` picks them; at this
target the reward's brief fine-tuning never runs, so the search never touched them), scored by the same measurement
(BatchNorm re-estimated on 256 of them, then top-1). CPU: {result['cpu']}, {result['cores']} cores, shared with
other work; load averages (1, 5, 15 min): {loads}. Search wall times: {walls}.

Each cell: accuracy on the reward images (what the search saw) → on the held-out images, in %, [scored episodes of
that kind in the stage]. One held-out accuracy near 90 % has a standard error of about {se:.2f} points on {n} images;
a held-out margin (the winner over the runner-up, in points) below twice that is marked "(noise)": not a win on new
images. The {result['reward_images']} reward images carry about twice that error, and each stage's best is the best
of many draws on them, so a reward-image win is partly selection on noise.

{header}
|---|---:|---|---|---|---|---|---|---:|
{chr(10).join(rows)}

{chr(10).join(summary)}
{chr(10) + result['reading'] + chr(10) if result.get('reading') else ''}"""


def write_doc(text: str) -> None:
    """Replace this benchmark's section of the page (up to the next "## "), keeping every other section."""
    old = DOC.read_text() if DOC.exists() else "# Scaling out: benchmarks\n"
    head, found, rest = old.partition(HEADING)
    if not found:
        marker = "\n## DDP fine-tuning"
        head, found, rest = old.partition(marker)
        if found:
            DOC.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + marker + rest)
        else:
            DOC.write_text(old.rstrip() + "\n\n" + text.rstrip() + "\n")
        return
    tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
    DOC.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail)


if __name__ == "__main__":
    main()
