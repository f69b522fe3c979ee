"""Channel mode's checks of what a user hands in or asks for: a channel policy.json (every field, before the model is
loaded, then against the model), and a --speedup the latency table cannot reach, with the cause (--round-to that
leaves nothing to prune, widths that are never faster) instead of a bare "ask for less"."""

from __future__ import annotations

import math
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.names import SEARCH_METHODS
from qlp_compress.pruning.latency import LatencyTable
from qlp_compress.pruning.policy import FORMAT as WEIGHT_POLICY_FORMAT
from qlp_compress.pruning.policy import read_policy_document
from qlp_compress.pruning.widths import BASELINES, CRITERION_OF

POLICY_FORMAT = "qlp-compress/channel-policy/v1"


def read_channel_policy(path: Path) -> dict:
    """A channel policy.json, every field checked (types, ranges, known names) before any model is loaded."""
    path = Path(path)
    doc = read_policy_document(path)

    def invalid(what: str) -> QLPError:
        return QLPError(f"{path} is not a valid policy.json ({what}); rerun the search that wrote it")

    if not isinstance(doc, dict):
        raise invalid(f"it holds a {type(doc).__name__}, not an object")
    if doc.get("format") == WEIGHT_POLICY_FORMAT:
        raise UsageError(f"{path} is a weight policy, not a channel policy; use --structure weight with it")
    if doc.get("format") != POLICY_FORMAT:
        raise invalid(f"format {_clip(doc.get('format'))!r} is not {POLICY_FORMAT!r}")
    methods = (*SEARCH_METHODS, *BASELINES)
    if doc.get("method") not in methods:
        raise invalid(f"method {_clip(doc.get('method'))!r} is none of {', '.join(methods)}")
    criteria = tuple(sorted(set(CRITERION_OF.values())))
    if doc.get("criterion") not in criteria:  # a tuple: an unhashable value is simply not in it
        raise invalid(f"criterion {_clip(doc.get('criterion'))!r} is none of {', '.join(criteria)}")
    speedup = doc.get("target_speedup")
    if not (type(speedup) in (int, float) and math.isfinite(speedup) and speedup > 1):
        raise invalid(f"target_speedup {_clip(speedup)!r} is not a number above 1")
    if doc.get("structure", "channel") not in ("channel", "depth", "channel,depth"):
        raise invalid(f"structure {_clip(doc.get('structure'))!r} is none of channel, depth, channel,depth")
    sha = doc.get("model_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise invalid("model_sha256 is not a SHA-256 hex digest")
    groups, blocks = doc.get("groups"), doc.get("blocks", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise invalid("groups is not a list of channel groups")
    if not (isinstance(blocks, list) and all(isinstance(b, dict) and isinstance(b.get("name"), str)
                                             and type(b.get("kept")) is bool for b in blocks)):
        raise invalid("blocks is not a list of residual blocks, each with a name and kept true or false")
    if not groups and not blocks:
        raise invalid("it lists neither channel groups nor residual blocks")
    for g in groups:
        channels, width = g.get("channels"), g.get("width")
        if not (isinstance(g.get("name"), str) and isinstance(g.get("module", ""), str)
                and type(channels) is int and channels > 0 and type(width) is int and 1 <= width <= channels):
            raise invalid(f"group {_clip(g)} needs a name, a whole number of channels and a whole-number width "
                          "from 1 to its channels")
    return doc


def check_channel_policy(policy: dict, path: Path, layer_paths: list[str], names: list[str], sizes: list[int],
                         model_sha256: str, block_names: list[str] | None = None) -> list[int]:
    """The units of a policy (checked by read_channel_policy) on this model: same model file, same groups (by
    module path, or by readable name), same group sizes, same removable blocks; widths, then block keep flags."""
    if policy["model_sha256"] != model_sha256:
        raise UsageError(f"{path} was found for another model file; run the search on this model")
    groups = policy["groups"]
    paths = [g.get("module") or g.get("name") for g in groups]  # files before readable names: name only
    if paths != layer_paths and [g["name"] for g in groups] != names:
        raise UsageError(f"{path} names other channel groups than this model has; run the search again")
    wrong = [g["name"] for g, n in zip(groups, sizes, strict=True) if g["channels"] != n]
    if wrong:
        raise UsageError(f"{path} gives other channel counts than this model has (group {_clip(wrong[0])}); run the "
                         "search again")
    blocks = policy.get("blocks", [])
    if [b["name"] for b in blocks] != list(block_names or []):
        raise UsageError(f"{path} names other residual blocks than this model has (with this --structure); run the "
                         "search again, or give the --structure the policy was found with")
    return [int(g["width"]) for g in groups] + [int(b["kept"]) for b in blocks]


def check_reach(table: LatencyTable, speedup: float) -> None:
    """A UsageError when the table predicts less than `speedup` even at the narrowest widths, naming the cause:
    --round-to keeping every group whole, narrowest widths that are not faster, or a target beyond the table."""
    best = table.max_speedup()
    if best >= speedup:
        return
    round_to, batch = table.settings.round_to, table.settings.batch
    sizes = table.sizes
    smaller = 1
    while smaller * 2 < min(round_to, max(sizes)):
        smaller *= 2
    if round_to > 1 and all(len(a) == 1 for a in table.allowed):
        raise UsageError(f"--round-to {round_to} leaves no channel group narrower than its full width (groups of "
                         f"{', '.join(map(str, sorted(set(sizes))))} channels; widths are multiples of {round_to} or "
                         f"the full width), so nothing can be pruned; use --round-to {smaller}")
    coarse = round_to > 1 and any(a[0] > 1 for a in table.allowed)
    hint = f", or a smaller --round-to (e.g. {smaller}) to let the groups narrow further" if coarse else ""
    if best < 1.01:
        raise UsageError(f"the latency table predicts no speedup even at the narrowest widths (at most {best:.2f}× "
                         f"at --latency-batch {batch}, --round-to {round_to}): channel pruning cannot make this model "
                         f"faster here; use --structure weight, a larger --latency-batch{hint}")
    raise UsageError(f"--speedup {speedup:g} is beyond this model's reach: the latency table predicts at most "
                     f"{best:.2f}× at the narrowest widths (--round-to {round_to}); ask for at most {best:.2f}{hint}")


def _clip(x: object, n: int = 80) -> str:
    text = " ".join(str(x).split())
    return text if len(text) <= n else text[: n - 1] + "…"
