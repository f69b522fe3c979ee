"""policy.json: the per-layer sparsities a search (or a baseline allocator) chose, and how they were found.

A policy handed in with --policy is checked before it is used: its fields (read_policy), that its layers give the
global sparsity it states (within one weight per layer of rounding), and that it belongs to the model
(check_policy), which also warns in one line about layers it prunes to 100 % (an emptied layer on a path without a
shortcut leaves the network at chance accuracy; inside a residual branch it removes the branch, which can be meant).
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.io import atomic_write_json
from qlp_compress.base.names import SEARCH_METHODS
from qlp_compress.pruning.masks import global_sparsity

FORMAT = "qlp-compress/policy/v1"
CHANNEL_FORMAT = "qlp-compress/channel-policy/v1"  # written by channel mode (qlp_compress.workflows.channel_checks)


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
    names: list[str] = field(default_factory=list)  # the layers' readable names (base.names), shown everywhere;
    #                                                  empty: the module paths are the names (files before v1.1)

    @property
    def labels(self) -> list[str]:
        """What a user sees for each layer: its readable name."""
        return list(self.names) if self.names else list(self.layers)

    @property
    def achieved(self) -> float:
        return global_sparsity(self.by_layer(), dict(zip(self.layers, self.numels, strict=True)))

    def by_layer(self) -> dict[str, float]:
        return dict(zip(self.layers, self.sparsities, strict=True))

    def to_json(self) -> dict:
        layers = [{"name": label, "module": n, "weights": w, "sparsity": s}
                  for label, n, w, s in zip(self.labels, self.layers, self.numels, self.sparsities, strict=True)]
        return {"format": FORMAT, "method": self.method, "target_sparsity": self.target,
                "achieved_sparsity": self.achieved, "best_reward": self.best_reward, "seed": self.seed,
                "model_sha256": self.model_sha256, "layers": layers, "stages": self.stages, "search": self.search}

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


MAX_POLICY_BYTES = 64 << 20  # a policy.json lists one entry per layer: far below this


def read_policy_document(path: Path) -> object:
    """The JSON a policy file holds, read safely (weight and channel policies alike): only a regular file within
    MAX_POLICY_BYTES is read (a FIFO or a device never), and every failure is one line naming the fix."""
    try:
        info = path.stat()
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):  # a FIFO or a device: never read
            raise UsageError(f"policy file {path} is not a regular file; pass the policy.json a search wrote")
        if info.st_size > MAX_POLICY_BYTES:
            raise QLPError(f"{path} is {info.st_size} bytes, too large for a policy.json; pass the policy.json "
                           "a search wrote")
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise UsageError(f"policy file {path} does not exist; pass the policy.json a search wrote") from e
    except IsADirectoryError as e:
        raise UsageError(f"policy file {path} is a folder; pass the policy.json a search wrote") from e
    except OSError as e:
        raise QLPError(f"policy file {path} cannot be read ({e.strerror}); check its permissions") from e
    except RecursionError as e:
        raise QLPError(f"{path} is not a valid policy.json (nested too deeply); rerun the search that wrote it") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise QLPError(f"{path} is not a valid policy.json ({type(e).__name__}: {_clip(e)}); rerun the search that "
                       "wrote it") from e
    return doc


def read_policy(path: Path) -> Policy:
    """Read and check a policy.json on its own (before any model is loaded): every field of the right type and
    range, `method` one of the known names (it becomes part of the default output folder's name)."""
    from qlp_compress.pruning.allocate import ALLOCATORS

    path = Path(path)
    doc = read_policy_document(path)

    def invalid(what: str) -> QLPError:
        return QLPError(f"{path} is not a valid policy.json ({what}); rerun the search that wrote it")

    if not isinstance(doc, dict):
        raise invalid(f"it holds a {type(doc).__name__}, not an object")
    if doc.get("format") == CHANNEL_FORMAT:
        raise UsageError(f"{path} is a channel policy, not a weight policy; use --structure channel with it")
    method = doc.get("method")
    if method not in (*SEARCH_METHODS, *ALLOCATORS):
        raise invalid(f"method {_clip(method)!r} is none of {', '.join((*SEARCH_METHODS, *ALLOCATORS))}")
    target = doc.get("target_sparsity")
    if not (_is_number(target) and 0.0 < target < 1.0):
        raise invalid(f"target_sparsity {_clip(target)} does not lie strictly between 0 and 1")
    sha = doc.get("model_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise invalid("model_sha256 is not a SHA-256 hex digest")
    entries = doc.get("layers")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise invalid("layers is not a list of layer entries")
    for e in entries:
        if not (isinstance(e.get("name"), str) and type(e.get("weights")) is int and e["weights"] > 0
                and _is_number(e.get("sparsity")) and 0.0 <= e["sparsity"] <= 1.0):
            raise invalid(f"layer entry {_clip(e)} needs a name, a positive whole number of weights and a sparsity "
                          "in [0, 1]")
        if not isinstance(e.get("module", ""), str):
            raise invalid(f"layer entry {_clip(e)} has a module path that is not a string")
    best, seed = doc.get("best_reward"), doc.get("seed", 0)
    stages, search = doc.get("stages", []), doc.get("search", {})
    if not (best is None or _is_number(best)) or type(seed) is not int or not isinstance(stages, list) \
            or not isinstance(search, dict):
        raise invalid("best_reward, seed, stages or search has the wrong type")
    policy = Policy(method=method, target=float(target), layers=[e.get("module") or e["name"] for e in entries],
                    names=[e["name"] for e in entries],
                    numels=[e["weights"] for e in entries], sparsities=[float(e["sparsity"]) for e in entries],
                    model_sha256=sha, best_reward=best, stages=stages, search=search, seed=seed)
    rounding = len(entries) / sum(policy.numels) + 1e-9  # each layer's count of removed weights is whole
    if abs(policy.achieved - policy.target) > rounding:
        raise QLPError(f"{path} does not reach its own target: its layers remove {policy.achieved:.4f} of the weights, "
                       f"its target_sparsity says {policy.target:g}; set target_sparsity to "
                       f"{policy.achieved:.4f} or correct the layers' sparsities")
    return policy


def _is_number(x: object) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _clip(x: object, n: int = 80) -> str:
    text = " ".join(str(x).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def load_policy(path: Path, model_sha256: str, layers: Sequence[str], numels: Sequence[int],
                names: Sequence[str] | None = None) -> Policy:
    """Read a policy.json and check that it belongs to this model."""
    return check_policy(read_policy(path), path, model_sha256, layers, numels, names)


def check_policy(policy: Policy, path: Path, model_sha256: str, layers: Sequence[str], numels: Sequence[int],
                 names: Sequence[str] | None = None) -> Policy:
    """A policy read from `path` must belong to this model: same file hash, same layers. Its layers may be given by
    module path (every file has them: `module`, or `name` in files before readable names) or, when `names` (the
    model's readable names) is given, by readable name alone. Returns the policy keyed by this model's module
    paths, with the model's readable names."""
    if policy.model_sha256 != model_sha256:
        raise UsageError(f"{path} was made for another model (SHA-256 {policy.model_sha256[:12]}…, this model "
                         f"{model_sha256[:12]}…); search this model or pass its own policy")
    if list(numels) == policy.numels and (list(layers) == policy.layers
                                          or (names is not None and list(names) == policy.layers)):
        policy = replace(policy, layers=list(layers), names=list(names) if names is not None else policy.names)
        emptied_warning(policy, path)
        return policy
    raise QLPError(f"{path} lists other layers than the model has; rerun the search on this model")


def emptied_warning(policy: Policy, path: Path) -> str | None:
    """The one-line warning (printed on stderr, and returned) when the policy prunes some layer to 100 %."""
    from rich.markup import escape

    from qlp_compress.base.messages import console

    emptied = [label for label, s in zip(policy.labels, policy.sparsities, strict=True) if s >= 1.0]
    if not emptied:
        return None
    shown = ", ".join(emptied[:5]) + (f" and {len(emptied) - 5} more" if len(emptied) > 5 else "")
    message = (f"{path} prunes {shown} to 100 % (no weight left): outside a residual branch that leaves the network "
               "at chance accuracy; lower their sparsity in the policy unless removing them is meant")
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return message
