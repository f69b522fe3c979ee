"""The comparison benchmark: QLP against global magnitude, LAMP, ERK, uniform and random search on the shipped
ResNet-20 / Fashion-MNIST, before and after the same fine-tuning budget, over several seeds.

Resumable: every finished unit of work (a search, a fine-tuned cell, an ablation) is a JSON file under
benchmarks/cells/GRID/, skipped when it exists. The summary goes to benchmarks/results/GRID.json and
docs/benchmarks.md (with plots in docs/img/). The test split is read only to report accuracies; every
choice (the search reward) uses the reward split.

    python benchmarks/run.py --grid quick     # < 15 min on 2 cores
    python benchmarks/run.py --grid full      # about 2-3 h on 2 cores
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnxruntime as ort
import torch
from bench_report import write_markdown

from qlp_compress.base.errors import QLPError
from qlp_compress.base.io import atomic_write_json
from qlp_compress.workflows import (
    AgentSettings,
    AllocationSettings,
    DataSettings,
    EnvSettings,
    ModelSettings,
    Policy,
    RewardSettings,
    SearchSettings,
    SelectionSettings,
    TrainSettings,
    allocator,
    candidates,
    export_bytes,
    find_policy,
    measure_onnx,
    open_workspace,
    prune_weights_and_finetune,
    select,
    to_sparse_storage,
)

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("global", "lamp", "erk", "uniform")
SEARCHES = {  # the QLP searches of every seed (one curriculum each; its stage policies serve every sparsity):
    #          name → how the search differs from `qlp`. The first, `qlp`, is QLP as shipped before the reward gate
    #          changed the reward's defaults (see `reward` in main); "qlp, gated reward" is QLP as shipped now.
    "qlp": {},
    "qlp, no near-best": {"near_best": 0.0},
    # the reward-fidelity gate at 0.95 ranked allocations best without brief fine-tuning (Spearman +0.75, against
    # +0.68 with the default 10 steps), at a fifth of the cost: this search scores 0.95 one-shot, 0.98 as before
    "qlp, one-shot reward at 0.95": {"finetune_from": 0.97},
    # the gate at 0.98 ranked allocations clearly only with 25 brief steps (+0.74; 10 steps +0.21): this is the
    # CLI's default reward since then (one-shot below 0.97, 25 steps from 0.97)
    "qlp, gated reward": {"finetune_from": 0.97, "finetune_steps": 25},
}
# rows whose policy is a search's, with its answer chosen among the stage's best allocations by fine-tuning them
# (workflows.selection, the CLI's default --candidates 3 --select-epochs 0.3): row name → the search it chooses for
CHOSEN = {"qlp, gated reward, 3 candidates": "qlp, gated reward"}
REWARD_KEYS = ("bn_recalibrate", "finetune_steps", "finetune_from")  # RewardSettings fields a variant may change


def split_change(change: dict) -> tuple[dict, dict]:
    """A variant's changes to SearchSettings and to RewardSettings."""
    return ({k: v for k, v in change.items() if k not in REWARD_KEYS},
            {k: v for k, v in change.items() if k in REWARD_KEYS})


@dataclass(frozen=True)
class Grid:
    """One benchmark configuration."""

    sparsities: tuple[float, ...]  # targets; QLP's curriculum stages are these, after a first stage at 0.5
    seeds: tuple[int, ...]  # search seeds and fine-tuning seeds
    qlp_episodes: int  # episodes of one curriculum search (serves every sparsity)
    reward_images: int  # reward-split images per reward evaluation
    finetune_epochs: float  # the same fine-tuning budget for every method
    ablation_sparsity: float  # the sparsity of the ablation runs
    ablation_episodes: int  # episodes of each ablation search
    finetune_lr: float = 0.01  # fine-tuning peak learning rate


