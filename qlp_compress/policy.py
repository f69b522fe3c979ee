"""policy.json: the per-layer sparsities a search (or a baseline allocator) chose, and how they were found."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qlp_compress.errors import QLPError, UsageError
from qlp_compress.io import atomic_write_json
from qlp_compress.masks import global_sparsity

FORMAT = "qlp-compress/policy/v1"


@dataclass(frozen=True)
class Policy:
    """Per-layer sparsities for one model."""

    method: str  # "qlp", "random", or a baseline allocator ("global", "lamp", "erk", "uniform")
    target: float  # requested global sparsity
    layers: list[str]  # prunable layer names, network order
    numels: list[int]  # weights per layer
    sparsities: list[float]  # fraction of each layer's weights removed
    model_sha256: str  # SHA-256 of the input model file the policy belongs to
    best_reward: float | None = None  # reward-split accuracy of the chosen episode (search methods)
    stages: list[dict] = field(default_factory=list)  # per curriculum stage: target, reward, sparsities
    search: dict = field(default_factory=dict)  # statistics: episodes, wall time, reward time, history
    seed: int = 0  # seed of the search

    @property
    def achieved(self) -> float:
        return global_sparsity(self.by_layer(), dict(zip(self.layers, self.numels, strict=True)))

    def by_layer(self) -> dict[str, float]:
        return dict(zip(self.layers, self.sparsities, strict=True))

    def to_json(self) -> dict:
        layers = [{"name": n, "weights": w, "sparsity": s}
                  for n, w, s in zip(self.layers, self.numels, self.sparsities, strict=True)]
        return {"format": FORMAT, "method": self.method, "target_sparsity": self.target,
                "achieved_sparsity": self.achieved, "best_reward": self.best_reward, "seed": self.seed,
                "model_sha256": self.model_sha256, "layers": layers, "stages": self.stages, "search": self.search}

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def load_policy(path: Path, model_sha256: str, layers: Sequence[str], numels: Sequence[int]) -> Policy:
    """Read a policy.json and check that it belongs to this model."""
    try:
        doc = json.loads(Path(path).read_text())
        entries = doc["layers"]
        policy = Policy(method=doc["method"], target=float(doc["target_sparsity"]),
                        layers=[e["name"] for e in entries], numels=[int(e["weights"]) for e in entries],
                        sparsities=[float(e["sparsity"]) for e in entries], model_sha256=doc["model_sha256"],
                        best_reward=doc.get("best_reward"), stages=doc.get("stages", []),
                        search=doc.get("search", {}), seed=int(doc.get("seed", 0)))
    except FileNotFoundError as e:
        raise UsageError(f"policy file {path} does not exist; pass the policy.json a search wrote") from e
    except (ValueError, KeyError, TypeError) as e:
        raise QLPError(f"{path} is not a valid policy.json ({type(e).__name__}: {e}); rerun the search that "
                       "wrote it") from e
    if policy.model_sha256 != model_sha256:
        raise UsageError(f"{path} was made for another model (SHA-256 {policy.model_sha256[:12]}…, this model "
                         f"{model_sha256[:12]}…); search this model or pass its own policy")
    if list(layers) != policy.layers or list(numels) != policy.numels:
        raise QLPError(f"{path} lists other layers than the model has; rerun the search on this model")
    if not all(0.0 <= s <= 1.0 for s in policy.sparsities):
        raise QLPError(f"{path} has sparsities outside [0, 1]; rerun the search that wrote it")
    return policy
