"""Argument types of the `cfjax` command: each checks its value as argparse parses it, so a bad
flag is refused in one line before any model load or file write."""

from __future__ import annotations

import argparse
import math

SEEDS = 1 << 32  # a seed is one 32-bit word (`cfjax.core.checks.as_key`)


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None  # fmt: skip
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def seed(text: str) -> int:
    """An int seed in [0, 2**32)."""
    value = _number(text, int)
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"a seed is in [0, 2**32), got {value}")
    return value


def seeds(text: str) -> tuple[int, ...]:
    """A comma-separated list of at least one seed."""
    out = tuple(seed(x.strip()) for x in text.split(",") if x.strip())
    if not out:
        raise argparse.ArgumentTypeError("give at least one seed")
    return out


def _at_least(text: str, low: int) -> int:
    value = _number(text, int)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive(text: str) -> int:
    """An int >= 1."""
    return _at_least(text, 1)


def natural(text: str) -> int:
    """An int >= 0 (a position)."""
    return _at_least(text, 0)


def temperature(text: str) -> float:
    """A finite float >= 0 (0 = greedy)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def probability(text: str) -> float:
    """A top-p in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def text(value: str) -> str:
    """A non-blank text (a prompt)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


def port(text: str) -> int:
    """A TCP port in 1..65535."""
    value = _number(text, int)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


def replacement(text: str) -> tuple[str, str]:
    """`OLD=>NEW` as (old, new), OLD not empty."""
    old, sep, new = text.partition("=>")
    if not sep or not old:
        raise argparse.ArgumentTypeError(f"needs OLD=>NEW with a non-empty OLD, got {text!r}")
    return old, new