GRIDS = {
    "quick": Grid(sparsities=(0.9, 0.98), seeds=(0,), qlp_episodes=120, reward_images=500, finetune_epochs=0.05,
                  ablation_sparsity=0.95, ablation_episodes=16),
    "full": Grid(sparsities=(0.5, 0.7, 0.9, 0.95, 0.98), seeds=(0, 1, 2), qlp_episodes=600, reward_images=1000,
                 finetune_epochs=0.3, ablation_sparsity=0.95, ablation_episodes=120),
}
PURE = {"demonstrations": (), "near_best": 0.0}  # the paper's DQN alone: the reference of the rows after it
BEFORE_17 = {"near_best": 0.0, "agent": AgentSettings(demo_learning=False)}  # issue 17's changes, undone one by one
ABLATIONS = {  # name → how the search differs from QLP's defaults
    "qlp (defaults)": {},
    "without near-best episodes": {"near_best": 0.0},
    "without near-best, replay-only demonstrations (no DQfD)": BEFORE_17,
    "without near-best or DQfD, demonstrations scored at their 10 % replay (before issue 17)":
        {**BEFORE_17, "exact_demonstrations": False},
    "no demonstrations": PURE,
    "no demonstrations, one pass": {**PURE, "env": EnvSettings(passes=1)},
    "no demonstrations, no curriculum": {**PURE, "stages": 1},
    # four passes of at most 50 % leave 6.25 % of every layer, short of 0.95: this variant gets eight
    "no demonstrations, actions ≤ 50 %, 8 passes": {**PURE, "env": EnvSettings(actions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
                                                                                passes=8)},
    "no demonstrations, state without target": {**PURE, "env": EnvSettings(target_in_state=False)},
    "no demonstrations, no BN re-estimation": {**PURE, "bn_recalibrate": 0},
    "no demonstrations, no brief fine-tuning": {**PURE, "finetune_steps": 0},
}


def cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    atomic_write_json(path, result)
    return result


def policy_from(doc: dict) -> Policy:
    return Policy(**doc)


def policy_doc(p: Policy) -> dict:
    return {"method": p.method, "target": p.target, "layers": p.layers, "numels": p.numels,
            "sparsities": p.sparsities, "model_sha256": p.model_sha256, "best_reward": p.best_reward,
            "stages": p.stages, "search": p.search, "seed": p.seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    parser.add_argument("--model", type=Path, default=ROOT / "models/resnet20_fmnist.onnx")
    parser.add_argument("--report-only", action="store_true",
                        help="Compute nothing: summarise the cells finished so far (a partial grid says so).")
    parser.add_argument("--compute-seeds", type=int, nargs="+",
                        help="Compute only these seeds' missing cells; the other seeds are summarised as they are.")
    args = parser.parse_args()
    grid = GRIDS[args.grid]
    work = ROOT / "benchmarks/cells" / args.grid
    work.mkdir(parents=True, exist_ok=True)
    ws = open_workspace(args.model, ModelSettings(), DataSettings("fashion-mnist"), "auto")
    # the reward the grid's `qlp` search ran with: the defaults before the reward gate changed them (10 brief
    # steps from 0.95); the search "qlp, gated reward" runs today's defaults
    reward = RewardSettings(images=grid.reward_images, device=ws.device, finetune_steps=10, finetune_from=0.95)
    stage_targets = (0.5, *grid.sparsities) if grid.sparsities[0] > 0.5 else grid.sparsities
    started = time.perf_counter()

    computing = not args.report_only  # for the seed at hand (--compute-seeds)

    def cell(path: Path, compute) -> dict | None:
        """A finished unit of work, computed now unless --report-only or the seed is not in --compute-seeds (then
        None when not finished)."""
        return None if not computing and not path.exists() else cached(path, compute)

    def finetune(seed: int) -> TrainSettings:
        return TrainSettings(epochs=grid.finetune_epochs, lr=grid.finetune_lr, warmup_epochs=0.0, seed=seed,
                             device=ws.device)

    # Seed by seed, so that an interrupted run has whole seeds to show; the deployed side and the
    # ablations (seed 0 only) come right after the first seed.
    qlp: dict[str, dict[int, dict]] = {name: {} for name in SEARCHES}  # search → seed → its policy document
    cells, deployed, ablations = [], [], []
    for seed in grid.seeds:
        computing = not args.report_only and (args.compute_seeds is None or seed in args.compute_seeds)
        # 1. QLP: one curriculum search per seed and variant; its stage policies serve every sparsity
        for name, change in SEARCHES.items():
            search_change, reward_change = split_change(change)
            search = replace(SearchSettings(target_removed=grid.sparsities[-1], episodes=grid.qlp_episodes,
                                            stage_targets=stage_targets, seed=seed), **search_change)
            scored = replace(reward, **reward_change)
            stem = f"search_{slug(name)}_seed{seed}"
            doc = cell(work / f"{stem}.json", lambda s=search, r=scored, stem=stem: policy_doc(
                find_policy(ws, "qlp", s.target_removed, s, r, checkpoint=work / f"{stem}.ckpt", resume=True)))
            if doc is not None:
                qlp[name][seed] = doc
        if seed not in qlp["qlp"]:
            continue
        docs = {name: runs[seed] for name, runs in qlp.items() if seed in runs}
        lengths = docs["qlp"]["search"]["stage_of_episode"]

        # 2. every method × sparsity: policy, pruned and fine-tuned test accuracy
        for target in grid.sparsities:
            stage = stage_targets.index(target) + 1
            budget = sum(1 for k in lengths if k <= stage)  # QLP's reward evaluations up to this stage
            def cell_path(method: str, t=target, sd=seed) -> Path:
                return work / f"cell_{slug(method)}_{t:g}_seed{sd}.json"

            def compute(m: str, t=target, sd=seed, st=stage, bu=budget, docs=docs, cell_path=cell_path) -> dict:
                if m in CHOSEN:
                    return chosen_cell(ws, m, t, sd, st, docs, reward, finetune(sd), cell_path)
                twin = twin_cell(docs, m, st, cell_path)
                if twin:
                    return {**twin, "method": m, "best_from": stage_winner(docs[m], t),
                            "same_allocation_as": twin["method"]}
                return run_cell(ws, m, t, sd, st, bu, docs.get(m), reward, finetune(sd))

            chosen = [m for m, search in CHOSEN.items() if search in docs]
            for method in (*docs, "random", *BASELINES, *chosen):  # a chosen row copies cells computed before it
                cells.append(cell(cell_path(method), lambda m=method, compute=compute: compute(m)))
        if seed == grid.seeds[0]:
            tune = finetune(seed)
            deployed = [cell(work / f"deployed_{t:g}.json",
                             lambda t=t, d=docs["qlp"], f=tune: deploy(ws, d, stage_targets, t, f))
                        for t in grid.sparsities]
            ablations = [cell(work / f"ablation_{slug(name)}.json",
                              lambda n=name, f=tune: ablate(ws, grid, n, reward, f))
                         for name in (ABLATIONS if grid.ablation_episodes else ())]
    if not qlp["qlp"]:
        raise SystemExit(f"no finished search in {work}: run without --report-only first")
    dense = cached(work / "dense.json", lambda: measure_onnx(export_bytes(ws.loaded.module, ws), ws, repeats=30))
    done = [c for c in cells if c is not None]
    expected = len(grid.seeds) * len(grid.sparsities) * (len(SEARCHES) + len(CHOSEN) + 1 + len(BASELINES))
    summary = summarise(grid, args.grid, done, qlp, [d for d in deployed if d], dense,
                        [a for a in ablations if a], ws, time.perf_counter() - started)
    summary["finished_cells"], summary["expected_cells"] = len(done), expected
    summary["seeds_done"] = sorted(qlp["qlp"])
    atomic_write_json(ROOT / "benchmarks/results" / f"{args.grid}.json", summary)
    write_markdown(summary)
    print(f"wrote benchmarks/results/{args.grid}.json and docs/benchmarks.md ({len(done)} of {expected} cells)")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.replace("≤", "le").replace("%", "pct")).strip("_")


