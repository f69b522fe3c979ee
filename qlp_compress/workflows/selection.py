"""Choosing the answer of a QLP search among its best allocations by fine-tuning them (our addition, see
docs/method.md).

The search's reward ranks allocations well on the whole but not at the top, where the answer is picked: at 0.95
its three winners scored above LAMP and fine-tuned below it (benchmarks/reward_fidelity.py). So, when the run
fine-tunes, the `candidates` best allocations of the search's last stage (its answer and the demonstrations that
scored highest there) are each fine-tuned for `epochs`, with the run's other fine-tuning settings, and measured on
the reward-split images the reward never measured; the most accurate is the answer. The search's answer is
always a candidate and wins ties, so selection only replaces it by an allocation that fine-tuned better on
images no choice has seen. The test split is never read.

A candidate is fine-tuned for at most the run's own fine-tuning epochs (a smaller --finetune-epochs caps
--select-epochs; the record says so). When --reward-size leaves no reward-split image beyond the --reward-images
the reward measures, the candidates are scored on those same images: a one-line warning says so, and the record
(policy.json → search.selection) names the images as not held out.

Resume: selection.json keeps each finished candidate with the run's record (base.resume); --resume with other
settings is refused, naming the option. `run_record` gives the record of a weight-mode run's options.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from qlp_compress import data as datasets
from qlp_compress.base import validate
from qlp_compress.base.io import atomic_write_json
from qlp_compress.base.messages import console
from qlp_compress.base.resume import check_same, flatten
from qlp_compress.pruning.allocate import AllocationSettings
from qlp_compress.pruning.policy import Policy
from qlp_compress.reward.weights import RewardSettings
from qlp_compress.reward.workers import ScaleSettings
from qlp_compress.search.checkpoint import OPTIONS as SEARCH_OPTIONS
from qlp_compress.search.curriculum import SearchSettings
from qlp_compress.train.finetune import TrainSettings
from qlp_compress.train.measure import accuracy
from qlp_compress.workflows.parallel import PortableWorkspace, from_portable, run_units, to_portable
from qlp_compress.workflows.workspace import Workspace, digest, prune_weights_and_finetune

SEARCH_ANSWER = "search"  # the name of the candidate the search itself returned (when no demonstration won)


@dataclass(frozen=True)
class SelectionSettings:
    """How a QLP search's answer is chosen among its best allocations."""

    candidates: int = 3  # allocations fine-tuned and compared (1 = keep the search's answer as it is)
    epochs: float = 0.3  # fine-tuning per candidate, in epochs of the fine-tune split


def check(settings: SelectionSettings) -> None:
    validate.whole("--candidates", settings.candidates, 1, str(SelectionSettings.candidates))
    validate.positive("--select-epochs", settings.epochs, str(SelectionSettings.epochs))


REWARD_OPTIONS = {"images": "--reward-images", "bn_recalibrate": "--bn-recalibrate", "engine": "--reward-engine",
                  "finetune_steps": "--reward-finetune-steps", "finetune_from": "--reward-finetune-from"}


def run_record(search: SearchSettings | None, reward: RewardSettings | None, allocation: AllocationSettings | None,
               finetune: TrainSettings | None, selection: SelectionSettings, method: str | None = None,
               target: float | None = None, policy: Policy | None = None) -> dict[str, object]:
    """The options a weight-mode run's results depend on (base.resume), as given: fine-tuning, search, reward,
    baseline and selection settings; `method`, `target` and a given `policy` (by digest) for one-target runs."""
    record: dict[str, object] = {} if method is None else {"--method": method, "--sparsity": target}
    if policy is not None:
        record["policy"] = digest(list(policy.sparsities))
    record.update({"--finetune-epochs": finetune.epochs if finetune else 0, "--lr": finetune.lr if finetune else None,
                   "--seed": search.seed if search else finetune.seed if finetune else None,
                   "--candidates": selection.candidates, "--select-epochs": selection.epochs})
    if search is not None:
        flat = flatten(asdict(search))
        record.update({option: flat[key] for key, option in SEARCH_OPTIONS.items() if key != "method"})
    if reward is not None:
        record.update({option: getattr(reward, key) for key, option in REWARD_OPTIONS.items()})
    record["--min-density"] = (allocation or AllocationSettings()).min_density
    return record


