"""Checks of command-line values, run before anything is loaded or written: each refuses a value that cannot
work with a UsageError that names the option, the value and what to give instead."""

from __future__ import annotations

import math
from collections.abc import Sequence

from qlp_compress.base.errors import UsageError

MAX_SEED = 2**32 - 1  # numpy's and torch's generators take any seed up to here


def whole(option: str, value: int, low: int, example: str) -> None:
    """An integer option must be at least `low`."""
    if value < low:
        raise UsageError(f"{option} must be at least {low}, got {value}; e.g. {option} {example}")


def fraction(option: str, value: float, low: float, high: float, example: str, low_open: bool = False,
             high_open: bool = False) -> None:
    """A float option must lie in [low, high] (an end is excluded when open); NaN is refused."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        ends = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(f"{option} must lie in {ends}, got {value}; e.g. {option} {example}")


def positive(option: str, value: float, example: str, zero_ok: bool = False) -> None:
    """A finite number above 0 (or at least 0 with `zero_ok`)."""
    if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
        what = "a finite number ≥ 0" if zero_ok else "a finite number > 0"
        raise UsageError(f"{option} must be {what}, got {value}; e.g. {option} {example}")


def seed(value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {value}; e.g. --seed 0")


def choice(option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


def normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """--mean and --std: both or neither, as many of each, finite, and every std above zero."""
    if mean is None and std is None:
        return
    if not mean or not std:
        raise UsageError("--mean and --std go together; give both (one value per input channel)")
    if len(mean) != len(std):
        raise UsageError(f"--mean has {len(mean)} values but --std has {len(std)}; give one of each per input "
                         "channel")
    if not all(math.isfinite(m) for m in mean):
        raise UsageError(f"--mean must be finite numbers, got {list(mean)}; e.g. --mean 0.286")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise UsageError(f"--std must be finite numbers above zero, got {list(std)}; e.g. --std 0.353")


def sparsity(value: float) -> None:
    """A target sparsity (the fraction of the prunable weights removed) lies strictly between 0 and 1; NaN is
    refused too. The one check and wording of the target, wherever it is given."""
    if not 0.0 < value < 1.0:
        raise UsageError(f"--sparsity must lie strictly between 0 and 1, got {value}; e.g. --sparsity 0.9 removes "
                         "90 % of the prunable weights")