def deploy(ws, qlp_doc: dict, stage_targets: tuple[float, ...], target: float, finetune: TrainSettings) -> dict:
    """Latency and sizes of the fine-tuned QLP model at one sparsity."""
    policy = stage_policy(qlp_doc, stage_targets.index(target) + 1)
    _, tuned = prune_weights_and_finetune(ws, policy, finetune)
    data = export_bytes(tuned, ws)
    m = measure_onnx(data, ws, repeats=30)
    sparse = to_sparse_storage(data)
    return {"target": target, "latency": m["latency"], "bytes": m["bytes"], "gzip_bytes": m["gzip_bytes"],
            "sparse_bytes": len(sparse), "sparse_gzip_bytes": len(gzip.compress(sparse, 6))}


def ablate(ws, grid: Grid, name: str, reward: RewardSettings, finetune: TrainSettings) -> dict:
    """One QLP search at the ablation sparsity with one design choice changed, then pruned and fine-tuned."""
    change = ABLATIONS[name]
    search_change, reward_change = split_change(change)
    s = replace(SearchSettings(target_removed=grid.ablation_sparsity, episodes=grid.ablation_episodes,
                               seed=grid.seeds[0]),
                **search_change)
    try:
        policy = find_policy(ws, "qlp", s.target_removed, s, replace(reward, **reward_change))
    except QLPError as e:  # no episode met the target: that is the variant's result
        return {"name": name, "error": str(e)}
    pruned, tuned = prune_weights_and_finetune(ws, policy, finetune)
    return {"name": name, "best_reward": policy.best_reward,
            "best_from": policy.stages[-1].get("demonstration") or "agent",
            "seconds_per_episode": policy.search["seconds_per_episode"],
            "pruned_accuracy": measure_onnx(export_bytes(pruned, ws), ws, 1)["accuracy"],
            "finetuned_accuracy": measure_onnx(export_bytes(tuned, ws), ws, 1)["accuracy"],
            "sparsities": policy.sparsities}