@dataclass(frozen=True)
class Candidate:
    name: str  # SEARCH_ANSWER, or the allocator whose demonstration this is
    sparsities: list[float]
    reward: float  # what the search's reward gave it


def candidates(policy: Policy, allocation: Callable[[str, float], list[float]], count: int,
               stage: int = -1) -> list[Candidate]:
    """The search's answer for `stage` (an index into policy.stages), then the demonstrations of that stage in
    order of their reward, `count` in all. A demonstration is played at its allocator's exact allocation, which
    `allocation(name, target)` gives again."""
    best = policy.stages[stage]
    found = [Candidate(best.get("demonstration") or SEARCH_ANSWER, list(best["sparsities"]), best["reward"])]
    stage_number = range(1, len(policy.stages) + 1)[stage]
    search = policy.search
    demonstrations: dict[str, float] = {}
    for reward, k, name, ok in zip(search["rewards"], search["stage_of_episode"], search["demonstration"],
                                   search["succeeded"], strict=True):
        if k == stage_number and name is not None and ok and name != found[0].name:
            demonstrations[name] = max(reward, demonstrations.get(name, -math.inf))
    for name in sorted(demonstrations, key=lambda n: -demonstrations[n])[: count - 1]:
        found.append(Candidate(name, list(allocation(name, best["target"])), demonstrations[name]))
    return found


def held_out_batches(ws: Workspace, measured: int, batch_size: int = 500) -> Iterator[tuple[torch.Tensor,
                                                                                             torch.Tensor]]:
    """The reward split after its first `measured` images (those the reward measures); all of it when it holds no
    others."""
    skip, seen = _measured(ws, measured), 0
    for x, y in datasets.iterate_batches(ws.splits.reward, batch_size):
        first = max(0, skip - seen)
        seen += len(y)
        if first < len(y):
            yield x[first:], y[first:]


def _measured(ws: Workspace, measured: int) -> int:
    return measured if len(ws.splits.reward) > measured else 0


def _finished(record_path: Path, run: dict) -> list[dict]:
    """The candidates an interrupted run finished; none when its record is missing or unreadable (they are then
    fine-tuned again). A run with other settings is refused (base.resume)."""
    try:
        document = json.loads(record_path.read_text())
        rows = document.get("candidates", [])
        recorded = document.get("record")
    except (OSError, ValueError, AttributeError):
        return []
    check_same(recorded, run)
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("held_out_accuracy"), float)]


def _scoring_images(ws: Workspace, reward_images: int) -> dict:
    """Which images judge the candidates, for the record; a warning when none is held out from the reward."""
    held_out = len(ws.splits.reward) - _measured(ws, reward_images)
    if _measured(ws, reward_images):
        return {"held_out_images": held_out, "scored_on": "held-out reward-split images"}
    note = (f"--reward-size {len(ws.splits.reward)} leaves no reward-split image beyond the --reward-images "
            f"{reward_images} the reward measures, so the answer is chosen on those same images; give a "
            "--reward-size above --reward-images for a choice on images the reward never measured")
    console.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
    return {"held_out_images": 0, "scored_on": "the reward's own images (none held out)", "note": note}


