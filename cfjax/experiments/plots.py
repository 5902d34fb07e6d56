"""What every study figure shares: a subtitle saying what it shows (model, n, sampler), error
bars dodged so that two series at one x never hide each other, and points without lines (and a
warning) where each point is a single record, so no interval is implied."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

# One colour per series across every figure: the interventional series is blue everywhere.
COLOURS = {"factual": "0.35", "counterfactual": "tab:orange", "interventional": "tab:blue"}


def subtitle(ax, model: str, n: int, sampler: str) -> None:
    """The axes' title: the model, then the records it holds and the sampler (or effect)."""
    ax.set_title(f"{model or 'model ?'}\nn = {n} · {sampler}", fontsize=9)


def errorbars(ax, points: Sequence[tuple[float, float, float, int]], *, label: str, marker: str,
              colour: str, shift: int, of: int, log: bool = False) -> None:  # fmt: skip
    """Means with 95% intervals at their x, `shift`-th of `of` series dodged sideways (by a
    fraction of the gap between x values, multiplicatively on a log axis). Points of one record
    each are drawn without lines or bars, and a warning says so."""
    if not points:
        return
    x, y, e, n = map(np.asarray, zip(*points, strict=True))
    offset = (shift - (of - 1) / 2) * 0.06
    if log:
        xd = x * np.exp(offset * 0.5)
    else:
        gap = np.min(np.diff(np.unique(x))) if len(np.unique(x)) > 1 else 1.0
        xd = x + offset * gap
    single = bool(np.all(n == 1))
    if single:
        warnings.warn(f"{label}: one record per point, so no interval: drawn as points", stacklevel=2)  # fmt: skip
    ax.errorbar(xd, y, yerr=None if single else e, fmt=marker if single else marker + "-",
                color=colour, capsize=4, label=label)  # fmt: skip


def mean_interval(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, the half-width of its normal 95% interval, and n."""
    values = np.asarray(values, float)
    return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values))), len(values)


def attribution_heatmap(ax, effects: Sequence, *, title: str) -> None:
    """Each unit of an attribution (`cfjax.causal.attribution.UnitEffect`) as a cell coloured
    by its distance from the factual answer: the counterfactual row (same noise) above the
    interventional one (fresh noise, when run), the units' text along the bottom."""
    rows = [[e.distance for e in effects]]
    labels = ["counterfactual\n(same noise)"]
    if all(e.interventional_distance is not None for e in effects):
        rows.append([e.interventional_distance for e in effects])
        labels.append("interventional\n(fresh noise)")
    image = ax.imshow(np.asarray(rows, float), cmap="Oranges", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(effects)), [e.text for e in effects], rotation=60, ha="right", fontsize=8)  # fmt: skip
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    for y, row in enumerate(rows):
        for x, v in enumerate(row):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.6 else "black")  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="distance from the factual answer", shrink=0.8)