def stage_policy(doc: dict, stage: int) -> Policy:
    """The best policy of one stage of a curriculum search."""
    best = doc["stages"][stage - 1]
    return policy_from({**doc, "target": best["target"], "sparsities": best["sparsities"],
                        "best_reward": best["reward"]})


def run_cell(ws, method: str, target: float, seed: int, stage: int, budget: int, qlp_doc: dict | None,
             reward: RewardSettings, finetune: TrainSettings) -> dict:
    """One method at one sparsity and seed: its policy, then test accuracy before and after fine-tuning."""
    t0 = time.perf_counter()
    searched = method in SEARCHES  # a stage policy of this seed's QLP search `method`
    if searched:
        policy = stage_policy(qlp_doc, stage)
    elif method == "random":
        policy = find_policy(ws, "random", target, SearchSettings(target_removed=target, episodes=budget,
                                                                   method="random",
                                                                  seed=seed), reward)
    else:
        policy = find_policy(ws, method, target, allocation=AllocationSettings())
    search_seconds = time.perf_counter() - t0
    pruned, tuned = prune_weights_and_finetune(ws, policy, finetune)
    best_from = stage_winner(qlp_doc, target) if searched else None
    return {"method": method, "target": target, "seed": seed, "achieved": policy.achieved, "best_from": best_from,
            "sparsities": policy.sparsities, "best_reward": policy.best_reward,
            "reward_evaluations": budget if searched or method == "random" else 0,
            "search_seconds": None if searched else round(search_seconds, 2),
            "pruned_accuracy": measure_onnx(export_bytes(pruned, ws), ws, 1)["accuracy"],
            "finetuned_accuracy": measure_onnx(export_bytes(tuned, ws), ws, 1)["accuracy"]}


def chosen_cell(ws, name: str, target: float, seed: int, stage: int, docs: dict[str, dict], reward: RewardSettings,
                finetune: TrainSettings, cell_path) -> dict:
    """The cell of a CHOSEN row: the stage's candidates (the search's stage answer and its best demonstrations) are
    fine-tuned as the CLI does and measured on held-out reward-split images; the winner is then fine-tuned with the
    cell's settings. With the CLI's 0.3 epoch that is the grid's own fine-tuning, seed included, so the winner's cell
    is the cell of the same allocation computed before (the search's own row, or the baseline's), copied."""
    doc = docs[CHOSEN[name]]
    settings = SelectionSettings()
    t0 = time.perf_counter()
    found = candidates(policy_from(doc), allocator(ws), settings.candidates, stage=stage - 1)
    winner, record = select(ws, stage_policy(doc, stage), found, settings, finetune, reward.images)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    mine = {"method": name, "best_from": stage_winner(doc, target) if winner == found[0] else winner.name,
            "best_reward": winner.reward, "selection": record,
            "reward_evaluations": json.loads(cell_path(CHOSEN[name]).read_text())["reward_evaluations"]}
    same = CHOSEN[name] if winner == found[0] else winner.name
    twin = json.loads(cell_path(same).read_text()) if cell_path(same).exists() else None
    if settings.epochs == finetune.epochs and twin is not None and twin["sparsities"] == winner.sparsities:
        return {**twin, **mine, "same_allocation_as": same}
    policy = replace(stage_policy(doc, stage), sparsities=winner.sparsities, best_reward=winner.reward)
    pruned, tuned = prune_weights_and_finetune(ws, policy, finetune)
    return {**mine, "target": target, "seed": seed, "achieved": policy.achieved, "sparsities": policy.sparsities,
            "search_seconds": None,
            "pruned_accuracy": measure_onnx(export_bytes(pruned, ws), ws, 1)["accuracy"],
            "finetuned_accuracy": measure_onnx(export_bytes(tuned, ws), ws, 1)["accuracy"]}


def twin_cell(docs: dict[str, dict], method: str, stage: int, cell_path) -> dict | None:
    """The finished cell of an earlier search of this seed whose stage policy is the same allocation as
    `method`'s, else None. Search variants that differ only from some target on (say, the reward at 0.95) play
    the earlier stages identically; fine-tuning the same allocation with the same seed gives the same cell, so
    it is copied rather than fine-tuned again."""
    if method not in docs:
        return None
    mine = stage_policy(docs[method], stage).sparsities
    for other in docs:
        if other == method:
            return None
        if stage_policy(docs[other], stage).sparsities == mine and cell_path(other).exists():
            return json.loads(cell_path(other).read_text())
    return None