def select(ws: Workspace, policy: Policy, found: list[Candidate], settings: SelectionSettings,
           finetune: TrainSettings, reward_images: int, work: Path | None = None, resume: bool = False,
           scale: ScaleSettings | None = None) -> tuple[Candidate, dict]:
    """Fine-tune every candidate and return the most accurate on the held-out reward images (the search's answer,
    the first, on a tie) with a record of the comparison. `work` keeps each finished candidate's result
    (selection.json) and the running one's checkpoint (selection.ckpt), so that --resume continues where it
    stopped. Each candidate fine-tunes for --select-epochs, at most the run's own --finetune-epochs. With
    `scale.workers`, each candidate runs on its own Ray worker (workflows.parallel; a finished one is kept in
    selection.json as it finishes, a running one has no checkpoint)."""
    record_path = work / "selection.json" if work is not None else None
    done = _finished(record_path, dict(ws.record)) if resume and record_path is not None else []
    epochs = min(settings.epochs, finetune.epochs)
    tune = replace(finetune, epochs=epochs)
    scoring = _scoring_images(ws, reward_images)
    rows: dict[int, dict] = {}

    def keep(i: int, row: dict) -> None:
        rows[i] = row
        if record_path is not None:
            atomic_write_json(record_path, {"record": dict(ws.record), "candidates": [rows[k] for k in sorted(rows)]})

    todo = []
    for i, c in enumerate(found):
        earlier = next((r for r in done if r["name"] == c.name and r["sparsities"] == c.sparsities), None)
        if earlier is not None:
            keep(i, earlier)
        else:
            todo.append(i)
    units = None
    if scale is not None and scale.workers and todo:
        job = CandidateJob(to_portable(ws, test=False), policy, replace(tune, nproc=1), reward_images)
        units = run_units(scale, tune_candidate, job, [(found[i], _label(found, i)) for i in todo],
                          "choosing the answer", [_label(found, i) for i in todo],
                          lambda k, score: keep(todo[k], _row(found[todo[k]], score)),
                          gpus=1 if tune.device == "cuda" else 0)
    for i in todo if units is None else ():
        checkpoint = work / "selection.ckpt" if work is not None else None  # the running candidate's
        score = _tune(ws, policy, found[i], _label(found, i), tune, reward_images, checkpoint, resume)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
        keep(i, _row(found[i], score))
    ordered = [rows[i] for i in range(len(found))]
    best = max(range(len(found)), key=lambda i: (ordered[i]["held_out_accuracy"], i == 0))
    record = {"chosen": found[best].name, "epochs": epochs, **scoring,
              "candidates": [{k: v for k, v in r.items() if k != "sparsities"} for r in ordered]}
    if units is not None:
        record["scale"] = units.as_dict()
    if epochs < settings.epochs:
        record.update(select_epochs=settings.epochs, capped=f"--select-epochs {settings.epochs:g} is more than "
                                                            f"--finetune-epochs {finetune.epochs:g}: capped there")
    return found[best], record


def _row(c: Candidate, score: float) -> dict:
    return {"name": c.name, "reward": c.reward, "held_out_accuracy": score, "sparsities": c.sparsities}


def _label(found: list[Candidate], i: int) -> str:
    return f"candidate {i + 1} of {len(found)} ({found[i].name})"


def _tune(ws: Workspace, policy: Policy, c: Candidate, label: str, tune: TrainSettings, reward_images: int,
          checkpoint: Path | None = None, resume: bool = False) -> float:
    """A candidate pruned, fine-tuned and measured on the held-out reward images (in this process or a worker)."""
    _, tuned = prune_weights_and_finetune(ws, replace(policy, sparsities=c.sparsities), tune, checkpoint, resume,
                                          what=f"choosing the answer: {label}, fine-tune",
                                          epochs_option="--select-epochs")
    return accuracy(tuned, held_out_batches(ws, reward_images))


@dataclass(frozen=True)
class CandidateJob:
    """What every candidate's worker shares: the workspace, the policy, the fine-tuning and the measured images."""

    ws: PortableWorkspace
    policy: Policy
    tune: TrainSettings
    reward_images: int


def tune_candidate(job: CandidateJob, unit: tuple[Candidate, str]) -> float:
    """One candidate on a worker: the serial path's `_tune` on the workspace the job carries."""
    c, label = unit
    return _tune(from_portable(job.ws), job.policy, c, label, job.tune, job.reward_images)


def choose_answer(ws: Workspace, policy: Policy, allocation: Callable[[str, float], list[float]],
                  settings: SelectionSettings, finetune: TrainSettings | None, reward_images: int,
                  work: Path | None = None, resume: bool = False, scale: ScaleSettings | None = None) -> Policy:
    """The search's policy with its answer chosen by `select` (unchanged without fine-tuning, or with one
    candidate): the sparsities of the winner, and the comparison in policy.search["selection"]; the candidates run
    on `scale.workers` Ray workers when it is given."""
    if finetune is None or finetune.epochs <= 0 or settings.candidates < 2:
        return policy
    found = candidates(policy, allocation, settings.candidates)
    if len(found) < 2:
        return policy
    chosen, record = select(ws, policy, found, settings, finetune, reward_images, work, resume, scale)
    return replace(policy, sparsities=chosen.sparsities, best_reward=chosen.reward,
                   search={**policy.search, "selection": record})