def stage_winner(doc: dict, target: float) -> str:
    """What won the stage of a QLP search at `target`: a demonstration's name, or the agent's own episode."""
    best = next(b for b in doc["stages"] if b["target"] == target)
    return best.get("demonstration") or ("agent, near-best" if best.get("near_best") else "agent")


def agent_vs_demonstrations(doc: dict) -> list[dict]:
    """Per stage of one QLP search: the agent's own episodes (all but the demonstrations), how many failed (a
    negative reward: the target was not reached), the best of those from scratch and of the near-best ones,
    the best demonstration, and what won the stage."""
    search = doc["search"]
    rewards, stage_of, demos, near = (search[k] for k in ("rewards", "stage_of_episode", "demonstration", "near_best"))
    rows = []
    for k, best in enumerate(doc["stages"], start=1):
        episodes = [(r, d, n) for r, s, d, n in zip(rewards, stage_of, demos, near, strict=True) if s == k]
        agent = [(r, n) for r, d, n in episodes if d is None]
        ok = [(r, n) for r, n in agent if math.copysign(1.0, r) > 0]  # -0.0: a failure short by a few weights
        winner = stage_winner(doc, best["target"])
        rows.append({"target": best["target"], "agent_episodes": len(agent), "failed": len(agent) - len(ok),
                     "near_best_episodes": sum(n for _, n in agent),
                     "best_agent": max((r for r, _ in ok), default=None),
                     "best_from_scratch": max((r for r, n in ok if not n), default=None),
                     "best_near_best": max((r for r, n in ok if n), default=None),
                     "best_demonstration": max((r for r, d, _ in episodes if d is not None), default=None),
                     "winner": winner})
    return rows


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(grid: Grid, name: str, cells: list[dict], qlp: dict, deployed: list[dict], dense: dict,
              ablations: list[dict], ws, seconds: float) -> dict:
    table = []
    for target in grid.sparsities:
        for method in (*SEARCHES, *CHOSEN, "random", *BASELINES):
            rows = [c for c in cells if c["method"] == method and c["target"] == target]
            if not rows:  # a partial grid
                continue
            table.append({"target": target, "method": method,
                          "pruned": mean_std([r["pruned_accuracy"] for r in rows]),
                          "finetuned": mean_std([r["finetuned_accuracy"] for r in rows]),
                          "best_reward": mean_std([r["best_reward"] for r in rows]) if rows[0]["best_reward"]
                          is not None else None,
                          "reward_evaluations": rows[0]["reward_evaluations"],
                          "best_from": [stage_winner(qlp[method][r["seed"]], target) for r in rows]
                          if method in SEARCHES else [r["best_from"] for r in rows] if method in CHOSEN else None,
                          "sparsities_seed0": rows[0]["sparsities"]})
    random_cells = [c for c in cells if c["method"] == "random"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)

    def cost(docs: dict) -> dict:
        searches = [q["search"] for _, q in sorted(docs.items())]
        return {"episodes": searches[0]["episodes"],
                "wall_seconds": mean_std([s["wall_seconds"] for s in searches]),
                "wall_seconds_per_seed": [s["wall_seconds"] for s in searches],
                "seconds_per_episode": mean_std([s["seconds_per_episode"] for s in searches]),
                "share_outside_reward": mean_std([s["share_outside_reward"] for s in searches]),
                "reward_engine": searches[0]["reward_engine"]}

    return {
        "grid": name, "settings": grid.__dict__, "layers": qlp["qlp"][grid.seeds[0]]["layers"],
        "searches": {**{n: {k: v for k, v in change.items() if k != "agent"} for n, change in SEARCHES.items()},
                     **{n: {"answer_chosen_for": s, **asdict(SelectionSettings())} for n, s in CHOSEN.items()}},
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "device": ws.device, "commit": commit.stdout.strip()},
        "dense": dense, "table": table, "deployed": deployed, "ablations": ablations,
        "choices": [{"method": c["method"], "target": c["target"], "seed": c["seed"], **c["selection"],
                     "finetuned_accuracy": c["finetuned_accuracy"]} for c in cells if c["method"] in CHOSEN],
        "agent_vs_demonstrations": {n: {seed: agent_vs_demonstrations(doc) for seed, doc in sorted(docs.items())}
                                    for n, docs in qlp.items() if docs},
        "search_cost": {
            **{n: cost(docs) for n, docs in qlp.items() if docs},
            "random": {"search_seconds": mean_std([c["search_seconds"] for c in random_cells] or [0.0]),
                       "reward_evaluations": sorted({c["reward_evaluations"] for c in random_cells})},
            "baselines": "closed form: well under a second each",
        },
        "wall_seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
